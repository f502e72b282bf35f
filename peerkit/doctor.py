"""peerkit doctor: find what makes pairing silently fail or leak, and say how to fix it."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from . import authkeys
from .config import Config
from .errors import Busy, StateError
from .state import PeerStore

SSHD_CONFIG = Path("/etc/ssh/sshd_config")
_DEFAULT_AUTH_KEYS = (".ssh/authorized_keys", ".ssh/authorized_keys2")
# Shells that read a user-writable file before running a forced command
# non-interactively (bash does when started by sshd).
_RC_SHELLS = {"bash": ".bashrc", "zsh": ".zshenv", "fish": ".config/fish/config.fish",
              "csh": ".cshrc", "tcsh": ".tcshrc"}
_NO_LOGIN = {"nologin", "false"}


@dataclass
class Finding:
    """The outcome of one check."""

    check: str
    ok: bool
    message: str
    fix: str | None = None
    # A warning is a risk worth fixing that does not stop pairing from working.
    warning: bool = False


def _split_setting(line: str) -> tuple[str, str] | None:
    """Split one sshd_config line into (lowercase keyword, value), as sshd does.

    sshd accepts ``Keyword value``, ``Keyword=value`` and ``Keyword = value``.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    match = re.match(r"([^\s=]+)\s*(?:=\s*|\s+|$)(.*)", line)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).strip()


def read_sshd_settings(path: Path, keywords: tuple[str, ...]) -> dict[str, str]:
    """Return the value of each keyword that applies to every user (as sshd resolves it).

    Outside Match blocks the first value wins. A ``Match all`` block applies to
    everyone and overrides those (first value within such blocks wins); any
    other Match block is conditional and ignored, up to the end of its file.
    """
    found: dict[str, str] = {}
    in_match_all: dict[str, str] = {}

    def walk(file: Path, depth: int, start: dict[str, str]) -> None:
        if depth > 8:  # an Include loop
            return
        try:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return
        target: dict[str, str] | None = start
        for line in lines:
            setting = _split_setting(line)
            if setting is None:
                continue
            key, value = setting
            if key == "match":
                criteria = value.split("#", 1)[0].split()
                target = in_match_all if [c.lower() for c in criteria] == ["all"] else None
                continue
            if target is None:
                continue  # a conditional Match block (includes too): not what every user gets
            if key == "include":
                for pattern in shlex.split(value):
                    full = pattern if pattern.startswith("/") else f"/etc/ssh/{pattern}"
                    for inc in sorted(glob.glob(full)):
                        walk(Path(inc), depth + 1, target)
                continue
            for wanted in keywords:
                if key == wanted.lower() and wanted not in target:
                    target[wanted] = value

    if not path.exists():
        raise FileNotFoundError(path)
    walk(path, 0, found)
    return {**found, **in_match_all}


def _expand(pattern: str, user: pwd.struct_passwd) -> Path:
    text = pattern.replace("%%", "\0").replace("%h", user.pw_dir).replace("%u", user.pw_name)
    text = text.replace("%U", str(user.pw_uid)).replace("\0", "%")
    if text.startswith("~/"):
        text = os.path.join(user.pw_dir, text[2:])
    return Path(text if text.startswith("/") else os.path.join(user.pw_dir, text))


def check_sshd(cfg: Config, user: pwd.struct_passwd, sshd_config: Path) -> list[Finding]:
    """AuthorizedKeysFile must include ours; PubkeyAuthentication must be on."""
    try:
        values = read_sshd_settings(sshd_config, ("AuthorizedKeysFile", "PubkeyAuthentication"))
    except FileNotFoundError:
        return [Finding("sshd-config", False, f"{sshd_config} not found: is OpenSSH server installed?",
                        "apt-get install openssh-server (or use `peerkit serve`)")]
    files = shlex.split(values.get("AuthorizedKeysFile", " ".join(_DEFAULT_AUTH_KEYS)))
    paths = [os.path.realpath(_expand(f, user)) for f in files if f.lower() != "none"]
    ours = os.path.realpath(cfg.ssh.authorized_keys)
    out = []
    if ours in paths:
        out.append(Finding("sshd-authorized-keys-file", True, f"sshd reads {cfg.ssh.authorized_keys}"))
    else:
        out.append(Finding("sshd-authorized-keys-file", False,
                           f"sshd reads {' '.join(files) or 'none'}, not {cfg.ssh.authorized_keys}: "
                           "peers' keys will never be seen",
                           f"set ssh.authorized_keys in {cfg.path} to one of them, or add it to "
                           f"AuthorizedKeysFile in {sshd_config}"))
    pubkey = values.get("PubkeyAuthentication", "yes").lower()
    out.append(Finding("sshd-pubkey-authentication", pubkey != "no",
                       f"PubkeyAuthentication {pubkey}",
                       None if pubkey != "no" else f"set PubkeyAuthentication yes in {sshd_config}"))
    return out


