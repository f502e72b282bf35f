"""peer-shell: the forced command sshd runs for every paired peer's key.

    command="<peer-shell> --config <config path> <peer-name>"

The forced arguments are ours (we wrote the key line) and beat anything the
client sends; the client's request arrives in SSH_ORIGINAL_COMMAND and is
parsed by ``command.parse_command``.  The remote side learns only a short
error code; the audit log learns everything.  This module is imported on
every SSH call, so it imports only what the verbs need.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

from . import __version__, audit, grammar
from .atomicfile import write_all
from .command import Request, parse_command
from .errors import Busy, PeerkitError, PeerRefused
from .rsyncargs import find_tool

USAGE = "usage: peer-shell --config PATH PEER-NAME  (run by sshd as a forced command)"
# Codes the remote side may see; anything else is reported as "refused" or
# "failed" so internal details (paths, config errors) never leave the host.
_REMOTE_CODES = {"refused", "bad-slug", "no-such-app", "failed",
                 # A pushing peer needs to know why its push did not land.
                 "busy", "unsafe-archive", "transfer-incomplete", "hook-failed", "backup-failed",
                 "no-space"}


def _say(fd: int, obj: dict) -> None:
    # Best effort: a client that hung up right after sending its command
    # makes this write fail with EPIPE.  It is called from serve()'s except
    # handler, so raising here would skip the audit record of a refusal.
    try:
        os.write(fd, (json.dumps(obj, separators=(", ", ": ")) + "\n").encode("utf-8"))
    except OSError:
        pass


def _parse_argv(argv: list[str]) -> tuple[str, str]:
    """Return (config path, peer name) from the forced command's arguments."""
    if len(argv) != 3 or argv[0] != "--config" or not argv[1].startswith("/"):
        raise PeerRefused("bad forced-command arguments")
    if not grammar.is_name(argv[2]):
        raise PeerRefused("bad peer name in forced command")
    return argv[1], argv[2]


class Deferred(Exception):
    """peers.db was busy and the request must not wait in the event loop: nothing was sent or recorded."""


class Cache:
    """What `peerkit serve` keeps between the requests it serves in-process.

    The config is read on every request, as peer-shell reads it, and parsed
    and validated again only when its text changed (nothing but the text
    goes into it).  peers.db is read through one read-only connection per
    thread, kept open and opened again when the path names another file (a
    replaced database): each lookup is a fresh read, so a peer removed,
    expired or restricted is refused at its very next request, as with a
    connection per request.  ``in_loop`` is the event loop's own cache: a
    lookup that finds a writer holding the database raises Deferred at once
    instead of waiting (up to 10 s) with every session of the server.
    """

    def __init__(self, *, in_loop: bool = False) -> None:
        import threading  # here: peer-shell under sshd never makes one

        self.in_loop = in_loop
        self._config: tuple[tuple[Any, str], Any] | None = None
        self._local = threading.local()

    def config(self, path: str) -> Any:
        from .config import config_from_text, read_config_text

        cfg_path, text = read_config_text(path)
        cached = self._config  # one read of the attribute: another thread may replace it
        if cached is None or cached[0] != (cfg_path, text):
            cached = self._config = ((cfg_path, text), config_from_text(cfg_path, text))
        return cached[1]

    def peer(self, cfg: Any, name: str) -> Any:
        """Return peer ``name``'s record, or None; raise StateError, or Busy (locked, in the loop)."""
        from .state import PeerStore, StateError

        try:
            st = os.stat(cfg.db_path)
        except OSError as exc:
            raise StateError(f"{cfg.db_path}: {exc}") from None
        key = (str(cfg.db_path), st.st_dev, st.st_ino)
        stores: dict = self._local.__dict__.setdefault("stores", {})
        store = stores.get(key)
        if store is None:
            for old in stores.values():
                old.close()
            stores.clear()
            store = stores[key] = PeerStore(cfg.db_path, readonly=True, timeout=0 if self.in_loop else 10)
        try:
            return store.get(name)
        except StateError:  # not Busy: a locked file is fine to ask again
            if stores.pop(key, None) is not None:
                store.close()
            raise


