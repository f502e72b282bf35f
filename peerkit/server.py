"""peerkit serve: an SSH server that does exactly what peerkit's key lines allow, and nothing else.

For hosts where the system sshd cannot be used (rootless installs,
containers, shared hosts).  It authenticates only keys from the instance's
peerkit lines in authorized_keys, read afresh on every login, and honours
their options as OpenSSH would: ``from=`` (source addresses),
``expiry-time=``, and ``command=``, which must be peer-shell's own form and
is served in-process by the same dispatcher sshd runs.  Only session
channels with an exec request are accepted; pty, shell, subsystems (sftp),
environment variables, agent and X11 forwarding and every kind of port
forwarding are refused.

Limits against abuse: a cap on concurrent connections, on concurrent
sessions per peer, an authentication timeout, and a per-source limit on
failed authentications; each refusal is written to the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import functools
import ipaddress
import os
import shlex
import socket
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Callable

from .sshimport import asyncssh

from . import audit, authkeys, shell
from .config import Config
from .errors import PeerkitError

WINDOW = 16 << 20
MAX_PACKET = 256 << 10
_CHUNK = 256 << 10


@dataclass(frozen=True)
class Limits:
    """Abuse limits of the embedded server."""

    max_connections: int = 64
    max_sessions_per_peer: int = 4
    auth_timeout: float = 30.0
    max_auth_failures: int = 10
    failure_window: float = 600.0


def ensure_host_key(cfg: Config) -> asyncssh.SSHKey:
    """Load the server's host key, generating it (0600) on first start."""
    from .identity import ensure_identity

    path = cfg.serve_host_key
    ensure_identity(path, f"peerkit-serve:{cfg.name}")
    return asyncssh.read_private_key(str(path))


# -- OpenSSH key options -----------------------------------------------------

def _has_host_bits(pattern: str) -> bool:
    try:
        ipaddress.ip_network(pattern, strict=True)
    except ValueError:
        return True
    return False


