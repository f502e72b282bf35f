"""Pull an app from a paired peer without ever leaving a half-written app.

    lock -> ping -> inventory -> backup -> transfer (into staging, verified)
         -> stop -> swap -> rewrite -> start -> post_restore -> cleanup

The transfer is the peer's tar stream (optionally zstd-compressed) extracted
as it arrives, or with ``--incremental`` an rsync into staging seeded by hard
links of the live app.  When the peer offered rsync at its last ping, that
rsync starts with the ping instead of after the backup (it writes only
staging; a failed check cancels it).  Everything from the lock on is ``install.Receiver``,
shared with push.  Interrupting before the swap removes the staging copy and
leaves the local app as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import grammar
from .archive import TarExtractor, check_tree
from .client import PeerConnection, list_apps, open_peer_with
from .compress import ZstdFeeder, choose
from .config import Config
from .errors import BadSlug, NoSuchApp, PeerUnreachable, TransferIncomplete, UnsafeArchive
from .heap import keep_freed_memory
from .install import NoteFn, ProgressFn, Receiver, Report, check_space, raise_if_disk_full, run_transfer
from .state import PeerStore

# Drift between the peer's listing and its stream (files growing meanwhile).
_MARGIN_BYTES = 64 << 20


def ceiling(cfg: Config, size_kb: int) -> int:
    """Return the most we accept for an app advertised at ``size_kb``."""
    advertised = size_kb * 1024
    return min(cfg.max_app_bytes, advertised + max(_MARGIN_BYTES, advertised // 8))


async def _tar_transfer(conn: PeerConnection, cfg: Config, app: str, size_kb: int, staging: Path,
                        compressed: bool, report: Report, progress: ProgressFn | None) -> None:
    """Stream the app's tar into ``staging`` and verify it arrived whole."""
    keep_freed_memory()
    extractor = TarExtractor(staging, max_bytes=ceiling(cfg, size_kb), background_flush=True)
    total = size_kb * 1024
    extracted = 0

    def extract(data: bytes) -> None:
        nonlocal extracted
        extractor.feed(data)
        extracted += len(data)
        if progress is not None:
            progress("transfer", extracted, total)

    try:
        feeder = ZstdFeeder(extract) if compressed else None
    except BaseException:
        extractor.abort()  # its fds and flush thread
        raise
    command = f"stream-app {app}" + (" --zstd" if compressed else "")
    try:
        with report.stage("transfer"):
            try:
                result = await conn.stream(command, feeder.feed if feeder else extract)
            except PeerUnreachable as exc:
                raise TransferIncomplete(exc.detail) from None
            report.bytes = result.bytes
        with report.stage("verify"):
            if result.error_code == "no-such-app":
                raise NoSuchApp(f"{conn.peer.name} has no app {app}")
            # The remote exit status is the sender's word that it sent
            # everything; a clean end of archive is ours.
            if result.exit_status != 0:
                raise TransferIncomplete(
                    f"{conn.peer.name} exited with status {result.exit_status} "
                    f"({result.error_code or 'no error code'}) after {result.bytes} bytes")
            if feeder is not None:
                feeder.finish()
            stats = extractor.finish()
            report.files = stats.files
    except BaseException as exc:
        if feeder is not None:
            feeder.abort()
        extractor.abort()
        raise_if_disk_full(exc, staging.parent)
        raise


async def _rsync_transfer(cfg: Config, conn: PeerConnection, app: str, staging: Path, live: Path,
                          report: Report, early: "asyncio.Future[int] | None") -> None:
    """rsync the app into ``staging`` (hard links for what did not change), then check the tree.

    ``early`` is that rsync already started alongside the ping.
    """
    from .rsync import run_client

    with report.stage("transfer"):
        if early is not None:
            report.bytes = await early
        else:
            report.bytes = await run_client(conn, app, staging, live if live.is_dir() else None)
    with report.stage("verify"):
        # rsync applied its own rules; ours are stricter (no escaping
        # symlinks, no special files, no setuid), so check what it wrote.
        try:
            report.files = check_tree(staging).files
        except OSError as exc:
            raise UnsafeArchive(f"cannot check the received tree: {exc}") from None


def _early_rsync(store: PeerStore, peer_name: str, incremental: bool) -> bool:
    """Tell whether to start an incremental pull's rsync with the ping: the peer offered rsync last time."""
    from .rsync import rsync_binary

    peer = store.get(peer_name)
    features = peer.config.get("features") if peer is not None else None
    return incremental and isinstance(features, list) and "rsync" in features and rsync_binary() is not None


