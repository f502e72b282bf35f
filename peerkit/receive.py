"""The serving side of transfers, run by peer-shell: send an app, or receive a pushed one.

Sending (``stream-app``, rsync ``--sender``) runs the source owner's
``pre_stream`` hook first and its ``post_stream`` hook always, even when the
stream breaks.  Receiving (``receive-app``, rsync without ``--sender``) is
allowed only to peers we granted push, and runs our own receiving pipeline
(``install.Receiver``): our pre-backup, staging, safe extraction or tree
check, verification, atomic swap, hooks and rollback.  The sender's flags
count for nothing except a request to keep URLs (and to skip the backup,
when our config allows that).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from . import hooks
from .apps import app_path, stream_app
from .archive import TarExtractor, check_tree
from .command import Request
from .compress import ZstdFeeder
from .config import Config
from .errors import HookFailed, NoSuchApp, PeerkitError, PeerRefused, StreamFailed, TransferIncomplete
from .install import Receiver, Report, log_transfer, raise_if_disk_full
from .rsync import RSYNC_PATH, rsync_binary
from .state import Peer

_CHUNK = 1 << 20


@contextlib.contextmanager
def _stream_hooks(cfg: Config, peer: Peer, slug: str, app_dir: Path, event: dict[str, Any]):
    """Run pre_stream before the block and post_stream after it, whatever happens."""
    run = lambda hook: hooks.run_hook(  # noqa: E731
        hook, getattr(cfg.hooks, hook), app=slug, app_dir=app_dir, peer=peer.name, timeout=cfg.hooks.timeout)
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


def serve_rsync(cfg: Config, peer: Peer, request: Request, fds: tuple[int, int, int],
                event: dict[str, Any]) -> dict[str, Any] | None:
    """Serve an rsync request on stdin/stdout: a send for pulls, a receive for pushes."""
    rsync_req = request.rsync
    assert rsync_req is not None and request.slug is not None
    rsync = rsync_binary()
    if rsync is None:
        raise PeerRefused("rsync is not installed here")
    env = {"PATH": RSYNC_PATH, "LC_ALL": "C"}
    if rsync_req.sender:
        if not peer.may_see(request.slug):
            raise NoSuchApp(f"{request.slug} is not allowed for {peer.name}")
        app_dir = app_path(cfg.apps_dir, request.slug)
        with _stream_hooks(cfg, peer, request.slug, app_dir, event):
            status = subprocess.run(rsync_req.server_argv(rsync, str(app_dir)), env=env, close_fds=True,
                                    stdin=fds[0], stdout=fds[1], stderr=fds[2]).returncode
        if status != 0:
            raise StreamFailed(f"rsync exited {status}")
        return None
    _require_push(peer, request.slug)
    report = Report(peer.name, request.slug)
    try:
        with Receiver(cfg, request.slug, peer.name, report) as receiver:
            receiver.backup(True, "", "pre-push")
            staging = receiver.new_staging()
            live = receiver.live
            # Unchanged files become hard links of the live app's; changed
            # ones are new files: the live app is never written.
            extra = (f"--link-dest={live}",) if live.is_dir() else ()
            with report.stage("transfer"):
                status = subprocess.run(rsync_req.server_argv(rsync, str(staging), extra), env=env,
                                        close_fds=True, stdin=fds[0], stdout=fds[1], stderr=fds[2]).returncode
                if status != 0:
                    raise TransferIncomplete(f"rsync exited {status}")
            with report.stage("verify"):
                report.files = check_tree(staging).files
            receiver.commit(None, False)
    except PeerkitError as exc:
        log_transfer(cfg, "receive", report, exc)
        raise
    log_transfer(cfg, "receive", report, None)
    return public_report(report)


def _require_push(peer: Peer, slug: str) -> None:
    # Push replaces one of our apps: only for peers we explicitly granted it,
    # and only apps they may see (a denied app must not be overwritten, nor
    # its existence revealed by the answer).
    if not peer.may_push:
        raise PeerRefused(f"{peer.name} may not push")
    if not peer.may_see(slug):
        raise PeerRefused(f"{peer.name} may not push {slug}: the app is denied to it")


def receive_app(cfg: Config, peer: Peer, request: Request, stdin_fd: int,
                event: dict[str, Any]) -> dict[str, Any]:
    """Serve ``receive-app``: read a tar (or tar.zst) from stdin and install it as our app."""
    assert request.slug is not None
    _require_push(peer, request.slug)
    report = Report(peer.name, request.slug)
    skip_backup = "--no-pre-backup" in request.flags and cfg.sender_may_skip_backup
    try:
        with Receiver(cfg, request.slug, peer.name, report) as receiver:
            receiver.backup(not skip_backup, "the sender asked and receive.sender_may_skip_backup allows it",
                            "pre-push")
            staging = receiver.new_staging()
            _extract_stdin(cfg, staging, stdin_fd, "--zstd" in request.flags, report, event)
            receiver.commit(request.domain, "--keep-urls" in request.flags)
    except PeerkitError as exc:
        log_transfer(cfg, "receive", report, exc)
        raise
    log_transfer(cfg, "receive", report, None)
    return public_report(report)


def _extract_stdin(cfg: Config, staging: Path, stdin_fd: int, compressed: bool, report: Report,
                   event: dict[str, Any]) -> None:
    st = os.statvfs(staging)
    # A pusher advertises nothing: the hard cap and the free space bound it.
    limit = min(cfg.max_app_bytes, st.f_bavail * st.f_frsize)
    extractor = TarExtractor(staging, max_bytes=limit)
    feeder = ZstdFeeder(extractor.feed) if compressed else None
    sink = feeder.feed if feeder else extractor.feed
    try:
        with report.stage("transfer"):
            while True:
                data = os.read(stdin_fd, _CHUNK)
                if not data:
                    break
                report.bytes += len(data)
                event["bytes_in"] = report.bytes
                sink(data)
        with report.stage("verify"):
            # The sender's end of input plus a proper end of archive; a
            # sender that died mid-stream leaves no end-of-archive marker.
            if feeder is not None:
                feeder.finish()
            report.files = extractor.finish().files
    except BaseException as exc:
        if feeder is not None:
            feeder.abort()
        extractor.abort()
        raise_if_disk_full(exc, staging.parent)
        raise


def public_report(report: Report) -> dict[str, Any]:
    """Return what the sending peer may learn: outcome and counts, no local paths or hook output."""
    return {"ok": True, "app": report.app, "bytes": report.bytes, "files": report.files,
            "backup": report.backup is not None, "rewritten": report.rewritten,
            "stages": [{"name": s.name, "outcome": s.outcome} for s in report.stages]}
