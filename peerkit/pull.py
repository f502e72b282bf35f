"""Pull an app from a paired peer without ever leaving a half-written app.

    lock -> ping -> inventory -> backup -> transfer (into staging, verified)
         -> stop -> swap -> rewrite -> start -> post_restore -> cleanup

The transfer is the peer's tar stream (optionally zstd-compressed) extracted
as it arrives, or with ``--incremental`` an rsync into staging seeded by hard
links of the live app.  When the peer answered a ping before (and offered
rsync, for an incremental pull), the transfer starts with the ping instead
of after the backup: it writes only staging, a tar stream waits after its
head start until the listing and the space check passed, and a failed check
cancels it.  A peer that offered "app-info" is asked it instead of ping
and list-apps: one request, one peer-shell, and the peer measures only the
app asked for.  Everything from the lock on is ``install.Receiver``,
shared with push.  Interrupting before the swap removes the staging copy and
leaves the local app as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection

from . import grammar
from .archive import TarExtractor, check_tree
from .client import Gate, PeerConnection, StreamResult, app_info, app_info_answer, list_apps, open_peer_with, ping
from .command import WITH_APP_INFO
from .compress import ZstdFeeder, choose
from .config import Config
from .errors import (BadSlug, NoSuchApp, PeerkitError, PeerRefused, PeerUnreachable, ProtocolError, SessionRefused,
                     TransferIncomplete, UnsafeArchive)
from .heap import keep_freed_memory
from .install import NoteFn, ProgressFn, Receiver, Report, check_space, raise_if_disk_full, run_transfer
from .state import Peer, PeerStore

# Drift between the peer's listing and its stream (files growing meanwhile).
_MARGIN_BYTES = 64 << 20
# What a transfer started alongside the ping may write before the listing
# and the space check: then it waits for them (a quarter of the free space
# at most, so an app that does not fit never fills the disk on the way).
_HEAD_START_BYTES = 64 << 20


def ceiling(cfg: Config, size_kb: int) -> int:
    """Return the most we accept for an app advertised at ``size_kb``."""
    advertised = size_kb * 1024
    return min(cfg.max_app_bytes, advertised + max(_MARGIN_BYTES, advertised // 8))


class _TarStream:
    """The peer's tar stream of one app, extracted into ``staging`` as it arrives.

    ``run(conn)`` is the request; ``finish()`` checks it arrived whole.
    Without ``size_kb`` it starts alongside the ping, before the app's size
    is known: held to ``max_app_bytes`` and to its head start until
    ``limit()`` and ``go_on()``.
    """

    def __init__(self, cfg: Config, app: str, staging: Path, compressed: bool,
                 progress: ProgressFn | None, size_kb: int | None = None) -> None:
        keep_freed_memory()
        self.gate: Gate | None = None
        if size_kb is None:
            st = os.statvfs(staging)
            head_start = min(_HEAD_START_BYTES, st.f_bavail * st.f_frsize // 4)
            self.gate = Gate(lambda: self.extracted >= head_start)
        self.compressed = compressed
        self.staging = staging
        self.total: int | None = None if size_kb is None else size_kb * 1024  # None until the listing arrives
        self.extracted = 0
        self.started: float | None = None
        self.finished = False
        self._progress = progress
        max_bytes = cfg.max_app_bytes if size_kb is None else ceiling(cfg, size_kb)
        self.extractor = TarExtractor(staging, max_bytes=max_bytes, background_flush=True)
        try:
            self.feeder = ZstdFeeder(self._extract) if compressed else None
        except BaseException:
            self.extractor.abort()  # its fds and flush thread
            raise
        self.command = f"stream-app {app}" + (" --zstd" if compressed else "")

    def _extract(self, data: bytes) -> None:
        self.extractor.feed(data)
        self.extracted += len(data)
        if self._progress is not None:
            self._progress("transfer", self.extracted, self.total)

    def limit(self, cfg: Config, size_kb: int) -> None:
        """Hold the stream to the ceiling for the size the peer advertised."""
        self.total = size_kb * 1024
        self.extractor.limit(ceiling(cfg, size_kb))

    def go_on(self) -> None:
        """The checks passed: let a stream held at its head start continue."""
        if self.gate is not None:
            self.gate.open()

    async def run(self, conn: PeerConnection) -> StreamResult:
        self.started = time.monotonic()
        try:
            return await conn.stream(self.command, self.feeder.feed if self.feeder else self._extract,
                                     gate=self.gate)
        except SessionRefused:
            raise  # asked alongside the ping: it goes again after it (client.open_peer_with)
        except PeerUnreachable as exc:
            raise TransferIncomplete(exc.detail) from None

    def finish(self, conn: PeerConnection, app: str, result: StreamResult, report: Report) -> None:
        """Check how the stream ended and that the archive is complete."""
        report.bytes = result.bytes
        if result.error_code == "no-such-app":
            raise NoSuchApp(f"{conn.peer.name} has no app {app}")
        # The remote exit status is the sender's word that it sent
        # everything; a clean end of archive is ours.
        if result.exit_status != 0:
            raise TransferIncomplete(
                f"{conn.peer.name} exited with status {result.exit_status} "
                f"({result.error_code or 'no error code'}) after {result.bytes} bytes")
        if self.feeder is not None:
            self.feeder.finish()
        report.files = self.extractor.finish().files
        self.finished = True
        if self._progress is not None:
            # The last word, with the total (an early stream may have ended
            # before the listing gave it); the zstd thread has ended by now.
            self._progress("transfer", self.extracted, self.total)

    def abort(self) -> None:
        """Stop decompressing and extracting (the caller removes staging); never raises."""
        if self.feeder is not None:
            self.feeder.abort()
        self.extractor.abort()


async def _tar_transfer(conn: PeerConnection, tar: _TarStream, app: str, report: Report,
                        early: "asyncio.Future[StreamResult] | None") -> None:
    """Stream the app's tar into staging (or wait for the stream started early) and verify it."""
    try:
        with report.stage("transfer"):
            result = await (early if early is not None else tar.run(conn))
        with report.stage("verify"):
            tar.finish(conn, app, result, report)
    except BaseException as exc:
        tar.abort()
        raise_if_disk_full(exc, tar.staging.parent)
        raise


