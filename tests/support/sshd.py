"""Throwaway system users, a private OpenSSH sshd and peerkit instances owned by those users.

Used by tests/integration (through pytest fixtures) and meant to be usable
from a benchmark script too, so this module never imports pytest.  Needs
root (useradd, sshd).  Everything lives under one temporary root made with
:func:`make_root`; nothing touches the system sshd, its config or its keys.

Typical use::

    root = make_root()
    alice = ThrowawayUser.create(root)
    bob = ThrowawayUser.create(root)
    with Sshd(root / "sshd", [alice.name, bob.name]) as server:
        a = PeerkitInstance(alice, "site-a", server).init()
        b = PeerkitInstance(bob, "site-b", server).init()
        pair_both_ways(a, b)
        print(b.ssh(a, "ping").stdout)
    alice.delete(); bob.delete()

:class:`EmbeddedServer` is the same for `peerkit serve`: one server process
per instance, run as the instance's owner on its own loopback port, with a
known_hosts file shared by all of them (a client pins its target's key)::

    serve = EmbeddedServer(root / "serve", alice)
    a = PeerkitInstance(alice, "site-a", serve).init()   # starts `peerkit serve`
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
LOOPBACK = "127.0.0.1"
# The tools the harness and the tests drive; all come from Debian's
# openssh-client, openssh-server, passwd, util-linux and tar packages.
CLIENT_TOOLS = ("ssh", "ssh-keygen", "sftp", "scp", "useradd", "usermod", "userdel", "runuser", "tar")
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
USER_COMMENT = "peerkit integration-test throwaway user"


class HarnessError(RuntimeError):
    """The test environment could not be set up or torn down."""


# -- prerequisites -----------------------------------------------------------

def missing_prerequisites(sshd: str = SSHD) -> list[str]:
    """Return why the harness cannot run here (empty if it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not running as root (needed for useradd and for sshd)")
    if not (os.path.isfile(sshd) and os.access(sshd, os.X_OK)):
        problems.append(f"{sshd} not found (apt-get install openssh-server)")
    for tool in CLIENT_TOOLS:
        if shutil.which(tool, path=_SYSTEM_PATH) is None:
            problems.append(f"{tool} not found on {_SYSTEM_PATH}")
    return problems


def venv_bin() -> Path:
    """Return the directory of the running interpreter (the venv's bin/, not resolved)."""
    return Path(sys.executable).parent


def make_root(prefix: str = "peerkit-it-") -> Path:
    """Create the harness's temporary root: mode 0755 so every throwaway user can traverse it."""
    # pytest's tmp_path is 0700 and owned by root: a user whose home lives
    # under it could not even reach its own home.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    (root / "home").mkdir(mode=0o755)
    os.chmod(root / "home", 0o755)
    return root


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_root(argv: Sequence[str], *, check: bool = True, timeout: float = 60,
             **kw: Any) -> subprocess.CompletedProcess:
    """Run a system tool as root with a fixed PATH; text output; raise HarnessError on failure."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env={"PATH": _SYSTEM_PATH, "LC_ALL": "C"}, **kw)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


# -- throwaway users -----------------------------------------------------------

@dataclass
class ThrowawayUser:
    """A system account made for one test session; delete() removes it and its home."""

    name: str
    uid: int
    gid: int
    home: Path

    @classmethod
    def create(cls, root: Path, prefix: str = "pk") -> "ThrowawayUser":
        """Create ``<prefix><random>`` with its home under ``root/home`` and a usable (unlocked) account."""
        for _ in range(10):
            name = prefix + secrets.token_hex(4)
            try:
                pwd.getpwnam(name)
            except KeyError:
                break
        else:  # pragma: no cover - 10 collisions of 32 random bits
            raise HarnessError("could not pick an unused user name")
        home = root / "home" / name
        run_root(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh",
                   "--comment", USER_COMMENT, name])
        user = None
        try:
            entry = pwd.getpwnam(name)
            user = cls(name, entry.pw_uid, entry.pw_gid, home)
            # useradd leaves '!' in the password field: a locked account, and
            # sshd (without PAM) refuses even key logins to locked accounts.
            # '*' means "no password can match" without locking the account.
            run_root(["usermod", "-p", "*", name])
            # StrictModes: the home must not be group- or world-writable.
            os.chmod(home, 0o755)
        except BaseException:
            if user is not None:
                user.delete()
            else:
                run_root(["userdel", "-r", name], check=False)
            raise
        return user

    def delete(self, timeout: float = 10) -> None:
        """Remove the account and its home (retrying while its last sshd session exits)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = run_root(["userdel", "-r", self.name], check=False)
            # 0: done; 6: no such user (already gone); 12: home not removed
            # (mail spool missing is only a warning, rc 0 on Debian).
            if proc.returncode in (0, 6):
                break
            if proc.returncode == 8 and time.monotonic() < deadline:
                # "user is currently used by process N": an sshd session child
                # or the last peer-shell is still exiting; give it a moment.
                time.sleep(0.1)
                continue
            if proc.returncode == 8:
                run_root(["userdel", "--force", "-r", self.name], check=False)
                break
            raise HarnessError(f"userdel -r {self.name} exited {proc.returncode}: {proc.stderr.strip()}")
        shutil.rmtree(self.home, ignore_errors=True)

    # -- running things as this user ---------------------------------------

    def env(self, extra_path: Iterable[str | os.PathLike] = (), **extra: str) -> dict[str, str]:
        """Return a minimal login-like environment for this user."""
        path = ":".join([*(str(p) for p in extra_path), "/usr/local/bin:/usr/bin:/bin"])
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": path,
                "SHELL": "/bin/sh", "LANG": "C.UTF-8", **extra}

    def _kwargs(self, env: dict[str, str] | None, cwd: str | os.PathLike | None) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups: the child has
        # exactly this user's identity, as it would after a login.
        return {"user": self.uid, "group": self.gid, "extra_groups": [],
                "env": self.env() if env is None else env,
                "cwd": str(self.home if cwd is None else cwd)}

    def run(self, argv: Sequence[str | bytes | os.PathLike], *, input: bytes | str | None = None,
            env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
            timeout: float = 60, check: bool = False, text: bool = False,
            stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.CompletedProcess:
        """Run ``argv`` as this user and wait for it (bytes arguments are passed through raw)."""
        argv = [a if isinstance(a, bytes) else str(a) for a in argv]
        stdin = subprocess.DEVNULL if input is None else None
        proc = subprocess.run(argv, input=input, stdin=stdin, stdout=stdout, stderr=stderr,
                              timeout=timeout, text=text, **self._kwargs(env, cwd))
        if check and proc.returncode != 0:
            err = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode("utf-8", "replace")
            shown = " ".join(a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in argv)
            raise HarnessError(f"as {self.name}: {shown} exited {proc.returncode}: {err.strip()}")
        return proc

    def popen(self, argv: Sequence[str | os.PathLike], *, env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None, **kw: Any) -> subprocess.Popen:
        """Start ``argv`` as this user (the caller waits for or kills it by its pid)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([str(a) for a in argv], **self._kwargs(env, cwd), **kw)

    def write_file(self, path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
        """Create or replace ``path`` as this user (so it owns it), with ``mode``, atomically."""
        script = 'umask 077 && cat > "$1.harness-tmp" && chmod "$2" "$1.harness-tmp" && mv -f "$1.harness-tmp" "$1"'
        self.run(["/bin/sh", "-c", script, "sh", str(path), f"{mode:o}"], input=data, check=True)

    def runuser(self, argv: Sequence[str | os.PathLike], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``argv`` through runuser(1), the way an operator would try it."""
        return run_root(["runuser", "-u", self.name, "--", *(str(a) for a in argv)],
                         check=False, timeout=timeout)


def check_runs_as(user: ThrowawayUser, executable: Path) -> str | None:
    """Return None if ``user`` can run ``executable --version``, else an explanation."""
    try:
        proc = user.runuser([executable, "--version"])
    except (OSError, subprocess.SubprocessError) as exc:
        output = str(exc)
    else:
        if proc.returncode == 0:
            return None
        output = (proc.stdout + proc.stderr).strip() or f"exit status {proc.returncode}"
    return (f"`runuser -u {user.name} -- {executable} --version` failed: {output}\n"
            f"sshd runs peer-shell as the paired account, so the test virtualenv must be created "
            f"from a system interpreter (python3 -m venv with /usr/bin/python3, not a per-user "
            f"pyenv/uv/conda Python) in a location every user can read and traverse "
            f"(e.g. /work/<repo>/.venv or /opt, not under /root or a 0700 home).")


# -- a private sshd ------------------------------------------------------------

class Sshd:
    """An sshd of our own: own host keys, own config, loopback only, logging to a file."""

    kind = "sshd"

    def __init__(self, workdir: str | os.PathLike, allow_users: Sequence[str], *,
                 sshd: str = SSHD, log_level: str = "VERBOSE",
                 extra_config: Sequence[str] = ()) -> None:
        if not allow_users:
            raise HarnessError("AllowUsers needs at least one user")
        self.sshd = sshd
        self.workdir = Path(workdir)
        self.allow_users = list(allow_users)
        self.log_level = log_level
        self.extra_config = list(extra_config)
        self.host = LOOPBACK
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.config_path = self.workdir / "sshd_config"
        self.pid_path = self.workdir / "sshd.pid"
        self.log_path = self.workdir / "sshd.log"
        self.known_hosts_path = self.workdir / "known_hosts"
        self.host_keys = {kind: self.workdir / f"ssh_host_{kind}_key" for kind in ("ed25519", "rsa")}

    # -- public key material the clients and peerkit configs need -----------

    @property
    def host_public_keys(self) -> list[Path]:
        return [path.with_name(path.name + ".pub") for path in self.host_keys.values()]

    def host_key_fingerprints(self) -> list[str]:
        """Return the SHA256 fingerprints of our host keys, as ssh-keygen -lf prints them."""
        out = []
        for pub in self.host_public_keys:
            line = run_root(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)]).stdout
            out.append(line.split()[1])
        return out

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "Sshd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 15, attempts: int = 5) -> None:
        """Generate keys, write and check the config, start sshd and wait for its banner."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Readable by the throwaway users: they read the public host keys
        # (peerkit advertises them) and the known_hosts file.
        os.chmod(self.workdir, 0o755)
        self._ensure_privsep_dir()
        self._make_host_keys()
        last_error = ""
        for _ in range(attempts):
            self.port = free_port(self.host)
            self._write_config()
            self._write_known_hosts()
            check = run_root([self.sshd, "-t", "-f", str(self.config_path)], check=False)
            if check.returncode != 0:
                raise HarnessError(f"sshd -t rejected {self.config_path}: {check.stderr.strip()}")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.config_path)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             env={"PATH": _SYSTEM_PATH}, start_new_session=True)
            if self._wait_for_banner(timeout):
                return
            last_error = self.log_text()[-2000:]
            self._terminate()  # most likely the port was taken in between: retry on another
        raise HarnessError(f"sshd did not start after {attempts} attempts; its log ends with:\n{last_error}")

    def stop(self) -> None:
        """Stop sshd (sessions still open end when their clients disconnect)."""
        self._terminate()

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    @staticmethod
    def _ensure_privsep_dir() -> None:
        # sshd refuses to start without its privilege-separation directory;
        # the system service creates it at boot, but it is not running here.
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.chmod(PRIVSEP_DIR, 0o755)

    def _make_host_keys(self) -> None:
        for kind, path in self.host_keys.items():
            if path.exists():
                continue
            bits = ["-b", "2048"] if kind == "rsa" else []
            run_root(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", f"peerkit-it-host-{kind}",
                       "-f", str(path)])
            os.chmod(path, 0o600)
            os.chmod(path.with_name(path.name + ".pub"), 0o644)

    def config_text(self) -> str:
        """Return the sshd_config we run with."""
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            *(f"HostKey {path}" for path in self.host_keys.values()),
            f"PidFile {self.pid_path}",
            "UsePAM no",
            "StrictModes yes",
            "PermitRootLogin no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys",
            f"AllowUsers {' '.join(self.allow_users)}",
            # An sftp server that would work, so a refusal proves the key
            # line's forced command does the work, not a missing subsystem.
            "Subsystem sftp internal-sftp",
            # Server-wide permissive: every refusal the tests see must come
            # from the authorized_keys line ("restrict"), not from here.
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "AllowAgentForwarding yes",
            "X11Forwarding yes",
            "PermitTTY yes",
            "PermitUserRC yes",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            f"LogLevel {self.log_level}",
            *self.extra_config,
        ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.config_path.write_text(self.config_text(), encoding="ascii")
        os.chmod(self.config_path, 0o644)

    def known_hosts_text(self) -> str:
        """Return known_hosts lines that pin our host keys for [127.0.0.1]:port."""
        lines = []
        for pub in self.host_public_keys:
            kind, b64 = pub.read_text(encoding="ascii").split()[:2]
            lines.append(f"[{self.host}]:{self.port} {kind} {b64}")
        return "\n".join(lines) + "\n"

    def _write_known_hosts(self) -> None:
        self.known_hosts_path.write_text(self.known_hosts_text(), encoding="ascii")
        os.chmod(self.known_hosts_path, 0o644)

    def _wait_for_banner(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    if sock.recv(256).startswith(b"SSH-2.0-"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    # -- the log -------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Return the current end of the log (pass to log_since)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def wait_for_log(self, offset: int, needle: str, timeout: float = 5) -> str:
        """Wait until ``needle`` appears in the log after ``offset``; return that part of the log."""
        wait_until(lambda: needle in self.log_since(offset), timeout)
        return self.log_since(offset)


# -- peerkit serve ---------------------------------------------------------------

SERVE_HOST_KEY = "ssh_host_ed25519_key"  # under the instance's state_dir (Config.serve_host_key)
# The per-source failure limit of `peerkit serve` counts every connection
# that never authenticated, and every test client comes from 127.0.0.1: the
# refusal tests alone would lock the address out.  Instances get a limit no
# test reaches unless it configures its own (tests/integration/test_serve.py).
HARNESS_MAX_AUTH_FAILURES = 1_000_000


class EmbeddedServer:
    """`peerkit serve` for one instance, run as the instance's owner: the embedded counterpart of :class:`Sshd`.

    Same attributes the tests use from Sshd (``kind``, ``host``, ``port``,
    ``known_hosts_path``, ``host_public_keys``, ``host_key_fingerprints()``,
    ``stop()``, the ``log_*`` methods over the server's stderr), but the port
    and host key are the instance's own.  The port is picked when the object
    is made, so ``peerkit init --port`` can record it; :meth:`attach` (called
    by :meth:`PeerkitInstance.init`) points the config at it and starts the
    server, which generates its host key under state_dir on that first
    start.  ``known_hosts`` is shared by every server made with the same
    path, so any instance's OpenSSH client can reach any other's server.
    """

    kind = "serve"

    def __init__(self, workdir: str | os.PathLike, user: ThrowawayUser, *,
                 known_hosts_path: str | os.PathLike | None = None, bin_dir: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.user = user
        self.host = LOOPBACK
        self.port: int = free_port(self.host)
        self.bin_dir = bin_dir or venv_bin()
        self.known_hosts_path = Path(known_hosts_path) if known_hosts_path else self.workdir / "known_hosts"
        self.log_path = self.workdir / f"serve-{user.name}.log"
        self.instance: "PeerkitInstance | None" = None
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.user.name} on {self.host}:{self.port}>"

    # -- key material -------------------------------------------------------------

    @property
    def host_key(self) -> Path:
        if self.instance is None:
            raise HarnessError("the server is not attached to an instance yet")
        return self.instance.state_dir / SERVE_HOST_KEY

    @property
    def host_public_keys(self) -> list[Path]:
        return [self.host_key.with_name(SERVE_HOST_KEY + ".pub")]

    def host_key_fingerprints(self) -> list[str]:
        return [run_root(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)]).stdout.split()[1]
                for pub in self.host_public_keys]

    def configure(self, data: dict[str, Any]) -> None:
        """Point an instance's config data at this server: port, host key, harness limits."""
        data["ssh"]["port"] = self.port
        data["ssh"]["host"] = self.host
        state_dir = data["state_dir"]
        data["ssh"]["host_keys"] = [f"{state_dir.rstrip('/')}/{SERVE_HOST_KEY}.pub"]
        data.setdefault("serve", {})["max_auth_failures"] = HARNESS_MAX_AUTH_FAILURES

    def attach(self, instance: "PeerkitInstance") -> None:
        """Serve ``instance`` (its config written by init, pointing here) and start."""
        self.instance = instance
        self.start()

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 20, attempts: int = 5) -> None:
        """Start `peerkit serve` as the owner and wait until it listens; retry on a taken port."""
        if self.instance is None:
            raise HarnessError("attach() the server to an instance first")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        last = ""
        for attempt in range(attempts):
            if attempt:  # the port was taken in between: move, and tell the config
                self.port = free_port(self.host)
                self.instance.set_config(lambda data: data["ssh"].__setitem__("port", self.port))
            offset = self.log_offset()
            with open(self.log_path, "ab") as log:
                self.proc = self.user.popen(
                    [self.instance.peerkit, "--config", self.instance.config_path, "serve",
                     "--listen", self.host, "--port", str(self.port)],
                    env=self.user.env(extra_path=[self.bin_dir]), stdout=log, stderr=log,
                    start_new_session=True)
            # Readiness from the server's own line: a probing TCP connection
            # would count as a failed authentication from 127.0.0.1.
            ready = f"listening on {self.host}:{self.port} "
            if wait_until(lambda: ready in self.log_since(offset) or self.proc.poll() is not None, timeout) \
                    and self.proc.poll() is None:
                self._write_known_hosts()
                return
            last = self.log_since(offset)[-2000:]
            self._terminate()
            if "cannot listen" not in last:
                break
        raise HarnessError(f"peerkit serve for {self.user.name} did not start; its log ends with:\n{last}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop the server with ``sig``; return its exit status (None if it was not running)."""
        return self._terminate(sig, timeout)

    def restart(self) -> None:
        """Stop and start again (after a change to the config's serve: section)."""
        self.stop()
        self.start()

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def __enter__(self) -> "EmbeddedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_known_hosts(self) -> None:
        kind, b64 = self.host_public_keys[0].read_text(encoding="ascii").split()[:2]
        prefix = f"[{self.host}]:{self.port} "
        try:
            lines = self.known_hosts_path.read_text(encoding="ascii").splitlines()
        except FileNotFoundError:
            lines = []
        lines = [line for line in lines if not line.startswith(prefix)] + [f"{prefix}{kind} {b64}"]
        self.known_hosts_path.write_text("\n".join(lines) + "\n", encoding="ascii")
        os.chmod(self.known_hosts_path, 0o644)

    # -- the server's stderr -------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


# -- ssh clients ---------------------------------------------------------------

def ssh_options(identity: str | os.PathLike, known_hosts: str | os.PathLike) -> list[str]:
    """Return the hermetic client options every OpenSSH client call uses."""
    return [
        "-F", "/dev/null",  # no ~/.ssh/config or /etc/ssh/ssh_config surprises
        "-i", str(identity),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "BatchMode=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "ConnectTimeout=10",
        "-o", "LogLevel=ERROR",
    ]


# -- peerkit instances -----------------------------------------------------------

class CliFailed(HarnessError):
    """A peerkit CLI call failed."""

    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess) -> None:
        self.proc = proc
        super().__init__(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()} {proc.stdout.strip()}")


