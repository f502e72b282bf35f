"""Talk to a paired peer's peer-shell over SSH, with asyncssh.

Connections use our identity only (no agent, no ~/.ssh/config, no other
keys), a connect timeout and keepalives, and the peer's host key pinned:
from the fingerprints in its v2 token, from the key recorded on first use
for a v1 token, and from then on from the recorded key object itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from .sshimport import asyncssh, publickey_first  # before any asyncssh submodule: see sshimport
from asyncssh.packet import PacketDecodeError

from .config import Config
from .errors import (AppBusy, BackupFailed, BadSlug, HookFailed, HostKeyMismatch, IdentityError, NoSpace,
                     TransferIncomplete, UnsafeArchive, NoSuchApp, NoSuchPeer, PeerkitError, PeerRefused,
                     PeerUnreachable, ProtocolError, SessionRefused)
from .state import Peer, PeerStore

# Flow control: large packets keep a fast link busy with few packets to
# parse.  The window is what the sender may have in flight unacknowledged:
# 8 MiB fills 1 Gbit/s at 64 ms round trip.  Larger was slower here: with a
# 16 MiB window OpenSSH's sshd queued the excess in its own output buffer
# and spent its CPU moving, zeroing and re-faulting that buffer (README,
# Benchmarks: the sending sshd's CPU for a 20,000-file pull 1.9 s -> 1.3 s).
WINDOW = 8 << 20
MAX_PACKET = 256 << 10
MAX_JSON_REPLY = 4 << 20
MAX_STDERR = 64 << 10
# Features a peer-shell may offer that we act on (and record from its ping).
KNOWN_FEATURES = frozenset({"app-info", "receive-app", "replace-key", "rsync", "with-app-info", "zstd"})
# A peer that keeps the connection open but stops sending is cut off.
IDLE_TIMEOUT = 120.0
# `ping --all` connects to this many peers at a time.  Unbounded, a few
# thousand peers would run out of file descriptors (1,024 by default), and
# every peer past that limit would be reported unreachable.
PING_ALL_AT_ONCE = 64
T = TypeVar("T")
# Remote error codes we map to local errors; anything else is "refused".
_REMOTE_ERRORS: dict[str, type[PeerkitError]] = {
    "bad-slug": BadSlug, "no-such-app": NoSuchApp,
    # What a receiving peer reports about a push.
    "busy": AppBusy, "unsafe-archive": UnsafeArchive, "transfer-incomplete": TransferIncomplete,
    "hook-failed": HookFailed, "backup-failed": BackupFailed, "no-space": NoSpace,
    # The peer accepted the request but could not finish sending or receiving.
    "failed": TransferIncomplete,
}


@functools.lru_cache(maxsize=1)
def _cpu_has_aes() -> bool:
    # Read once per process: `ping --all` and `serve` connect dozens of times.
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            return any(line.startswith("flags") and " aes" in line for line in fh)
    except OSError:
        return False


def encryption_algs() -> list[str]:
    """Return ciphers fastest first: AES-GCM where the CPU accelerates AES."""
    gcm = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    chacha = ["chacha20-poly1305@openssh.com"]
    ctr = ["aes128-ctr", "aes192-ctr", "aes256-ctr"]
    return gcm + chacha + ctr if _cpu_has_aes() else chacha + gcm + ctr


class _PinningClient(asyncssh.SSHClient):
    """Accept only the host key the peer's token or first contact pinned."""

    def __init__(self, fingerprints: set[str], recorded: bool) -> None:
        self.fingerprints = fingerprints
        self.recorded = recorded
        self.offered: asyncssh.SSHKey | None = None
        self.mismatch = False
        self.first_use = False

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        publickey_first(conn)  # one request, signed: no "none", no question first

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Called only for keys that are not the recorded key object.
        self.offered = key
        if self.recorded:
            # A recorded key that changed is a different machine or a MITM.
            self.mismatch = True
            return False
        if self.fingerprints:
            ok = key.get_fingerprint("sha256") in self.fingerprints
            self.mismatch = not ok
            return ok
        # v1 token: nothing to pin yet; trust on first use and record.
        self.first_use = True
        return True


@dataclass
class StreamResult:
    """How a streamed command ended."""

    exit_status: int | None
    bytes: int
    stderr: bytes
    error_code: str | None