async def _rsync_transfer(cfg: Config, conn: PeerConnection, app: str, staging: Path, live: Path,
                          report: Report, early: "asyncio.Future[int] | None") -> None:
    """rsync the app into ``staging`` (hard links for what did not change), then check the tree.

    ``early`` is that rsync already started alongside the ping.
    """
    from .rsync import LinkFarm, run_client

    with report.stage("transfer"):
        try:
            if early is not None:
                report.bytes = await early
            else:
                farm = LinkFarm(live, cfg.apps_dir, app) if live.is_dir() else None
                try:
                    report.bytes = await run_client(conn, app, staging, farm)
                finally:
                    if farm is not None:
                        await farm.remove()
        except OSError as exc:
            # Here, not on the peer: the link farm or rsync's pipes could not be made.
            raise_if_disk_full(exc, staging.parent)
            raise TransferIncomplete(f"cannot run rsync here: {exc}") from None
    with report.stage("verify"):
        # rsync applied its own rules; ours are stricter (no escaping
        # symlinks, no special files, no setuid), so check what it wrote.
        try:
            report.files = check_tree(staging).files
        except OSError as exc:
            raise UnsafeArchive(f"cannot check the received tree: {exc}") from None


def _plan(cfg: Config, peer_config: dict[str, Any], features: Collection[str], incremental: bool,
          compress: str) -> tuple[bool, bool, str]:
    """Return (use rsync, compress the tar stream, why) for a peer offering ``features``."""
    from .rsync import rsync_binary

    if incremental and rsync_binary() is not None and "rsync" in features:
        return True, False, ""
    compressed, why = choose(compress, host=peer_config["host"], link_mbps=cfg.link_mbps,
                             measured_mbps=peer_config.get("link_mbps"), remote_has_zstd="zstd" in features)
    return False, compressed, why