def serve(config_path: str, peer: str, original: str | None, env: dict[str, str],
          stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2, *, cache: Cache | None = None) -> int:
    """Run one request for ``peer`` on the given descriptors; return the exit status.

    sshd runs it through main() on fds 0-2; the embedded server calls it
    in-process with socket pairs (or pipes), and its ``cache``.  Raises
    Deferred (only with an ``in_loop`` cache) before anything is sent or
    recorded.
    """
    from .config import read_config

    started = time.monotonic()
    client, client_port = audit.client_address(env.get("SSH_CONNECTION"))
    event: dict[str, Any] = {"peer": peer, "client": client, "client_port": client_port}
    cfg = None
    try:
        cfg = cache.config(config_path) if cache is not None else read_config(config_path)
        request = parse_command(original)
        event.update(verb=request.verb, slug=request.slug, bytes=0)
        row = _require_paired(cfg, peer, cache)
        _dispatch(cfg, row, request, (stdin_fd, stdout_fd, stderr_fd), event)
        event.update(outcome="ok")
        status = 0
    except PeerkitError as exc:
        # Before a request is accepted every failure is a refusal; after, a failure.
        code = exc.code if exc.code in _REMOTE_CODES else ("failed" if "verb" in event else "refused")
        event.update(outcome=code, reason=audit.clean(exc.detail or exc.message), bytes=event.get("bytes", 0))
        if "verb" not in event:
            event["command"] = audit.clean(original)
        _say(stderr_fd, {"ok": False, "error": code})
        status = exc.exit_code
    except (BrokenPipeError, ConnectionResetError):
        # The client went away mid-reply; event["bytes"] says how far it got.
        # (splice() into a socket whose reader closed says ECONNRESET.)
        event.update(outcome="disconnected")
        status = 1
    except Deferred:
        raise  # `peerkit serve` asks again from a thread: nothing happened yet
    except Exception as exc:
        # Anything unforeseen (a bug, a raw OS or database error).  Python's
        # default would print a traceback on stderr, which is the SSH
        # channel: our paths and code, shown to the peer, and no audit line.
        # The peer hears only the code; the audit log gets what and where.
        code = "failed" if "verb" in event else "refused"
        event.update(outcome=code, reason=audit.clean(_internal(exc)), bytes=event.get("bytes", 0))
        if "verb" not in event:
            event["command"] = audit.clean(original)
        _say(stderr_fd, {"ok": False, "error": code})
        status = 1
    event["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    if cfg is not None:
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            audit.record(cfg.audit_log, **event)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(stderr_fd, f"peer-shell: cannot write audit log: {exc}\n".encode())
            status = status or 1
    return status


def _internal(exc: BaseException) -> str:
    """Describe an unforeseen error for the audit log: its type, message and where it was raised."""
    import traceback  # only on this path: peer-shell's start stays lean

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return f"internal error: {type(exc).__name__}: {exc}{where}"


def _require_paired(cfg: Any, peer: str, cache: Cache | None = None) -> Any:
    """Return the caller's peer record; refuse unknown and expired peers."""
    from .state import PeerStore, StateError

    # The key line alone is not enough: a line left behind by a crashed
    # unpair, or a peer whose row was removed, gets nothing.
    try:
        if cache is not None:
            row = cache.peer(cfg, peer)
        else:
            with PeerStore(cfg.db_path, readonly=True) as store:
                row = store.get(peer)
    except Busy as exc:
        if cache is not None and cache.in_loop:
            raise Deferred from None  # asked again from a worker thread, which may wait
        # Fail closed: a peer we cannot look up gets nothing.  The remote side
        # hears "refused" as for an unknown peer; the operator's audit log
        # says why, so a busy or broken peers.db is not mistaken for an unpairing.
        raise PeerRefused(f"peer {peer}: cannot check the pairing, peers.db is busy ({exc.detail})") from None
    except StateError as exc:
        raise PeerRefused(f"peer {peer}: cannot check the pairing ({exc.detail})") from None
    if row is None:
        raise PeerRefused(f"peer {peer} is not paired")
    # sshd enforces expiry-time= too; this also covers servers that do not.
    if row.expired():
        raise PeerRefused(f"peer {peer} expired at {row.expires_at}")
    return row


def _dispatch(cfg: Any, peer: Any, request: Request, fds: tuple[int, int, int], event: dict[str, Any]) -> None:
    """Serve a validated request, counting the bytes sent into ``event``."""
    stdin_fd, stdout_fd, stderr_fd = fds
    def sent(n: int) -> None:
        event["bytes"] += n

    if request.verb == "ping":
        sent(_reply(stdout_fd, _greeting(cfg)))
    elif request.verb == "app-info":
        from .apps import app_entry
        # An app this peer may not pull is answered as one that does not
        # exist (as list-apps leaves it out): its name tells it nothing.
        app = app_entry(cfg.apps_dir, request.slug) if peer.may_see(request.slug) else None
        sent(_reply(stdout_fd, _app_info(cfg, app)))
    elif request.verb == "list-apps":
        from .apps import list_apps
        # Only what this peer may pull: the rest does not exist for it.
        offered = [app for app in list_apps(cfg.apps_dir) if peer.may_see(app["slug"])]
        sent(_reply(stdout_fd, {"peer": cfg.name, "apps": offered, "domain": cfg.domain}))
    elif request.verb == "stream-app":
        from .send import send_app
        send_app(cfg, peer, request, stdout_fd, sent, event)
    elif request.verb == "receive-app":
        from .receive import receive_app
        sent(_reply(stdout_fd, receive_app(cfg, peer, request, stdin_fd, event)))
    elif request.verb == "rsync" and request.rsync is not None and request.rsync.sender:
        from .send import serve_rsync_send
        # with-app-info: the same answer as app-info, as stderr's first line.
        announce = None
        if request.info:
            event["with_app_info"] = True
            announce = lambda app: _reply(stderr_fd, _app_info(cfg, app))  # noqa: E731
        serve_rsync_send(cfg, peer, request, fds, event, announce)
    elif request.verb == "rsync":
        from .receive import serve_rsync
        # stdout belongs to rsync's protocol: the outcome goes to stderr.
        _say(stderr_fd, serve_rsync(cfg, peer, request, fds))
    elif request.verb == "replace-key":
        from .rotate import accept_new_key
        sent(_reply(stdout_fd, accept_new_key(cfg, peer.name, request.key)))
    else:  # unreachable: the parser whitelists verbs
        raise PeerRefused("unknown verb")


def _greeting(cfg: Any) -> dict[str, Any]:
    """Return ping's answer: who we are and what we offer."""
    return {"ok": True, "peer": cfg.name, "version": __version__, "features": _features()}


def _app_info(cfg: Any, app: dict | None) -> dict[str, Any]:
    """Return app-info's answer: ping's, our domain, and ``app`` (its list-apps entry, or None)."""
    return {**_greeting(cfg), "domain": cfg.domain, "app": app}


def _features() -> list[str]:
    """Return what this peer-shell can do beyond the seed's verbs."""
    # Where the transfers look for them (compress.ZSTD_PATH is the same list).
    found = [tool for tool in ("rsync", "zstd") if find_tool(tool) is not None]
    # with-app-info is a form of rsync's request: offered with rsync.
    return sorted(["app-info", "receive-app", "replace-key", *found, *(["with-app-info"] if "rsync" in found else [])])


def _reply(fd: int, obj: dict) -> int:
    data = (json.dumps(obj, separators=(", ", ": ")) + "\n").encode("utf-8")
    write_all(fd, data)
    return len(data)


def run() -> None:
    """The peer-shell command: main(), then exit without the interpreter's teardown.

    Nothing is left for the teardown to do: every reply and audit line was
    written with os.write, every child (tar, rsync, hooks) and thread was
    waited for, and peer-shell registers no atexit handler.  Yet it took
    2-3 ms of CPU of every SSH call, which the client waits for: the channel
    closes at our exit.
    """
    status = main()
    for stream in (sys.stdout, sys.stderr):  # what --help and --version printed
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the peer-shell command (``run`` is the console script)."""
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        print(f"peer-shell {__version__}")
        return 0
    if args in (["--help"], ["-h"]):
        print(USAGE)
        return 0
    try:
        config_path, peer = _parse_argv(args)
    except PeerRefused:
        _say(2, {"ok": False, "error": "refused"})
        return PeerRefused.exit_code
    return serve(config_path, peer, os.environ.get("SSH_ORIGINAL_COMMAND"), dict(os.environ))
