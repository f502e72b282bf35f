"""The receiving side of a push, run by peer-shell (``send`` is the sending side).

Receiving (``receive-app``, rsync without ``--sender``) is
allowed only to peers we granted push, and runs our own receiving pipeline
(``install.Receiver``): our pre-backup, staging, safe extraction or tree
check, verification, atomic swap, hooks and rollback.  The sender's flags
count for nothing except a request to keep URLs (and to skip the backup,
when our config allows that).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from .archive import TarExtractor, check_tree
from .command import Request
from .compress import ZstdFeeder
from .config import Config
from .errors import PeerkitError, PeerRefused, TransferIncomplete
from .install import Receiver, Report, log_transfer, raise_if_disk_full
from .rsyncargs import RSYNC_ENV, rsync_binary
from .state import Peer
from .swap import farm_of

_CHUNK = 1 << 20


def serve_rsync(cfg: Config, peer: Peer, request: Request, fds: tuple[int, int, int]) -> dict[str, Any]:
    """Serve an rsync push on stdin/stdout: receive into staging, then install it."""
    rsync_req = request.rsync
    assert rsync_req is not None and not rsync_req.sender and request.slug is not None
    rsync = rsync_binary()
    if rsync is None:
        raise PeerRefused("rsync is not installed here")
    _require_push(peer, request.slug)
    report = Report(peer.name, request.slug)
    try:
        with Receiver(cfg, request.slug, peer.name, report) as receiver:
            receiver.backup(True, "", "pre-push")
            staging = receiver.new_staging()
            with report.stage("transfer"):
                # Unchanged files become hard links of the live app's,
                # found in a farm of them that holds no symlink (see
                # swap.link_farm); changed ones are new files: the live app
                # is never written.
                try:
                    with farm_of(receiver.live, cfg.apps_dir, request.slug) as farm:
                        extra = (f"--link-dest={farm}",) if farm is not None else ()
                        status = subprocess.run(rsync_req.server_argv(rsync, str(staging), extra), env=RSYNC_ENV,
                                                close_fds=True, stdin=fds[0], stdout=fds[1],
                                                stderr=fds[2]).returncode
                except OSError as exc:  # the farm could not be made here
                    raise_if_disk_full(exc, staging.parent)
                    raise TransferIncomplete(f"cannot prepare the rsync copy: {exc.strerror or exc}") from None
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
    extractor = TarExtractor(staging, max_bytes=limit, background_flush=True)
    try:
        feeder = ZstdFeeder(extractor.feed) if compressed else None
    except BaseException:
        extractor.abort()  # its fds and flush thread
        raise
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
