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
import subprocess
from pathlib import Path
from typing import Any, Callable

from .apps import app_path, stream_app
from .atomicfile import write_all
from .command import Request
from .config import Config
from .errors import HookFailed, NoSuchApp, PeerRefused, StreamFailed
from .rsyncargs import RSYNC_PATH, rsync_binary
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
    env = {"PATH": RSYNC_PATH, "LC_ALL": "C"}
    with _stream_hooks(cfg, peer, request.slug, app_dir, event):
        if announce is None:
            status = subprocess.run(argv, env=env, close_fds=True, stdin=fds[0], stdout=fds[1],
                                    stderr=fds[2]).returncode
        else:
            status = _rsync_after(announce, cfg.apps_dir, request.slug,
                                  subprocess.Popen(argv, env=env, close_fds=True, stdin=fds[0], stdout=fds[1],
                                                   stderr=subprocess.PIPE), fds[2])
    if status != 0:
        raise StreamFailed(f"rsync exited {status}")


def _rsync_after(announce: Callable[[dict | None], None], apps_dir: Path, slug: str,
                 proc: subprocess.Popen, stderr_fd: int) -> int:
    """Announce the app's entry while ``proc`` (rsync) runs, then pass on what it wrote to stderr; return its status.

    rsync's stderr waits in a pipe until the answer is out: the client takes
    the first line of stderr as the answer, and rsync may write there at once.
    """
    from .apps import app_entry

    assert proc.stderr is not None
    kept = bytearray()
    with proc:
        try:
            announce(app_entry(apps_dir, slug))
        finally:
            # Drained to the end (rsync must never block on a full pipe), kept up to a bound.
            while data := proc.stderr.read(1 << 16):
                kept += data[:MAX_RSYNC_STDERR - len(kept)]
    with contextlib.suppress(OSError):  # a client that went away hears nothing more
        write_all(stderr_fd, kept)
    return proc.returncode