class PeerkitInstance:
    """A peerkit instance owned by a throwaway user, driven through the real CLI."""

    def __init__(self, user: ThrowawayUser, name: str, sshd: "Sshd | EmbeddedServer",
                 bin_dir: Path | None = None) -> None:
        self.user = user
        self.name = name
        # The server peers reach this instance through: the shared private
        # sshd, or this instance's own `peerkit serve` (an EmbeddedServer).
        self.sshd = sshd
        self.bin_dir = bin_dir or venv_bin()
        self.peerkit = self.bin_dir / "peerkit"
        self.peer_shell = self.bin_dir / "peer-shell"
        self.config_path = user.home / ".config" / "peerkit" / "config.yaml"
        self.settings: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<PeerkitInstance {self.name} as {self.user.name}>"

    # -- paths, from the config as written -----------------------------------

    def _path(self, value: str) -> Path:
        if value == "~" or value.startswith("~/"):
            return self.user.home / value[2:]
        path = Path(value)
        return path if path.is_absolute() else self.user.home / path

    @property
    def identity(self) -> Path:
        return self._path(self.settings["ssh"]["identity"])

    @property
    def authorized_keys(self) -> Path:
        return self._path(self.settings["ssh"]["authorized_keys"])

    @property
    def state_dir(self) -> Path:
        return self._path(self.settings["state_dir"])

    @property
    def apps_dir(self) -> Path:
        return self._path(self.settings["apps_dir"])

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "peer-shell.log"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "peers.db"

    def owner_sql(self, body: str, *args: str) -> None:
        """As the owner, run ``body`` (Python using ``con`` and ``args``) in one transaction on the peer database."""
        script = "import json, sqlite3, sys\nargs = sys.argv[2:]\ncon = sqlite3.connect(sys.argv[1])\nwith con:\n" + \
            "".join(f"    {line}\n" for line in body.strip().splitlines())
        proc = self.user.run([sys.executable, "-c", script, str(self.db_path), *args], text=True)
        if proc.returncode != 0:
            raise HarnessError(f"SQL as {self.user.name} failed: {proc.stderr[-500:]}")

    def set_recorded_features(self, peer: str, features: list[str] | None) -> None:
        """Record ``features`` as what ``peer``'s last ping offered (None: as never pinged); the next pull plans by them."""
        if features is None:
            self.owner_sql("con.execute(\"UPDATE peers SET config_json = json_remove(config_json, '$.features') "
                           "WHERE name = ?\", (args[0],))", peer)
        else:
            self.owner_sql("con.execute(\"UPDATE peers SET config_json = json_set(config_json, '$.features', "
                           "json(?)) WHERE name = ?\", (args[1], args[0]))", peer, json.dumps(features))

    # -- the CLI -----------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> tuple[subprocess.CompletedProcess, dict | None]:
        """Run ``peerkit --json ARGS`` as the owner; return the process and its JSON result."""
        argv = [str(self.peerkit), "--json", *args]
        proc = self.user.run(argv, env=self.user.env(extra_path=[self.bin_dir]), text=True)
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if check and (proc.returncode != 0 or not isinstance(result, dict) or not result.get("ok")):
            raise CliFailed(argv, proc)
        return proc, result

    @property
    def server(self) -> "Sshd | EmbeddedServer":
        """The server peers reach us through (an alias of ``sshd``, which may be `peerkit serve`)."""
        return self.sshd

    def init(self) -> "PeerkitInstance":
        """`peerkit init` as the owner, then pin our server's host keys in the config.

        With an :class:`EmbeddedServer` this also starts our `peerkit serve`
        (before any token is made, so the token advertises its host key).
        """
        self.cli("init", "--name", self.name, "--host", self.sshd.host, "--port", str(self.sshd.port),
                 "--user", self.user.name)

        def pin(data: dict) -> None:
            data["peer_shell"] = str(self.peer_shell)
            if isinstance(self.sshd, EmbeddedServer):
                self.sshd.configure(data)
            else:
                # init writes the system host key (/etc/ssh/...); ours are elsewhere.
                data["ssh"]["host_keys"] = [str(p) for p in self.sshd.host_public_keys]

        self.set_config(pin)
        if isinstance(self.sshd, EmbeddedServer):
            self.sshd.attach(self)
        return self

    def set_config(self, change) -> dict:
        """Apply ``change(data)`` to the config file (written as the owner); return the new data."""
        import yaml  # a peerkit dependency; imported late so the module loads without it

        data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        change(data)
        text = "# peerkit instance configuration (integration-test harness)\n"
        text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
        self.user.write_file(self.config_path, text.encode("utf-8"), mode=0o600)
        self.settings = data
        return data

    def token(self) -> str:
        return self.cli("token")[1]["token"]

    def pair(self, token: str, *args: str) -> dict:
        return self.cli("pair", token, *args)[1]

    def unpair(self, peer: str) -> dict:
        return self.cli("unpair", peer)[1]

    def peers(self) -> list[dict]:
        return self.cli("peers")[1]["peers"]

    # -- calling another instance over SSH ------------------------------------

    def ssh_argv(self, target: "PeerkitInstance", *command: str | bytes,
                 options: Sequence[str] = ()) -> list[str | bytes]:
        """Return the `ssh` command line that calls ``target`` with our identity."""
        return ["ssh", *ssh_options(self.identity, self.sshd.known_hosts_path),
                "-p", str(target.sshd.port), *options,
                f"{target.user.name}@{target.sshd.host}", *command]

    def ssh(self, target: "PeerkitInstance", *command: str | bytes, options: Sequence[str] = (),
            timeout: float = 30, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess:
        """Run `ssh ... target COMMAND` as our owner; stdout and stderr as bytes."""
        return self.user.run(self.ssh_argv(target, *command, options=options), timeout=timeout, stdout=stdout)

    def audit_events(self) -> list[dict]:
        """Return every line of our peer-shell audit log, parsed (a bad line raises)."""
        try:
            data = self.audit_log.read_bytes()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in data.decode("ascii").splitlines()]


def pair_both_ways(a: PeerkitInstance, b: PeerkitInstance) -> None:
    """B's token is paired on A (B may call A), then A's on B."""
    a.pair(b.token())
    b.pair(a.token())