class Gate:
    """Holds a stream's data back once ``full()`` says enough arrived, until ``open()``.

    While held, the channel is paused: asyncssh stops granting window, so
    the sender waits, and at most one window (``WINDOW``) more is buffered.
    """

    def __init__(self, full: Callable[[], bool]) -> None:
        self.full = full
        self.opened = asyncio.Event()

    def open(self) -> None:
        self.opened.set()


class _Sink(asyncssh.SSHClientSession):
    """Hand stdout to a callback as it arrives; keep the start of stderr."""

    def __init__(self, on_data: Callable[[bytes], None], gate: Gate | None = None) -> None:
        self.on_data = on_data
        self.gate = gate
        self.held: asyncio.Future[None] | None = None  # waits for the gate to open
        self.bytes = 0
        self.stderr = bytearray()
        self.failure: BaseException | None = None
        self.chan: asyncssh.SSHClientChannel | None = None
        self.last_data = time.monotonic()

    def _hold(self) -> None:
        gate, chan = self.gate, self.chan
        if gate is None or chan is None or self.held is not None or gate.opened.is_set() or not gate.full():
            return
        chan.pause_reading()
        self.held = asyncio.ensure_future(self._release(gate, chan))

    async def _release(self, gate: Gate, chan: asyncssh.SSHClientChannel) -> None:
        await gate.opened.wait()
        self.last_data = time.monotonic()  # the wait was ours, not an idle peer
        chan.resume_reading()

    def connection_made(self, chan: asyncssh.SSHClientChannel) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.last_data = time.monotonic()
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            # Bounded, and always drained: stdout and stderr share one window.
            room = MAX_STDERR - len(self.stderr)
            if room > 0:
                self.stderr += data[:room]
            return
        if self.failure is not None:
            return
        self.bytes += len(data)
        try:
            self.on_data(data)
        except BaseException as exc:  # noqa: BLE001 - re-raised by stream()
            self.failure = exc
            if self.chan is not None:
                self.chan.close()
            return
        self._hold()

    def waiting_at_gate(self) -> bool:
        return self.held is not None and not self.held.done()


