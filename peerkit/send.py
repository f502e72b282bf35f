"""The sending side of a pull, run by peer-shell: ``stream-app`` and rsync ``--sender``.

Both run the source owner's ``pre_stream`` hook first and its
``post_stream`` hook always, even when the stream breaks.  A denied app
answers exactly like a missing one.  Kept apart from ``receive`` (pushes),
whose staging and install machinery a send never needs: every pull starts
a peer-shell that imports this module, and the receiving side adds ~40 ms
of imports (asyncio among them; before the split, asyncssh too: ~230 ms).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Callable

from .apps import app_entry, app_path, stream_app
from .atomicfile import write_all
from .command import Request
from .config import Config
from .errors import HookFailed, NoSuchApp, PeerRefused, StreamFailed
from .rsyncargs import RSYNC_ENV, rsync_binary
from .state import Peer


@contextlib.contextmanager
def _stream_hooks(cfg: Config, peer: Peer, slug: str, app_dir: Path, event: dict[str, Any]):
    """Run pre_stream before the block and post_stream after it, whatever happens."""

    def run(hook: str) -> None:
        from . import hooks  # only when a stream hook is configured (it loads dataclasses)

        hooks.run_hook(hook, getattr(cfg.hooks, hook), app=slug, app_dir=app_dir, peer=peer.name,
                       timeout=cfg.hooks.timeout)

    try:
        if cfg.hooks.pre_stream:
            try:
                run("pre_stream")
            except HookFailed as exc:
                event["hook"] = f"pre_stream failed: {exc.detail}"
                raise StreamFailed("pre_stream hook failed") from None
        yield
    finally:
        # Also after a failed pre_stream: whatever it paused must resume.
        if cfg.hooks.post_stream:
            try:
                run("post_stream")
            except HookFailed as exc:
                # The copy went out; the source owner must hear that its
                # app may still be paused.
                event["hook"] = f"post_stream failed: {exc.detail}"


def send_app(cfg: Config, peer: Peer, request: Request, stdout_fd: int, sent: Callable[[int], None],
             event: dict[str, Any]) -> None:
    """Serve ``stream-app``: the app's tar (or tar.zst) on stdout."""
    assert request.slug is not None
    # A denied app answers exactly like a missing one: no existence leak.
    if not peer.may_see(request.slug):
        raise NoSuchApp(f"{request.slug} is not allowed for {peer.name}")
    app_dir = app_path(cfg.apps_dir, request.slug)
    with _stream_hooks(cfg, peer, request.slug, app_dir, event):
        stream_app(app_dir, stdout_fd, sent, compress="--zstd" in request.flags)


# What rsync may write to stderr that we keep (with-app-info holds it back).
MAX_RSYNC_STDERR = 64 << 10


def serve_rsync_send(cfg: Config, peer: Peer, request: Request, fds: tuple[int, int, int],
                     event: dict[str, Any], announce: Callable[[dict | None], None] | None = None) -> None:
    """Serve an rsync pull: our rsync --sender on stdin/stdout, between the stream hooks.

    With ``announce`` (``with-app-info``), app-info's answer about the app
    goes out first on stderr, through ``announce(entry)``: the app's
    list-apps entry once rsync has started (it walks the app meanwhile), or
    None, and nothing started, for an app that is missing or not offered.
    """
    rsync_req = request.rsync
    assert rsync_req is not None and rsync_req.sender and request.slug is not None
    rsync = rsync_binary()
    if rsync is None:
        raise PeerRefused("rsync is not installed here")
    try:
        # As for stream-app: a denied app answers exactly like a missing one.
        if not peer.may_see(request.slug):
            raise NoSuchApp(f"{request.slug} is not allowed for {peer.name}")
        app_dir = app_path(cfg.apps_dir, request.slug)
    except NoSuchApp:
        if announce is not None:
            announce(None)  # as app-info answers for both: nothing tells them apart
        raise
    argv = rsync_req.server_argv(rsync, str(app_dir))
    with _stream_hooks(cfg, peer, request.slug, app_dir, event):
        if announce is None:
            status = _wait(_spawn(argv, fds))
        else:
            status = _rsync_after(announce, cfg.apps_dir, request.slug, argv, fds)
    if status != 0:
        raise StreamFailed(f"rsync exited {status}")


def _spawn(argv: list[str], fds: tuple[int, int, int]) -> int:
    """Start ``argv`` on ``fds`` as its stdin, stdout and stderr, with no other fd of ours; return its pid.

    ``os.posix_spawn`` rather than ``subprocess``, whose import (with
    ``signal``, ``threading`` and ``selectors``) took about 3 ms of every
    pull's start before rsync ran.  What ``subprocess`` adds is done here
    too: every other inheritable fd is closed in the child (``close_fds``),
    so rsync holds nothing but its three pipes.  The signals ``subprocess``
    resets to their default (SIGPIPE, SIGXFSZ, which Python ignores) rsync
    sets to "ignore" itself at start.
    """
    copies = []
    try:
        sources = list(fds)
        for target, fd in enumerate(sources):
            # A source among 0-2 but not in its own place would be overwritten
            # by an earlier dup2 in the child (the embedded server's fds can
            # be anything): the child gets a copy above 2 instead.
            if fd < 3 and fd != target:
                sources[target] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                copies.append(sources[target])
        actions: list[tuple] = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(sources)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2]
        return os.posix_spawn(argv[0], argv, RSYNC_ENV, file_actions=actions)
    finally:
        for fd in copies:
            os.close(fd)


def _inheritable_fds() -> list[int]:
    """Return the open fds an exec would pass on (none but 0-2 unless someone cleared a CLOEXEC)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            if os.get_inheritable(int(name)):
                found.append(int(name))
    return found


def _wait(pid: int) -> int:
    """Wait for ``pid``; return its exit status as subprocess reports it (-N: killed by signal N)."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _rsync_after(announce: Callable[[dict | None], None], apps_dir: Path, slug: str,
                 argv: list[str], fds: tuple[int, int, int]) -> int:
    """Start rsync, announce the app's entry while it runs, then pass on what it wrote to stderr; return its status.

    rsync's stderr waits in a pipe until the answer is out: the client takes
    the first line of stderr as the answer, and rsync may write there at once.
    """
    read_end, write_end = os.pipe()  # both close-on-exec: rsync gets the write end as its fd 2 only
    try:
        pid = _spawn(argv, (fds[0], fds[1], write_end))
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # ours: rsync's end of stderr is the only one left
    kept = bytearray()
    try:
        try:
            announce(app_entry(apps_dir, slug))
        finally:
            # Drained to the end (rsync must never block on a full pipe), kept up to a bound.
            while data := os.read(read_end, 1 << 16):
                kept += data[:MAX_RSYNC_STDERR - len(kept)]
    finally:
        os.close(read_end)
        status = _wait(pid)
    with contextlib.suppress(OSError):  # a client that went away hears nothing more
        write_all(fds[2], kept)
    return status