def source_allowed(patterns: str, address: str) -> bool:
    """Match ``address`` against a from= pattern list the way sshd does."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        # As sshd does: an IPv4 client on a dual-stack socket is its IPv4
        # address, or "!10.0.0.5" would not refuse "::ffff:10.0.0.5".
        ip = ip.ipv4_mapped
        address = str(ip)
    allowed = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        try:
            network = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            network = None
        if network is not None:
            if _has_host_bits(pattern):
                # sshd rejects the whole list over a block with host bits set
                # ("inconsistent mask length"): a typo must not widen access.
                return False
            hit = ip in network
        else:
            # Wildcard patterns apply to the address text; host names are
            # never resolved (the source controls its reverse DNS).
            hit = fnmatch.fnmatchcase(address, pattern)
        if hit and negated:
            return False  # a negated match refuses, whatever else matches
        allowed = allowed or hit
    return allowed


def expired(stamp: str, now: datetime | None = None) -> bool:
    """Tell whether an expiry-time= value lies in the past (Z = UTC, else local time)."""
    utc = stamp.endswith("Z")
    digits = stamp[:-1] if utc else stamp  # one Z, as sshd reads it ("…ZZ" is malformed)
    fmt = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}.get(len(digits))
    if fmt is None or not (digits.isascii() and digits.isdigit()):
        return True  # an unreadable expiry fails closed
    try:
        when = datetime.strptime(digits, fmt)
    except ValueError:
        return True  # digits, but no date (month 13, second 60): fails closed too
    when = when.replace(tzinfo=timezone.utc) if utc else when.astimezone()
    return (now or datetime.now(timezone.utc)) >= when


def parse_options(options: str) -> dict[str, str]:
    """Split an authorized_keys option string into {name: value} (flags map to '')."""
    out: dict[str, str] = {}
    lexer = shlex.shlex(options, posix=True)
    lexer.whitespace = ","
    lexer.whitespace_split = True
    lexer.commenters = ""
    for item in lexer:
        name, _, value = item.partition("=")
        out[name.lower()] = value
    return out


@dataclass(frozen=True)
class Grant:
    """What an authenticated key may run: peer-shell for one peer, with one config."""

    peer: str
    config_path: str


@functools.lru_cache(maxsize=1024)
def _parsed_options(options: str) -> MappingProxyType:
    # Asked at every authentication, of the same few lines: a pure function
    # of the option text (the file itself is read afresh each time).
    return MappingProxyType(parse_options(options))


def find_grant(cfg: Config, key_b64: str, address: str) -> tuple[Grant | None, str]:
    """Return the grant of the key line matching ``key_b64`` for ``address``, or why there is none."""
    lines = authkeys.read_authorized_keys(cfg.ssh.authorized_keys)
    for _, entry in lines.entries():
        if entry.b64 != key_b64 or entry.peer is None:
            continue
        options = _parsed_options(entry.options)
        # Exactly what sshd would refuse: another source, a past expiry.
        if "from" in options and not source_allowed(options["from"], address):
            return None, "source address not allowed by from="
        if "expiry-time" in options and expired(options["expiry-time"]):
            return None, "key expired (expiry-time=)"
        words = options.get("command", "").split(" ")
        # Only peer-shell's own forced command is served; anything else in
        # command= (another program, a wrapper around peer-shell) is not ours
        # to interpret: sshd would run it, and serving plain peer-shell
        # instead would drop whatever it was put there for.
        if (len(words) != 4 or words[0] != str(cfg.peer_shell) or words[1] != "--config"
                or words[3] != entry.peer):
            return None, "key line has no peer-shell forced command"
        return Grant(entry.peer, words[2]), "ok"
    return None, "key not authorized"


# -- the server ----------------------------------------------------------------

class _State:
    """Counters shared by every connection of one server."""

    def __init__(self, cfg: Config, limits: Limits) -> None:
        self.cfg = cfg
        self.limits = limits
        self.connections = 0
        self.live: set[_Server] = set()  # counted connections, closed on shutdown
        self.sessions: dict[str, int] = defaultdict(int)
        self.failures: dict[str, deque[float]] = defaultdict(deque)
        # The config (by its text) and peers.db connections, kept between
        # requests: one set for the worker threads, one for the event loop.
        self.cache = shell.Cache()
        self.loop_cache = shell.Cache(in_loop=True)

    def log(self, **fields: Any) -> None:
        with contextlib.suppress(OSError):
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            audit.record(self.cfg.audit_log, server="peerkit-serve", **fields)

    def blocked(self, address: str) -> bool:
        times = self.failures[address]
        while times and time.monotonic() - times[0] > self.limits.failure_window:
            times.popleft()
        return len(times) >= self.limits.max_auth_failures


class _Server(asyncssh.SSHServer):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = "?"
        self.port = 0
        self.local = ("?", 0)
        self.grant: Grant | None = None
        self.counted = False
        self.at_capacity = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.address, self.port = conn.get_extra_info("peername")[:2]
        self.local = conn.get_extra_info("sockname")[:2]
        state = self.state
        # A source that keeps failing is cut off before any key exchange work.
        if state.blocked(self.address):
            state.log(client=self.address, client_port=self.port, verb="connect", outcome="refused",
                      reason="too many failed authentications from this address")
            conn.close()
            return
        if state.connections >= state.limits.max_connections:
            state.log(client=self.address, client_port=self.port, verb="connect", outcome="refused",
                      reason=f"connection limit {state.limits.max_connections} reached")
            # Turned away for lack of room, not for failing: a peer that
            # retries while we are full must not lock itself out.
            self.at_capacity = True
            conn.close()
            return
        state.connections += 1
        state.live.add(self)
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.state.connections -= 1
            self.state.live.discard(self)
            self.counted = False
        if self.grant is None and self.conn is not None and not self.at_capacity:
            # Never authenticated: a failure of this source (scanners,
            # revoked keys, guessing).
            self.state.failures[self.address].append(time.monotonic())

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        cfg = self.state.cfg
        blob = key.public_data
        # Only the login name our token advertises, like sshd's user lookup.
        if username != cfg.ssh.user:
            self.state.log(client=self.address, client_port=self.port, verb="auth", outcome="refused",
                           reason="unknown user", user=audit.clean(username, 64))
            return False
        grant, why = find_grant(cfg, base64.b64encode(blob).decode("ascii"), self.address)
        if grant is None:
            self.state.log(client=self.address, client_port=self.port, verb="auth", outcome="refused",
                           reason=why, key=key.get_fingerprint("sha256"))
            return False
        self.grant = grant
        return True

    def session_requested(self) -> Any:
        assert self.conn is not None and self.grant is not None
        state = self.state
        peer = self.grant.peer
        if state.sessions[peer] >= state.limits.max_sessions_per_peer:
            state.log(peer=peer, client=self.address, client_port=self.port, verb="session",
                      outcome="refused", reason=f"session limit {state.limits.max_sessions_per_peer} reached")
            return False
        chan = self.conn.create_server_channel(encoding=None, window=WINDOW, max_pktsize=MAX_PACKET)
        # Environment requests are refused: nothing of the client's
        # environment may reach peer-shell (LD_PRELOAD, PATH, ...).
        chan._process_env_request = _refuse_env  # type: ignore[attr-defined]
        # A pty, X11 or agent request is refused by asyncssh itself (the
        # server is started without them); each attempt is audited too.
        for handler, verb in (("_process_pty_req_request", "pty"), ("_process_x11_req_request", "x11"),
                              ("_process_auth_agent_req_at_openssh_dot_com_request", "agent")):
            setattr(chan, handler, self._audited(getattr(chan, handler), verb))
        # Counted from the channel's opening, not from its command: a client
        # could otherwise open many channels first and start them all after.
        state.sessions[peer] += 1
        session = _Session(self)
        session.counted = True
        return chan, session

    def _audited(self, handler: Callable[[Any], Any], verb: str) -> Callable[[Any], Any]:
        def audited(packet: Any) -> Any:
            granted = handler(packet)
            if not granted:
                self.refuse(verb, f"{verb} request")
            return granted
        return audited

    def refuse(self, verb: str, reason: str) -> bool:
        """Audit a request a paired peer may not make, and refuse it."""
        fields: dict[str, Any] = {"peer": self.grant.peer} if self.grant is not None else {}
        self.state.log(**fields, client=self.address, client_port=self.port, verb=verb,
                       outcome="refused", reason=reason)
        return False

    # Port forwarding would turn a paired peer into a tunnel into our network.
    def connection_requested(self, *args: Any) -> bool:
        return self.refuse("forward", "direct-tcpip (ssh -L, -D)")

    def server_requested(self, *args: Any) -> bool:
        return self.refuse("forward", "tcpip-forward (ssh -R)")

    def unix_connection_requested(self, *args: Any) -> bool:
        return self.refuse("forward", "direct-streamlocal (ssh -L to a socket)")

    def unix_server_requested(self, *args: Any) -> bool:
        return self.refuse("forward", "streamlocal-forward (ssh -R from a socket)")


def _drain(fd: int) -> bytes:
    """Return what a non-blocking pipe holds (its writer closed)."""
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def _refuse_env(packet: Any) -> bool:
    packet.get_string()
    packet.get_string()
    return False


class _Session(asyncssh.SSHServerSession):
    """One exec request, served by peer-shell's dispatcher in a worker thread (a ping: in the event loop)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.chan: asyncssh.SSHServerChannel | None = None
        self.command: str | None = None
        self.socks: list[socket.socket] = []
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.writable = asyncio.Event()
        self.writable.set()
        self.tasks: list[asyncio.Task] = []
        self.counted = False  # holds one of the peer's sessions until connection_lost

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def pty_requested(self, *args: Any) -> bool:
        return False  # never reached: asyncssh refuses a pty first (allow_pty=False)

    # A shell or a subsystem (sftp) would be a way around peer-shell's verbs;
    # each refusal is audited, as sshd logs them.
    def shell_requested(self) -> bool:
        return self.server.refuse("shell", "shell request")

    def subsystem_requested(self, subsystem: str) -> bool:
        return self.server.refuse("subsystem", f"subsystem {audit.clean(subsystem, 64)}")

    def break_received(self, msec: int) -> bool:
        return False

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def session_started(self) -> None:
        loop = asyncio.get_running_loop()
        server = self.server
        grant = server.grant
        assert grant is not None and self.chan is not None
        env = {"SSH_CONNECTION": f"{server.address} {server.port} {server.local[0]} {server.local[1]}"}
        if self.command == "ping" and self._answer_here(grant, env):
            return
        ours, theirs = zip(*(socket.socketpair() for _ in range(3)))
        for sock in ours:
            sock.setblocking(False)
        self.socks = list(ours)
        fds = [s.detach() for s in theirs]
        cache = server.state.cache

        def work() -> int:
            try:
                return shell.serve(grant.config_path, grant.peer, self.command, env, *fds, cache=cache)
            except Exception:  # noqa: BLE001 - a crash must not kill the server
                return 1
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

        self.worker = loop.run_in_executor(None, work)
        self.tasks = [asyncio.ensure_future(self._feed_stdin()),
                      asyncio.ensure_future(self._relay(self.socks[1], self.chan.write)),
                      asyncio.ensure_future(self._relay(self.socks[2], self.chan.write_stderr)),
                      asyncio.ensure_future(self._finish())]

    def _answer_here(self, grant: Grant, env: dict[str, str]) -> bool:
        """Serve a ping in the event loop; False: peers.db was busy, so a worker thread must.

        A ping reads a small file, one peers.db row and appends one audit
        line, and writes less than a kilobyte: less work than the hop to a
        worker thread, three socket pairs and four relay tasks that any
        other verb needs (with the caches, a quarter of a server's CPU per
        ping; README, Benchmarks).  Only waiting on peers.db could hold
        up the loop, and the loop's lookups never wait (shell.Cache).  The
        pipes are non-blocking: output beyond their 64 KiB would make the
        request fail, never stall the loop.
        """
        assert self.chan is not None
        fds: list[int] = []  # closed once each: another thread may reuse a number at once
        try:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(stdin)
            out_r, out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fds += (out_r, out_w)
            err_r, err_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            fds += (err_r, err_w)
            try:
                status = shell.serve(grant.config_path, grant.peer, self.command, env,
                                     stdin, out_w, err_w, cache=self.server.state.loop_cache)
            except shell.Deferred:
                return False
            except Exception:  # noqa: BLE001 - a crash must not kill the server
                status = 1
            for fd in (out_w, err_w):
                fds.remove(fd)
                os.close(fd)
            out, err = _drain(out_r), _drain(err_r)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError, asyncssh.Error):
            if out:
                self.chan.write(out)
            if err:
                self.chan.write_stderr(err)
            self.chan.exit(status)
        self._release()
        return True

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.inbox.put_nowait(data)
        if self.inbox.qsize() > 8 and self.chan is not None:
            self.chan.pause_reading()  # back-pressure on the client

    def eof_received(self) -> bool:
        self.inbox.put_nowait(None)
        return True

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def _feed_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.socks[0]
        with contextlib.suppress(OSError):
            while (data := await self.inbox.get()) is not None:
                await loop.sock_sendall(sock, data)
                if self.inbox.qsize() <= 2 and self.chan is not None:
                    self.chan.resume_reading()
            sock.shutdown(socket.SHUT_WR)

    async def _relay(self, sock: socket.socket, write: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncssh.Error):
            while True:
                await self.writable.wait()
                data = await loop.sock_recv(sock, _CHUNK)
                if not data:
                    return
                write(data)

    async def _finish(self) -> None:
        status = await self.worker
        await asyncio.gather(*self.tasks[1:3], return_exceptions=True)
        if self.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.exit(status)
        # Done: the session stops counting now, not when asyncssh reports the
        # channel closed (a callback later), so a client that opens its next
        # channel as soon as this one closes is not refused for it.
        self._release()

    def _release(self) -> None:
        if self.counted:
            self.server.state.sessions[self.server.grant.peer] -= 1  # type: ignore[union-attr]
            self.counted = False

    def connection_lost(self, exc: Exception | None) -> None:
        # The client went away: closing our ends makes the worker's next
        # write fail, so it stops (and logs) instead of streaming into nothing.
        # Take the sockets out of the event loop first: one closed while a
        # relay's sock_recv still waits on it leaves a stale selector entry,
        # and the next socket given the same descriptor number (the next
        # session's) would never be polled, so that session hangs.
        loop = asyncio.get_event_loop()
        for sock in self.socks:
            with contextlib.suppress(OSError, ValueError):
                if sock.fileno() >= 0:
                    loop.remove_reader(sock.fileno())
                    loop.remove_writer(sock.fileno())
        for task in self.tasks[:3]:
            task.cancel()
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.inbox.put_nowait(None)
        self._release()