def last_json(data: bytes) -> dict[str, Any] | None:
    """Return the last line of ``data`` that is a JSON object, if any."""
    for line in reversed(data.decode("utf-8", "replace").splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def remote_error(stderr: bytes) -> str | None:
    """Return the peer-shell error code from its stderr, if it sent one."""
    obj = last_json(stderr)
    if obj is not None and obj.get("ok") is False:
        return _error_code(obj.get("error"))
    return None


def _error_code(code: Any) -> str | None:
    """Return ``code`` if it is shaped like a peer-shell error code (``no-such-app``), else None.

    It ends up in messages on the user's terminal: a peer's escape
    sequences or other text must not.
    """
    if isinstance(code, str) and 0 < len(code) <= 40 and code.isascii() \
            and all(ch.islower() or ch == "-" for ch in code):
        return code
    return None


class PeerConnection:
    """An authenticated SSH connection to one peer's peer-shell."""

    def __init__(self, conn: asyncssh.SSHClientConnection, peer: Peer) -> None:
        self.conn = conn
        self.peer = peer
        # What the peer's peer-shell offers beyond the seed's verbs (from ping).
        self.features: frozenset[str] = frozenset()

    async def close(self) -> None:
        self.conn.close()
        await self.conn.wait_closed()

    async def __aenter__(self) -> "PeerConnection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def lost(self) -> bool:
        """Whether the connection went away: a channel that then failed to open was not refused by the peer.

        asyncssh fails every channel still opening when the connection is
        lost, with the code an asyncssh server also gives a refused session
        (OPEN_CONNECT_FAILED): only the connection's state tells them apart.
        """
        return self.conn.is_closed()

    async def stream(self, command: str, on_data: Callable[[bytes], None],
                     idle_timeout: float = IDLE_TIMEOUT, *, gate: Gate | None = None) -> StreamResult:
        """Run ``command``, handing stdout chunks to ``on_data``; return how it ended.

        With a ``gate``, the data stops (the sender waits) once the gate is
        full, until it opens; time spent waiting there is not idleness.
        """
        sink = _Sink(on_data, gate)
        try:
            chan, _ = await self.conn.create_session(
                lambda: sink, command, encoding=None, window=WINDOW, max_pktsize=MAX_PACKET)
            closed = asyncio.ensure_future(chan.wait_closed())
            try:
                while not closed.done():
                    await asyncio.wait({closed}, timeout=min(idle_timeout, 5.0))
                    if not closed.done() and not sink.waiting_at_gate() \
                            and time.monotonic() - sink.last_data > idle_timeout:
                        chan.close()
                        raise PeerUnreachable(f"{self.peer.name}: no data for {idle_timeout:g}s")
            except asyncio.CancelledError:
                # The caller stopped the request (a pull's check failed while
                # its transfer ran alongside): stop the data too.
                chan.close()
                raise
            finally:
                if not closed.done():
                    closed.cancel()
                if sink.held is not None:
                    sink.held.cancel()
            closed.result()
        except asyncssh.ChannelOpenError as exc:
            if self.lost():
                raise PeerUnreachable(f"{self.peer.name}: connection lost: {exc}") from None
            raise SessionRefused(f"{self.peer.name}: no session: {exc}") from None
        # PacketDecodeError (a ValueError, not an asyncssh.Error): a malformed packet off the wire.
        except (asyncssh.Error, OSError, PacketDecodeError) as exc:
            if sink.failure is not None:
                raise sink.failure from None
            raise PeerUnreachable(f"{self.peer.name}: connection lost: {exc}") from None
        if sink.failure is not None:
            raise sink.failure
        return StreamResult(chan.get_exit_status(), sink.bytes, bytes(sink.stderr),
                            remote_error(bytes(sink.stderr)))

    async def call_json(self, command: str) -> dict[str, Any]:
        """Run a verb that answers with one JSON object; raise on refusal."""
        buf = bytearray()

        def collect(data: bytes) -> None:
            # A peer that floods us with a "reply" is cut off, not buffered.
            if len(buf) + len(data) > MAX_JSON_REPLY:
                raise ProtocolError(f"{self.peer.name}: reply to {command!r} is too large")
            buf.extend(data)

        result = await self.stream(command, collect)
        if result.exit_status is None and result.error_code is None:
            # No exit status and no answer: the connection went away, nobody refused anything.
            raise PeerUnreachable(f"{self.peer.name}: connection lost before {command!r} finished")
        if result.exit_status != 0:
            raise_remote(self.peer.name, result)
        return _json_object(self.peer.name, bytes(buf), f"reply to {command!r}")


def _json_object(peer: str, data: bytes, what: str) -> dict[str, Any]:
    """Return ``data`` (``what`` ``peer`` sent) as a JSON object, or raise ProtocolError."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{peer}: {what} is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{peer}: {what} is not a JSON object")
    return obj


def raise_remote(peer: str, result: StreamResult) -> None:
    """Raise the local error for a command the peer refused or failed."""
    code = result.error_code or "refused"
    cls = _REMOTE_ERRORS.get(code, PeerRefused)
    raise cls(f"{peer} answered {code} (exit status {result.exit_status})")


def host_key_algs(recorded: asyncssh.SSHKey | None) -> str | list[str]:
    """Return the host key algorithms to offer: the recorded key's first, then every other.

    Offering only the recorded key's type (asyncssh's default with a trusted
    key) makes a peer that no longer has a key of that type fail the key
    exchange, which would read as "unreachable" instead of a host key mismatch.
    """
    if recorded is None:
        return "default"
    from asyncssh.public_key import get_default_public_key_algs

    own = [alg.decode("ascii") for alg in recorded.sig_algorithms]
    return own + [alg.decode("ascii") for alg in get_default_public_key_algs() if alg.decode("ascii") not in own]


def read_identity(cfg: Config, identity: Path | None = None) -> asyncssh.SSHKey:
    """Return our private key (or the one at ``identity``)."""
    key_path = identity or cfg.ssh.identity
    try:
        return asyncssh.read_private_key(str(key_path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise IdentityError(f"cannot read {key_path}: {exc}") from None


async def connect(cfg: Config, peer: Peer, store: PeerStore | None = None,
                  *, notes: Callable[[str], None] | None = None,
                  identity: Path | None = None, client_key: asyncssh.SSHKey | None = None) -> PeerConnection:
    """Open an authenticated, host-key-pinned connection to ``peer``.

    With our identity, or the key at ``identity``, or ``client_key`` already read.
    """
    pc = peer.config
    recorded = pc.get("host_key")
    trusted = [asyncssh.import_public_key(recorded)] if recorded else []
    client = _PinningClient(set(pc.get("host_key_fingerprints") or ()), bool(recorded))
    if client_key is None:
        client_key = read_identity(cfg, identity)
    try:
        conn = await asyncssh.connect(
            pc["host"], pc["port"], username=pc["user"],
            client_factory=lambda: client,
            known_hosts=(trusted, [], []),
            server_host_key_algs=host_key_algs(trusted[0] if trusted else None),
            client_keys=[client_key], agent_path=None, agent_forwarding=False,
            password_auth=False, kbdint_auth=False, gss_auth=False, gss_kex=False,
            host_based_auth=False, preferred_auth="publickey",
            config=None, x509_trusted_certs=None,
            encryption_algs=encryption_algs(),
            connect_timeout=cfg.ssh.connect_timeout, login_timeout=cfg.ssh.connect_timeout,
            keepalive_interval=15, keepalive_count_max=4)
    except asyncssh.HostKeyNotVerifiable as exc:
        if client.mismatch or not str(exc).startswith("Unable"):
            raise HostKeyMismatch(f"{peer.name} at {pc['host']}:{pc['port']}: {exc}") from None
        # "Unable to decode host key": a garbled key exchange, not a verified other key.
        raise PeerUnreachable(f"{peer.name} at {pc['host']}:{pc['port']}: {exc}") from None
    except asyncssh.PermissionDenied:
        raise PeerRefused(f"{peer.name} refused our key (not paired there, or revoked)") from None
    except (OSError, asyncio.TimeoutError, asyncssh.Error, PacketDecodeError) as exc:
        raise PeerUnreachable(f"{peer.name} at {pc['host']}:{pc['port']}: {exc or type(exc).__name__}") \
            from None
    if not recorded and client.offered is not None:
        line = client.offered.export_public_key().decode("ascii").strip()
        peer.config["host_key"] = line
        if store is not None:
            store.put(peer)
        if client.first_use and notes is not None:
            notes(f"{peer.name}: no host key was pinned by its token; recorded "
                  f"{client.offered.get_fingerprint('sha256')} and every later connection must match")
    return PeerConnection(conn, peer)


async def ping(conn: PeerConnection) -> dict[str, Any]:
    """Ask the peer who it is; return its answer."""
    return _greeted(conn, await conn.call_json("ping"), "ping")


def _greeted(conn: PeerConnection, reply: dict[str, Any], verb: str) -> dict[str, Any]:
    """Check ``reply`` answers what ping asks and keep the features it offers; return it."""
    if reply.get("ok") is not True:
        raise ProtocolError(f"{conn.peer.name}: unexpected {verb} reply")
    features = reply.get("features")
    # Shell peers send no feature list: they get the seed's tar stream only.
    if isinstance(features, list):
        conn.features = frozenset(f for f in features if isinstance(f, str) and len(f) < 32)
    # Its name and version are shown as they are (`peerkit ping`): printable
    # ASCII only, bounded, so a peer cannot write escape sequences to our terminal.
    return {**reply, "peer": shown(reply.get("peer")), "version": shown(reply.get("version"))}


def shown(text: Any, limit: int = 64) -> str | None:
    """Return a peer's ``text`` fit for a terminal: non-printable characters as '?', at most ``limit`` (None if no string)."""
    if not isinstance(text, str):
        return None
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text[:limit])


