"""Incremental transfers with rsync over the same pinned SSH key.

Client side: rsync runs with OpenSSH as its transport, configured from the
peer's record alone (our identity only, the recorded host key pinned, no
agent, no forwarding, no user ssh config).  The copy lands in a staging
directory seeded by ``--link-dest`` against the live app: unchanged files are
hard links, changed files are new files, and the live app is never written.

Server side (peer-shell): the request was validated by ``rsyncargs``; the
command run is rebuilt from it with our absolute path and ``--``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path

from .client import StreamResult, encryption_algs, raise_remote, remote_error
from .config import Config
from .errors import PeerkitError, TransferIncomplete
from .state import Peer

RSYNC_PATH = "/usr/local/bin:/usr/bin:/bin"
_RECEIVED = re.compile(rb"Total bytes received: ([0-9,]+)")
_SENT = re.compile(rb"Total bytes sent: ([0-9,]+)")


def rsync_binary() -> str | None:
    """Return the path of rsync, or None when it is not installed."""
    return shutil.which("rsync", path=RSYNC_PATH)


def _ssh_config(cfg: Config, peer: Peer, directory: Path) -> Path:
    """Write a private ssh_config that reaches ``peer`` exactly as the asyncssh client does."""
    host_key = peer.config.get("host_key")
    if not host_key:
        raise PeerkitError(f"no host key recorded for {peer.name} yet; run `peerkit ping {peer.name}`")
    alias = f"peerkit-{peer.name}"
    known = directory / "known_hosts"
    known.write_text(f"{alias} {host_key}\n", encoding="ascii")
    ciphers = ",".join(c for c in encryption_algs() if "@openssh.com" in c or c.endswith("-ctr"))
    lines = [
        f"Host {alias}",
        f"  HostName {peer.config['host']}",
        f"  Port {peer.config['port']}",
        f"  User {peer.config['user']}",
        f'  IdentityFile "{cfg.ssh.identity}"',
        "  IdentitiesOnly yes", "  IdentityAgent none", "  BatchMode yes",
        "  PasswordAuthentication no", "  KbdInteractiveAuthentication no",
        # The host key recorded (and checked against the token's pins) by
        # the asyncssh client; nothing else is accepted.
        "  StrictHostKeyChecking yes", f'  UserKnownHostsFile "{known}"', "  GlobalKnownHostsFile /dev/null",
        f"  HostKeyAlias {alias}", "  UpdateHostKeys no", "  CheckHostIP no",
        "  ForwardAgent no", "  ForwardX11 no", "  ClearAllForwardings yes", "  ControlMaster no",
        "  ControlPath none", "  PermitLocalCommand no", "  LogLevel ERROR",
        f"  ConnectTimeout {cfg.ssh.connect_timeout}", "  ServerAliveInterval 15", "  ServerAliveCountMax 4",
        f"  Ciphers {ciphers}",
    ]
    path = directory / "ssh_config"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def client_argv(rsync: str, ssh_config: Path, remote: str, local: str, *, pull: bool,
                link_dest: Path | None) -> list[str]:
    """Return the rsync command line the client runs."""
    argv = [rsync, "-rlptH", "--numeric-ids", "--stats", "-e", f"ssh -F {ssh_config}"]
    if os.geteuid() == 0:
        argv.insert(2, "-og")  # owners only mean something when we are root
    if pull:
        if link_dest is not None:
            argv.append(f"--link-dest={link_dest}")
    else:
        argv.append("--delete")
    return argv + ["--", remote, local]


async def run_client(cfg: Config, peer: Peer, app: str, staging: Path, live: Path | None) -> int:
    """Pull ``app`` from ``peer`` into ``staging`` with rsync; return the bytes received."""
    out, _ = await _run(cfg, peer, lambda rsync, ssh_config: client_argv(
        rsync, ssh_config, f"peerkit-{peer.name}:{app}/", f"{staging}/", pull=True, link_dest=live))
    match = _RECEIVED.search(out)
    return int(match.group(1).replace(b",", b"")) if match else 0


async def run_push(cfg: Config, peer: Peer, app: str, live: Path) -> tuple[int, bytes]:
    """Push our ``app`` to ``peer`` with rsync; return the bytes sent and rsync's stderr."""
    out, err = await _run(cfg, peer, lambda rsync, ssh_config: client_argv(
        rsync, ssh_config, f"{live}/", f"peerkit-{peer.name}:{app}/", pull=False, link_dest=None))
    return parse_sent(out), err


async def _run(cfg: Config, peer: Peer, make_argv) -> tuple[bytes, bytes]:
    """Run the rsync client built by ``make_argv(rsync, ssh_config)``; raise if it fails."""
    rsync = rsync_binary()
    if rsync is None:
        raise PeerkitError("rsync is not installed")
    with tempfile.TemporaryDirectory(prefix="peerkit-rsync-") as tmp:
        argv = make_argv(rsync, _ssh_config(cfg, peer, Path(tmp)))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": RSYNC_PATH, "LC_ALL": "C"})
        try:
            out, err = await proc.communicate()
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
    if proc.returncode != 0:
        code = remote_error(err)
        if code is not None:
            # peer-shell refused or failed and said why on stderr.
            raise_remote(peer.name, StreamResult(proc.returncode, 0, err, code))
        raise TransferIncomplete(f"rsync exited {proc.returncode}: {err.decode('utf-8', 'replace')[-300:]}")
    return out, err


def parse_sent(stats: bytes) -> int:
    """Return "Total bytes sent" from rsync --stats output (0 if absent)."""
    match = _SENT.search(stats)
    return int(match.group(1).replace(b",", b"")) if match else 0
