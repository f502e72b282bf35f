"""Pull an app from a paired peer without ever leaving a half-written app.

    lock -> ping -> inventory -> backup -> transfer (into staging, verified)
         -> stop -> swap -> rewrite -> start -> post_restore -> cleanup

The live app directory is touched only by the swap, after a complete and
verified copy sits beside it.  Any failure after the swap swaps the previous
app back and starts it again.  Interrupting (SIGINT, SIGTERM) before the swap
removes the staging copy; from the stop hook to the end, signals are held
until the app is consistent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import audit, grammar, hooks
from .archive import TarExtractor
from .backup import backup
from .client import PeerConnection, list_apps, open_peer
from .config import Config
from .errors import (AppBusy, BadSlug, HookFailed, Interrupted, NoSpace, NoSuchApp,
                     PeerkitError, PeerUnreachable, TransferIncomplete)
from .state import PeerStore
from .swap import leftovers, new_staging, remove_tree, swap_in
from .urlrewrite import rewrite

ProgressFn = Callable[[str, int, "int | None"], None]
NoteFn = Callable[[str], None]
# Tar headers and padding on top of the advertised content, plus drift
# between the peer's listing and its stream.
_MARGIN_BYTES = 64 << 20


@dataclass
class Stage:
    """One step of the pipeline and how it went."""

    name: str
    outcome: str = "ok"
    duration_ms: float = 0.0
    detail: str | None = None


@dataclass
class PullReport:
    """Everything a pull did, for people, scripts and the web UI."""

    peer: str
    app: str
    stages: list[Stage] = field(default_factory=list)
    bytes: int = 0
    files: int = 0
    backup: str | None = None
    rewritten: list[str] = field(default_factory=list)
    hooks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "app": self.app, "bytes": self.bytes, "files": self.files,
                "backup": self.backup, "rewritten": self.rewritten, "notes": self.notes,
                "stages": [asdict(s) for s in self.stages],
                "hooks": [{k: v for k, v in h.items() if k != "output"} for h in self.hooks]}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """Time a stage and record its outcome (failed if it raises)."""
        st = Stage(name)
        self.stages.append(st)
        started = time.monotonic()
        try:
            yield st
        except BaseException as exc:
            st.outcome = "failed"
            st.detail = getattr(exc, "code", None) or type(exc).__name__
            raise
        finally:
            st.duration_ms = round((time.monotonic() - started) * 1000, 1)

    def skip(self, name: str, why: str) -> None:
        self.stages.append(Stage(name, "skipped", 0.0, why))

    def add_hook_runs(self, runs: list[hooks.HookRun]) -> None:
        self.hooks.extend(asdict(r) for r in runs)


@contextlib.contextmanager
def app_lock(cfg: Config, app: str) -> Iterator[None]:
    """Hold the per-app lock, or raise AppBusy: never two writers for one app."""
    lock_dir = cfg.state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_dir / f"{app}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AppBusy(f"another transfer of {app} is running") from None
            raise
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of acting on them, for the duration of the block."""
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ceiling(cfg: Config, size_kb: int) -> int:
    advertised = size_kb * 1024
    return min(cfg.max_app_bytes, advertised + max(_MARGIN_BYTES, advertised // 8))


def _check_space(apps_dir: Path, size_kb: int) -> None:
    st = os.statvfs(apps_dir)
    free = st.f_bavail * st.f_frsize
    need = size_kb * 1024
    if need > free:
        raise NoSpace(f"{apps_dir} has {free >> 20} MiB free, the app needs {need >> 20} MiB")


async def _transfer(conn: PeerConnection, cfg: Config, app: str, size_kb: int, staging: Path,
                    report: PullReport, progress: ProgressFn | None) -> None:
    """Stream the app into ``staging`` and verify it arrived whole."""
    extractor = TarExtractor(staging, max_bytes=_ceiling(cfg, size_kb))
    total = size_kb * 1024
    received = 0

    def feed(data: bytes) -> None:
        nonlocal received
        extractor.feed(data)
        received += len(data)
        if progress is not None:
            progress("transfer", received, total)

    try:
        with report.stage("transfer"):
            try:
                result = await conn.stream(f"stream-app {app}", feed)
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
            stats = extractor.finish()
            report.files = stats.files
    except BaseException:
        extractor.abort()
        raise


def _switch(cfg: Config, peer: str, app: str, staging: Path, source_domain: str | None,
            keep_urls: bool, report: PullReport) -> None:
    """Stop, swap, rewrite, start, post-restore; roll back on any failure."""
    live = cfg.apps_dir / app
    existed = os.path.lexists(live)
    timeout = cfg.hooks.timeout
    run = lambda hook, app_dir: report.add_hook_runs(hooks.run_hook(  # noqa: E731
        hook, hooks.commands_for(hook, getattr(cfg.hooks, hook), app_dir), app=app, app_dir=app_dir,
        peer=peer, timeout=timeout))
    if existed:
        with report.stage("stop"):
            try:
                run("stop", live)
            except HookFailed as exc:
                report.add_hook_runs(exc.runs)
                _restart_old(run, live, report)
                raise
    else:
        report.skip("stop", "no local app yet")
    with report.stage("swap"):
        aside = swap_in(staging, live)
    try:
        if keep_urls:
            report.skip("rewrite", "--keep-urls")
        elif not (source_domain and cfg.domain):
            report.skip("rewrite", "no domain configured" if source_domain else "peer reports no domain")
        elif source_domain == cfg.domain:
            report.skip("rewrite", "same domain")
        else:
            with report.stage("rewrite"):
                report.rewritten = rewrite(live, source_domain, cfg.domain, cfg.url_rewrite_globs)
        for hook in ("start", "post_restore"):
            with report.stage(hook):
                try:
                    run(hook, live)
                except HookFailed as exc:
                    report.add_hook_runs(exc.runs)
                    raise
    except BaseException:
        with report.stage("rollback"):
            if aside is not None:
                failed = swap_in(aside, live)  # the previous app goes back in place
                if failed is not None:
                    remove_tree(failed)
                _restart_old(run, live, report)
            else:
                # There was no app before: "before" is no app at all.
                gone = new_staging(cfg.apps_dir, app)
                os.rename(live, gone / "app")
                remove_tree(gone)
        raise
    if aside is not None:
        with report.stage("cleanup"):
            remove_tree(aside)


def _restart_old(run: Callable[[str, Path], None], live: Path, report: PullReport) -> None:
    try:
        run("start", live)
    except HookFailed as exc:
        report.add_hook_runs(exc.runs)
        report.notes.append(f"the previous app could not be started again: {exc.detail}")


async def pull_app(cfg: Config, peer_name: str, app: str, *, pre_backup: bool = True,
                   keep_urls: bool = False, progress: ProgressFn | None = None,
                   note: NoteFn | None = None) -> PullReport:
    """Pull ``app`` from ``peer_name`` into our apps_dir; raise a PeerkitError with ``.report``."""
    report = PullReport(peer_name, app)
    try:
        await _pull(cfg, peer_name, app, pre_backup, keep_urls, progress, note, report)
    except PeerkitError as exc:
        exc.report = report  # type: ignore[attr-defined]
        _log(cfg, report, exc)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        exc2 = Interrupted("before the swap; the local app is unchanged")
        exc2.report = report  # type: ignore[attr-defined]
        _log(cfg, report, exc2)
        raise exc2 from None
    _log(cfg, report, None)
    return report


async def _pull(cfg: Config, peer_name: str, app: str, pre_backup: bool, keep_urls: bool,
                progress: ProgressFn | None, note: NoteFn | None, report: PullReport) -> None:
    # The slug becomes a path under apps_dir: same grammar as peer-shell's.
    if not grammar.is_slug(app):
        raise BadSlug(repr(app[:80]))
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        with contextlib.ExitStack() as held:
            with report.stage("lock"):
                held.enter_context(app_lock(cfg, app))
            for stale in leftovers(cfg.apps_dir, app):
                remove_tree(stale)
                report.notes.append(f"removed {stale.name} left by an interrupted run")
            with PeerStore(cfg.db_path) as store, report.stage("ping"):
                conn = await open_peer(cfg, store, peer_name, note)
            async with conn:
                with report.stage("inventory"):
                    inventory = await list_apps(conn)
                    entry = next((a for a in inventory["apps"] if a["slug"] == app), None)
                    if entry is None:
                        raise NoSuchApp(f"{peer_name} has no app {app}")
                    _check_space(cfg.apps_dir if cfg.apps_dir.exists() else cfg.apps_dir.parent,
                                 entry["size_kb"])
                live = cfg.apps_dir / app
                if not pre_backup:
                    report.skip("backup", "--no-pre-backup")
                elif not live.exists():
                    report.skip("backup", "no local app yet")
                else:
                    with report.stage("backup"):
                        report.backup = backup(cfg, app, live)
                staging = new_staging(cfg.apps_dir, app)
                try:
                    await _transfer(conn, cfg, app, entry["size_kb"], staging, report, progress)
                except BaseException:
                    remove_tree(staging)
                    raise
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)
            with held_signals() as pending:
                try:
                    _switch(cfg, peer_name, app, staging, inventory["domain"], keep_urls, report)
                finally:
                    if os.path.lexists(staging):
                        remove_tree(staging)
            if pending:
                report.notes.append("an interrupt arrived during the swap; the swap finished first")
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def _log(cfg: Config, report: PullReport, exc: PeerkitError | None) -> None:
    """Append the pull's full record (hook output included) to state_dir/transfers.log."""
    record = {"kind": "pull", **report.to_json(), "hooks": report.hooks,
              "ok": exc is None, "error": exc.code if exc else None,
              "message": exc.message if exc else None}
    with contextlib.suppress(OSError):
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        audit.record(cfg.state_dir / "transfers.log", **json.loads(json.dumps(record, default=str)))