async def app_info(conn: PeerConnection, slug: str) -> dict[str, Any]:
    """Ask what ping and list-apps answer, for app ``slug`` only; return list_apps()'s inventory of it.

    One request (one peer-shell) instead of two, and the peer measures only
    that app.  Asked of peers whose last answer offered "app-info"; a peer
    that refuses it (a peer-shell older since) is asked ping and list-apps.
    """
    try:
        reply = await conn.call_json(f"app-info {slug}")
    except PeerRefused:
        # The refusal of a peer that refuses us altogether comes back from its ping.
        await ping(conn)
        return await list_apps(conn)
    return _app_info_inventory(conn, slug, reply)


async def app_info_answer(conn: PeerConnection, slug: str, answer: "asyncio.Future[bytes]") -> dict[str, Any]:
    """Return app_info()'s inventory from the answer a ``with-app-info`` rsync sent (stderr's first line).

    ``answer`` is set by ``rsync.run_client`` (or fails with what stopped it
    first).  An error line in its place raises what its code means, as for
    any request: PeerRefused for a refusal (a peer-shell older than the form).
    """
    line = await answer
    reply = _json_object(conn.peer.name, line, "with-app-info answer")
    if reply.get("ok") is False:
        cls = _REMOTE_ERRORS.get(_error_code(reply.get("error")) or "refused", PeerRefused)
        raise cls(f"{conn.peer.name} answered {cls.code} instead of app-info's answer")
    return _app_info_inventory(conn, slug, reply)