async def start(cfg: Config, *, listen: str, port: int, limits: Limits = Limits()) -> asyncssh.SSHAcceptor:
    """Start serving on ``listen``:``port``; return the acceptor (``.close()`` stops it)."""
    return await _listen(cfg, listen, port, _State(cfg, limits))


async def _listen(cfg: Config, listen: str, port: int, state: _State) -> asyncssh.SSHAcceptor:
    from .client import encryption_algs

    limits = state.limits
    host_key = ensure_host_key(cfg)
    try:
        return await asyncssh.listen(
            listen, port, server_host_keys=[host_key], server_factory=lambda: _Server(state),
            allow_pty=False, agent_forwarding=False, x11_forwarding=False, sftp_factory=None,
            allow_scp=False, login_timeout=limits.auth_timeout, encryption_algs=encryption_algs(),
            # No GSSAPI: asyncssh would otherwise ask for our FQDN (a DNS
            # lookup) every time it builds a connection's options.
            gss_host=None, gss_kex=False, gss_auth=False,
            keepalive_interval=30, keepalive_count_max=4, config=None, reuse_address=True)
    except OSError as exc:
        raise PeerkitError(f"cannot listen on {listen}:{port}: {exc}") from None


async def serve_forever(cfg: Config, *, listen: str, port: int, limits: Limits = Limits(),
                        ready: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM."""
    import signal

    state = _State(cfg, limits)
    acceptor = await _listen(cfg, listen, port, state)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(acceptor.get_port())
    try:
        await stop.wait()
    finally:
        acceptor.close()
        await acceptor.wait_closed()
        # Closing the acceptor leaves open connections open, and asyncio.run
        # then waits for their peer-shell worker threads, which block on
        # sockets nobody reads any more: serve would never exit.  Close them:
        # each session's sockets close, its worker's next write fails, it
        # logs the cut and returns, and the client sees the transfer end
        # incomplete.
        conns = [server.conn for server in list(state.live) if server.conn is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([asyncio.ensure_future(conn.wait_closed()) for conn in conns], timeout=10)