def _transfer_mode(cfg: Config, conn: PeerConnection, incremental: bool, compress: str,
                   report: Report, note: NoteFn | None) -> tuple[bool, bool]:
    """Return (use rsync, compress the tar stream), noting every fallback."""
    from .rsync import rsync_binary

    use_rsync = False
    if incremental:
        missing = [side for side, ok in (("here", rsync_binary() is not None),
                                         (f"on {conn.peer.name}", "rsync" in conn.features)) if not ok]
        if missing:
            text = f"rsync is not available {' or '.join(missing)}: falling back to a full transfer"
            report.notes.append(text)
            if note is not None:
                note(f"note: {text}")
        else:
            use_rsync = True
    if use_rsync:
        return True, False
    compressed, why = choose(compress, host=conn.peer.config["host"], link_mbps=cfg.link_mbps,
                             measured_mbps=conn.peer.config.get("link_mbps"),
                             remote_has_zstd="zstd" in conn.features)
    report.notes.append(f"{'zstd' if compressed else 'no'} compression: {why}")
    return False, compressed


async def pull_app(cfg: Config, peer_name: str, app: str, *, pre_backup: bool = True,
                   keep_urls: bool = False, incremental: bool = False, compress: str = "auto",
                   progress: ProgressFn | None = None, note: NoteFn | None = None) -> Report:
    """Pull ``app`` from ``peer_name`` into our apps_dir; raise a PeerkitError with ``.report``."""
    report = Report(peer_name, app)
    await run_transfer(cfg, "pull", report, _pull(cfg, peer_name, app, pre_backup, keep_urls, incremental,
                                                   compress, progress, note, report),
                       "before the swap; the local app is unchanged")
    return report


async def _pull(cfg: Config, peer_name: str, app: str, pre_backup: bool, keep_urls: bool,
                incremental: bool, compress: str, progress: ProgressFn | None, note: NoteFn | None,
                report: Report) -> None:
    # The slug becomes a path under apps_dir: the same grammar as peer-shell's.
    if not grammar.is_slug(app):
        raise BadSlug(repr(app[:80]))
    with Receiver(cfg, app, peer_name, report) as receiver:
        calls: list[Callable[[PeerConnection], Awaitable[Any]]] = [list_apps]
        with PeerStore(cfg.db_path) as store, report.stage("ping"):
            if _early_rsync(store, peer_name, incremental):
                # The peer offered rsync at its last ping: start the rsync
                # with the ping and list-apps instead of after them.  It
                # only writes staging, and the checks below still come
                # first: their failures cancel it, and what it wrote goes.
                from .rsync import run_client

                staging = receiver.new_staging()
                live = receiver.live if receiver.live.is_dir() else None
                calls.append(lambda conn: run_client(conn, app, staging, live))
                report.notes.append("rsync started alongside the ping (the peer offered it last time)")
            # list-apps goes out with the ping, on a second channel; its
            # answer is taken (and its failures reported) in "inventory".
            conn, (listing, *started_early) = await open_peer_with(cfg, store, peer_name, calls, note)
        early = started_early[0] if started_early else None
        async with conn:
            try:
                with report.stage("inventory"):
                    inventory = await listing
                    entry = next((a for a in inventory["apps"] if a["slug"] == app), None)
                    if entry is None:
                        raise NoSuchApp(f"{peer_name} has no app {app}")
                    check_space(cfg.apps_dir, entry["size_kb"] * 1024)
                receiver.backup(pre_backup, "--no-pre-backup", "pre-pull")
                use_rsync, compressed = _transfer_mode(cfg, conn, incremental, compress, report, note)
                if early is not None and not use_rsync:
                    # The peer no longer offers rsync (its ping said so): a tar transfer instead.
                    await _cancel(early)
                    early = None
                if early is None:
                    staging = receiver.new_staging()
                started = time.monotonic()
                if use_rsync:
                    await _rsync_transfer(cfg, conn, app, staging, receiver.live, report, early)
                else:
                    await _tar_transfer(conn, cfg, app, entry["size_kb"], staging, compressed, report,
                                        progress)
                _remember_rate(cfg, peer_name, report.bytes, time.monotonic() - started, use_rsync)
            finally:
                for future in (listing, early):
                    if future is not None:
                        await _cancel(future)
        await receiver.flush()
        # commit() runs without yielding to the loop, so the SIGTERM handler
        # run_transfer installed cannot cancel it; it only keeps SIGTERM from
        # its default action (death) until commit holds signals itself.
        receiver.commit(inventory["domain"], keep_urls)


async def _cancel(future: "asyncio.Future[Any]") -> None:
    """Stop a request that runs alongside (a no-op once it ended); its outcome no longer matters."""
    future.cancel()
    with contextlib.suppress(BaseException):
        await future


def _remember_rate(cfg: Config, peer_name: str, wire_bytes: int, seconds: float, rsync: bool) -> None:
    """Record the link speed a large tar transfer achieved, for --compress auto next time."""
    # Small or rsync transfers say little about the link.
    if rsync or wire_bytes < 32 << 20 or seconds <= 0:
        return
    with PeerStore(cfg.db_path) as store:
        peer = store.get(peer_name)
        if peer is not None:
            peer.config["link_mbps"] = round(wire_bytes * 8 / seconds / 1e6, 1)
            store.put(peer)