def _app_info_inventory(conn: PeerConnection, slug: str, reply: dict[str, Any]) -> dict[str, Any]:
    """Check app-info's ``reply`` about ``slug``; return it as list_apps()'s inventory."""
    _greeted(conn, reply, "app-info")
    if "app" not in reply:
        raise ProtocolError(f"{conn.peer.name}: app-info reply has no app")
    apps = _clean_apps([] if reply["app"] is None else [reply["app"]])
    # An answer about another app (or a malformed one) is no answer about this one.
    if reply["app"] is not None and [app["slug"] for app in apps] != [slug]:
        raise ProtocolError(f"{conn.peer.name}: app-info reply is not about {slug}")
    return {"peer": conn.peer.name, "apps": apps, "domain": _clean_domain(reply.get("domain"))}


def known_features(conn: PeerConnection) -> list[str]:
    """Return the peer's features worth recording: only names we act on (a peer's list is unbounded)."""
    return sorted(conn.features & KNOWN_FEATURES)


async def list_apps(conn: PeerConnection) -> dict[str, Any]:
    """Return the peer's app inventory (validated)."""
    reply = await conn.call_json("list-apps")
    apps = reply.get("apps")
    if not isinstance(apps, list):
        raise ProtocolError(f"{conn.peer.name}: list-apps reply has no app list")
    return {"peer": conn.peer.name, "apps": _clean_apps(apps), "domain": _clean_domain(reply.get("domain"))}


def _clean_apps(apps: list[Any]) -> list[dict[str, Any]]:
    """Return the entries of a peer's app list that are well-formed, as ``{slug, size_kb}``."""
    from . import grammar

    # Peer-supplied names end up in paths and on screens: keep only
    # entries that match our grammar, with a sane size.
    return [{"slug": app["slug"], "size_kb": app["size_kb"]} for app in apps
            if isinstance(app, dict) and isinstance(app.get("slug"), str) and grammar.is_slug(app["slug"])
            and isinstance(app.get("size_kb"), int) and not isinstance(app["size_kb"], bool)
            and 0 <= app["size_kb"] < 1 << 50]


def _clean_domain(domain: Any) -> str | None:
    """Return the domain a peer names for its apps if it is a DNS name (it ends up in rewritten files)."""
    from . import grammar

    if isinstance(domain, str) and "." in domain and grammar.is_host(domain) and ":" not in domain:
        return domain
    return None


def status_for(exc: PeerkitError) -> str:
    """Return the peer status a failed connection leaves behind."""
    return {"host-key-mismatch": "host-key-mismatch", "refused": "refused"}.get(exc.code, "unreachable")


def get_peer(store: PeerStore, name: str) -> Peer:
    """Return the paired peer ``name`` or raise NoSuchPeer."""
    peer = store.get(name)
    if peer is None:
        raise NoSuchPeer(name)
    return peer


async def open_peer(cfg: Config, store: PeerStore, name: str,
                    notes: Callable[[str], None] | None = None) -> PeerConnection:
    """Connect to ``name`` and ping it, recording the outcome as its status."""
    conn, _, _ = await open_peer_with(cfg, store, name, (), notes)
    return conn