def _recorded_features(store: PeerStore, peer_name: str) -> tuple[Peer | None, list[str] | None]:
    """Return the peer's record and the features its last ping offered (None: not recorded)."""
    peer = store.get(peer_name)
    features = peer.config.get("features") if peer is not None else None
    return peer, features if isinstance(features, list) else None


def _early_plan(cfg: Config, peer: Peer | None, features: list[str] | None, incremental: bool, compress: str,
                backup_due: bool) -> tuple[bool, bool] | None:
    """Return the transfer to start alongside the ping, judged by what the peer offered at its last ping.

    None (wait for the ping) for a peer never pinged since features were
    recorded, for an incremental pull the peer offered no rsync for (a tar
    transfer then comes with its fallback note), and for an rsync while a
    pre-backup of the live app is due: rsync's ``--link-dest`` hard links
    change the live files' ctime, which the backup's tar reports as files
    changed while it read them (and fails).
    """
    if peer is None or features is None:
        return None
    use_rsync, compressed, _ = _plan(cfg, peer.config, features, incremental, compress)
    if (incremental and not use_rsync) or (use_rsync and backup_due):
        return None
    return use_rsync, compressed


def _transfer_mode(cfg: Config, conn: PeerConnection, incremental: bool, compress: str,
                   report: Report, note: NoteFn | None) -> tuple[bool, bool]:
    """Return (use rsync, compress the tar stream) for what the peer offers now, noting every fallback."""
    from .rsync import rsync_binary

    use_rsync, compressed, why = _plan(cfg, conn.peer.config, conn.features, incremental, compress)
    if incremental and not use_rsync:
        missing = [side for side, ok in (("here", rsync_binary() is not None),
                                         (f"on {conn.peer.name}", "rsync" in conn.features)) if not ok]
        text = f"rsync is not available {' or '.join(missing)}: falling back to a full transfer"
        report.notes.append(text)
        if note is not None:
            note(f"note: {text}")
    if not use_rsync:
        report.notes.append(f"{'zstd' if compressed else 'no'} compression: {why}")
    return use_rsync, compressed


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
        tar: _TarStream | None = None
        farm: Any = None  # the early rsync's LinkFarm
        with PeerStore(cfg.db_path) as store, report.stage("ping"):
            peer, recorded = _recorded_features(store, peer_name)
            # The ping and list-apps in one request, when the peer offered it.
            info = recorded is not None and "app-info" in recorded
            greet: Callable[[PeerConnection], Awaitable[Any]] = (lambda conn: app_info(conn, app)) if info else ping
            restart = [False]  # the early rsync must go again (without with-app-info)
            calls: list[Callable[[PeerConnection], Awaitable[Any]]] = [] if info else [list_apps]
            plan = _early_plan(cfg, peer, recorded, incremental, compress,
                               backup_due=pre_backup and receiver.live.exists())
            # The transfer the peer's last ping allows starts with this ping
            # and list-apps instead of after them.  It only writes staging,
            # and the checks below still come first: their failures cancel
            # it, and what it wrote goes.  A tar stream is held to
            # max_app_bytes until the listing gives the app's size.
            if plan is not None and plan[0]:
                from .rsync import LinkFarm, run_client

                staging = receiver.new_staging()
                # Filled by a thread while we connect.
                farm = LinkFarm(receiver.live, cfg.apps_dir, app) if receiver.live.is_dir() else None
                answer: asyncio.Future[bytes] | None = None
                if info and WITH_APP_INFO in recorded:
                    # One session instead of two: the rsync's request asks
                    # app-info's answer first, and that answer is the ping.
                    answer = asyncio.get_running_loop().create_future()
                    greet = lambda conn: _greet_with_rsync(conn, app, answer, restart)  # noqa: E731
                calls.append(lambda conn: run_client(conn, app, staging, farm, answer))
                report.notes.append("rsync started alongside the ping (the peer offered it last time)")
            elif plan is not None:
                tar = _TarStream(cfg, app, receiver.new_staging(), plan[1], progress)
                calls.append(tar.run)
                report.notes.append("transfer started alongside the ping (the peer was reachable last time)")
            # list-apps (unless app-info answers for it) goes out with the
            # ping, on a second channel; its answer is taken (and its
            # failures reported) in "inventory".
            try:
                conn, greeting, futures = await open_peer_with(cfg, store, peer_name, calls, note, greet=greet)
            except BaseException:
                if tar is not None:
                    tar.abort()
                if farm is not None:
                    await farm.remove()
                raise
        if info:
            listing: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            listing.set_result(greeting)
        else:
            listing = futures.pop(0)
        early = futures[0] if futures else None
        if restart[0] and early is not None:
            await _cancel(early)  # refused by the peer: nothing ran there
            early = None
            report.notes.append("the peer refused with-app-info (an older peer-shell): app-info asked, "
                                "rsync started again without it")
        try:
            async with conn:
                try:
                    with report.stage("inventory"):
                        inventory = await listing
                        entry = next((a for a in inventory["apps"] if a["slug"] == app), None)
                        if entry is None:
                            raise NoSuchApp(f"{peer_name} has no app {app}")
                        need = entry["size_kb"] * 1024
                        if tar is not None:
                            tar.limit(cfg, entry["size_kb"])
                            need -= tar.extracted  # on disk already (its head start at most)
                        check_space(cfg.apps_dir, need)
                        if tar is not None:
                            tar.go_on()
                    receiver.backup(pre_backup, "--no-pre-backup", "pre-pull")
                    use_rsync, compressed = _transfer_mode(cfg, conn, incremental, compress, report, note)
                    if early is not None and (use_rsync, compressed) != plan:
                        # The peer's ping no longer offers what the early start
                        # relied on (rsync, zstd): start again the way it allows.
                        await _cancel(early)
                        early = None
                        if farm is not None:
                            await farm.remove()
                            farm = None
                        if tar is not None:
                            tar.abort()
                            tar = None
                        report.notes.append("the early transfer was stopped: the peer's features changed")
                    if early is None:
                        staging = receiver.new_staging()
                    started = time.monotonic()
                    if use_rsync:
                        await _rsync_transfer(cfg, conn, app, staging, receiver.live, report, early)
                    else:
                        if tar is None:
                            tar = _TarStream(cfg, app, staging, compressed, progress, entry["size_kb"])
                        await _tar_transfer(conn, tar, app, report, early)
                        started = tar.started or started
                    _remember_rate(cfg, peer_name, report.bytes, time.monotonic() - started, use_rsync)
                finally:
                    for future in (listing, early):
                        if future is not None:
                            await _cancel(future)
                    if farm is not None:
                        farm.discard()  # started when rsync ended, unless it never ran; waited for below
                    if tar is not None and not tar.finished:
                        tar.abort()  # stopped before its checks passed (after its request: no more data)
            await receiver.flush()
            if farm is not None:
                # rsync's end started its removal: it ran beside the checks and the flush.
                # Waited for here, not after the swap: a SIGTERM there would cancel
                # a pull that is done and be reported as one that changed nothing.
                await farm.remove()
                farm = None
            # commit() runs without yielding to the loop, so the SIGTERM handler
            # run_transfer installed cannot cancel it; it only keeps SIGTERM from
            # its default action (death) until commit holds signals itself.
            receiver.commit(inventory["domain"], keep_urls)
        finally:
            if farm is not None:  # a pull that failed or was stopped: its farm goes before the app lock does
                await farm.remove()


async def _greet_with_rsync(conn: PeerConnection, app: str, answer: "asyncio.Future[bytes]",
                            restart: list[bool]) -> dict[str, Any]:
    """Return the inventory app-info's answer gives, from the rsync that asked it first (``with-app-info``).

    Without that answer the greeting is app-info's own: a peer-shell older
    than the form refuses it (and the rsync goes again without it: sets
    ``restart[0]``), and an rsync that failed before answering (here or on
    the peer) fails the transfer, as it would have alongside app-info.  A
    malformed answer is the peer's error, as app-info's would be.
    """
    try:
        return await app_info_answer(conn, app, answer)
    except ProtocolError:
        raise
    except PeerRefused:
        # A peer that refuses us altogether refuses app-info as well.
        restart[0] = True
    except PeerkitError:
        pass
    return await app_info(conn, app)


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