def _bad_mode(path: Path, user: pwd.struct_passwd) -> str | None:
    st = os.stat(path)
    if st.st_uid not in (0, user.pw_uid):
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_modes(cfg: Config, user: pwd.struct_passwd) -> list[Finding]:
    """sshd's StrictModes refuses keys behind group- or world-writable paths."""
    out = []
    for label, path in (("home", Path(user.pw_dir)), ("ssh-dir", cfg.ssh.authorized_keys.parent),
                        ("authorized-keys", cfg.ssh.authorized_keys)):
        if not path.exists():
            out.append(Finding(f"mode-{label}", True, f"{path} does not exist yet"))
            continue
        problem = _bad_mode(path, user)
        out.append(Finding(f"mode-{label}", problem is None, problem or f"{path} is private enough",
                           f"chmod go-w {path}; chown {user.pw_name} {path}" if problem else None))
    identity = cfg.ssh.identity
    if identity.exists():
        mode = stat.S_IMODE(identity.stat().st_mode)
        out.append(Finding("mode-identity", not mode & 0o077, f"{identity} is mode {mode:04o}",
                           f"chmod 600 {identity}" if mode & 0o077 else None))
    return out


def check_peer_shell(cfg: Config) -> Finding:
    """The forced command must exist at the configured absolute path."""
    path = cfg.peer_shell
    ok = path.is_file() and os.access(path, os.X_OK)
    return Finding("peer-shell", ok, f"{path} {'is' if ok else 'is not'} an executable file",
                   None if ok else f"install peerkit so that {path} exists, or set peer_shell in {cfg.path}")


def check_login_shell(user: pwd.struct_passwd) -> Finding:
    """Forced commands run through the login shell: it must run, and read nothing first."""
    shell = user.pw_shell or "/bin/sh"
    name = os.path.basename(shell)
    if name in _NO_LOGIN:
        return Finding("login-shell", False, f"login shell {shell} refuses every command, peer-shell included",
                       f"chsh -s /bin/sh {user.pw_name}")
    if name in _RC_SHELLS:
        rc = Path(user.pw_dir) / _RC_SHELLS[name]
        return Finding("login-shell", False,
                       f"login shell {shell} runs {rc} before every peer call: whatever can write "
                       "that file runs as this user each time a peer connects",
                       f"chsh -s /bin/sh {user.pw_name}", warning=True)
    return Finding("login-shell", True, f"login shell {shell} reads no rc file for forced commands")


def check_consistency(cfg: Config) -> list[Finding]:
    """Every peerkit key line has a peer row and every row a key line, with current paths."""
    try:
        lines = authkeys.read_authorized_keys(cfg.ssh.authorized_keys).peers()
    except OSError as exc:
        return [Finding("key-lines", False, f"cannot read {cfg.ssh.authorized_keys}: {exc}")]
    try:
        with PeerStore(cfg.db_path) as store:
            rows = {p.name: p for p in store.all()}
    except (StateError, Busy) as exc:  # damaged, or held by another process past the wait
        return [Finding("peer-rows", False, exc.message)]
    out = []
    orphans = sorted(set(lines) - set(rows))
    out.append(Finding("key-lines-without-peer", not orphans,
                       f"key lines with no peer record: {', '.join(orphans)}" if orphans
                       else "every peerkit key line has a peer record",
                       "peerkit unpair " + " ; peerkit unpair ".join(orphans) if orphans else None))
    missing = sorted(set(rows) - set(lines))
    out.append(Finding("peers-without-key-line", not missing,
                       f"peers whose key line is missing (they cannot call us): {', '.join(missing)}"
                       if missing else "every peer has its key line",
                       "re-pair them: peerkit pair --replace '<their token>'" if missing else None))
    stale = sorted(name for name, entry in lines.items() if name in rows and (
        "restrict" not in entry.options.split(",")
        or f'command="{cfg.peer_shell} --config {cfg.path} {name}"' not in entry.options))
    out.append(Finding("key-lines-current", not stale,
                       f"key lines with another forced command or without restrict: {', '.join(stale)}"
                       if stale else "every key line runs this peer-shell with this config, restricted",
                       "rewrite them: peerkit allow PEER --from any (or re-pair)" if stale else None))
    return out


async def check_host_key(cfg: Config, advertised: list[str]) -> Finding:
    """The host key our token advertises must be the one the sshd at ssh.host:ssh.port presents."""
    from .sshimport import asyncssh

    host, port = cfg.ssh.host, cfg.ssh.port
    try:
        key = await asyncio.wait_for(
            asyncssh.get_server_host_key(host, port, server_host_key_algs=["ssh-ed25519"], config=None),
            cfg.ssh.connect_timeout)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        return Finding("advertised-host-key", False, f"cannot reach sshd at {host}:{port}: {exc}",
                       "check ssh.host and ssh.port, and that sshd is running")
    if key is None:
        return Finding("advertised-host-key", False, f"sshd at {host}:{port} offered no ed25519 host key")
    seen = key.get_fingerprint("sha256")
    ok = seen in advertised
    return Finding("advertised-host-key", ok,
                   f"sshd at {host}:{port} presents {seen}" + ("" if ok else f"; our token advertises "
                                                              f"{', '.join(advertised) or 'nothing'}"),
                   None if ok else f"point ssh.host_keys in {cfg.path} at that sshd's public host key files")


async def diagnose(cfg: Config, *, sshd_config: Path = SSHD_CONFIG, probe: bool = True) -> list[Finding]:
    """Run every check; return the findings in a stable order."""
    from .pairing import advertised_host_keys

    user = pwd.getpwuid(os.geteuid())
    findings = check_sshd(cfg, user, sshd_config)
    findings += check_modes(cfg, user)
    findings.append(check_peer_shell(cfg))
    findings.append(check_login_shell(user))
    findings += check_consistency(cfg)
    if probe:
        fps, _ = advertised_host_keys(cfg)
        findings.append(await check_host_key(cfg, fps))
    return findings