async def open_peer_with(cfg: Config, store: PeerStore, name: str,
                         calls: Sequence[Callable[[PeerConnection], Awaitable[Any]]],
                         notes: Callable[[str], None] | None = None, *,
                         greet: Callable[[PeerConnection], Awaitable[Any]] = ping
                         ) -> tuple[PeerConnection, Any, list["asyncio.Future[Any]"]]:
    """Connect to ``name`` and ping it, with each of ``calls(conn)`` running alongside on its own channel.

    ``greet`` is the ping: ``ping`` or a request that answers what it does
    (``app_info``).  Returns the connection, its answer and one future per
    call (the caller awaits or cancels them; all are cancelled if the ping
    fails).  Only the ping's outcome is recorded, as the peer's status and
    features.
    """
    peer = get_peer(store, name)
    try:
        conn = await connect(cfg, peer, store, notes=notes)
        pinged, turns = asyncio.Event(), asyncio.Lock()
        # Every request goes out now, the ping's first: one round trip instead of several.
        pending = [asyncio.ensure_future(_alongside(conn, call, pinged, turns)) for call in calls]
        try:
            greeting = await greet(conn)
            pinged.set()
        except BaseException:
            for future in pending:
                future.cancel()
            for future in pending:
                with contextlib.suppress(BaseException):
                    await future
            await conn.close()
            raise
    except PeerkitError as exc:
        store.set_status(name, status_for(exc), seen=False)
        raise
    store.set_status(name, "ok", seen=True, features=known_features(conn))
    return conn, greeting, pending


async def _alongside(conn: PeerConnection, call: Callable[[PeerConnection], Awaitable[T]],
                     pinged: asyncio.Event, turns: asyncio.Lock) -> T:
    try:
        return await call(conn)
    except SessionRefused:
        # The peer allows fewer sessions at a time than we asked for
        # (serve.max_sessions_per_peer): after the ping, refused requests
        # go again one at a time.  The ping's session is free by then, so
        # one more fits beside those that were not refused; refused again,
        # the request fails rather than asking forever.
        await pinged.wait()
        async with turns:
            return await call(conn)


async def ping_peer(cfg: Config, name: str, notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ping one peer; return its name, version and the round trip time."""
    with PeerStore(cfg.db_path) as store:
        peer = get_peer(store, name)
        try:
            result, features = await _ping_once(cfg, store, peer, notes, None)
        except PeerkitError as exc:
            store.set_status(name, status_for(exc), seen=False)
            raise
        store.set_status(name, "ok", seen=True, features=features)
        return result


async def _ping_once(cfg: Config, store: PeerStore, peer: Peer, notes: Callable[[str], None] | None,
                     client_key: asyncssh.SSHKey | None) -> tuple[dict[str, Any], list[str]]:
    """Ping ``peer``; return the answer and the features to record (the caller records the outcome)."""
    started = time.monotonic()
    conn = await connect(cfg, peer, store, notes=notes, client_key=client_key)
    async with conn:
        t0 = time.monotonic()
        reply = await ping(conn)
        rtt = time.monotonic() - t0
    return ({"peer": peer.name, "remote_name": reply.get("peer"), "version": reply.get("version"),
             "rtt_ms": round(rtt * 1000, 1), "total_ms": round((time.monotonic() - started) * 1000, 1)},
            known_features(conn))


async def ping_all(cfg: Config, notes: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Ping every peer, PING_ALL_AT_ONCE at a time; return one result per peer (never raises for one peer)."""
    # One database connection, one read of our key and one transaction for
    # all of them: per peer, they cost the event loop more than the peer's
    # own round trip.  Interrupted, it still records the peers that had
    # answered or failed; the others keep the status they had.
    with PeerStore(cfg.db_path) as store:
        peers = store.all()
        try:
            client_key = read_identity(cfg) if peers else None
        except IdentityError:
            client_key = None  # each peer's connect reports it, as for a single ping
        outcomes: list[tuple[str, str, bool, list[str] | None]] = []
        at_once = asyncio.Semaphore(PING_ALL_AT_ONCE)

        async def one(peer: Peer) -> dict[str, Any]:
            try:
                async with at_once:
                    result, features = await _ping_once(cfg, store, peer, notes, client_key)
            except PeerkitError as exc:
                outcomes.append((peer.name, status_for(exc), False, None))
                return {"ok": False, "peer": peer.name, "error": exc.code, "message": exc.message}
            outcomes.append((peer.name, "ok", True, features))
            return {"ok": True, **result}

        try:
            return list(await asyncio.gather(*(one(p) for p in peers)))
        finally:
            store.set_statuses(outcomes)


async def peer_apps(cfg: Config, name: str, notes: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Return the live app inventory of peer ``name``."""
    with PeerStore(cfg.db_path) as store:
        conn = await open_peer(cfg, store, name, notes)
    async with conn:
        return await list_apps(conn)
