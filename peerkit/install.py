"""Install an app that arrived from a peer: the receiving steps shared by pull and push.

    lock -> backup -> (transfer into staging, verified) -> flush -> stop
         -> swap -> rewrite -> start -> post_restore -> cleanup

The live app directory is touched only by the swap, after a complete and
verified copy sits beside it.  Any failure after the swap swaps the previous
app back and starts it again.  From the stop hook to the end, SIGINT and
SIGTERM are held until the app is consistent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from . import audit, hooks
from .config import Config
from .durable import flush_filesystem
from .errors import AppBusy, HookFailed, Interrupted, NoSpace, PeerkitError, TransferIncomplete
from .backup import backup
from .swap import leftovers, new_staging, remove_tree, swap_in
from .urlrewrite import rewrite

T = TypeVar("T")
ProgressFn = Callable[[str, int, "int | None"], None]
NoteFn = Callable[[str], None]


@dataclass
class Stage:
    """One step of the pipeline and how it went."""

    name: str
    outcome: str = "ok"
    duration_ms: float = 0.0
    detail: str | None = None


@dataclass
class Report:
    """Everything a transfer did, for people, scripts and the web UI."""

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
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread owns signal handlers (the embedded server
        # runs transfers in worker threads; its process handles signals).
        yield received
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_if_disk_full(exc: BaseException, where: Path) -> None:
    """Turn a local disk-full error met while filling staging into NoSpace (else do nothing)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpace(f"{where} filled up during the transfer ({exc.strerror})") from None


def check_space(apps_dir: Path, need: int) -> None:
    """Refuse early when the filesystem of ``apps_dir`` cannot hold ``need`` bytes."""
    st = os.statvfs(apps_dir if apps_dir.exists() else apps_dir.parent)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise NoSpace(f"{apps_dir} has {free >> 20} MiB free, the app needs {need >> 20} MiB")


def switch(cfg: Config, peer: str, app: str, staging: Path, source_domain: str | None,
            keep_urls: bool, report: Report) -> None:
    """Stop, swap, rewrite, start, post-restore; roll back on any failure (signals held)."""
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


def _restart_old(run: Callable[[str, Path], None], live: Path, report: Report) -> None:
    try:
        run("start", live)
    except HookFailed as exc:
        report.add_hook_runs(exc.runs)
        report.notes.append(f"the previous app could not be started again: {exc.detail}")


def log_transfer(cfg: Config, kind: str, report: Report, exc: PeerkitError | None) -> None:
    """Append the transfer's full record (hook output included) to state_dir/transfers.log."""
    record = {"kind": kind, **report.to_json(), "hooks": report.hooks,
              "ok": exc is None, "error": exc.code if exc else None,
              "message": exc.message if exc else None}
    with contextlib.suppress(OSError):
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        audit.record(cfg.state_dir / "transfers.log", **json.loads(json.dumps(record, default=str)))


class Receiver:
    """Lock one app, back it up, give a staging directory, and swap it in at the end."""

    def __init__(self, cfg: Config, app: str, peer: str, report: Report) -> None:
        self.cfg, self.app, self.peer, self.report = cfg, app, peer, report
        self.live = cfg.apps_dir / app
        self.staging: Path | None = None
        self.flushed = False
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "Receiver":
        with self.report.stage("lock"):
            self._held.enter_context(app_lock(self.cfg, self.app))
        # Under the lock nobody else writes this app: whatever a killed run
        # left beside it is ours to remove.
        for stale in leftovers(self.cfg.apps_dir, self.app):
            remove_tree(stale)
            self.report.notes.append(f"removed {stale.name} left by an interrupted run")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.staging is not None and os.path.lexists(self.staging):
                remove_tree(self.staging)
        finally:
            self._held.close()

    def backup(self, wanted: bool, why_not: str, tag: str) -> None:
        """Snapshot the live app first, if there is one and it is wanted."""
        if not wanted:
            self.report.skip("backup", why_not)
        elif not self.live.exists():
            self.report.skip("backup", "no local app yet")
        else:
            with self.report.stage("backup"):
                self.report.backup = backup(self.cfg, self.app, self.live, tag)

    def new_staging(self) -> Path:
        """Create the empty directory the transfer lands in (removing one made before)."""
        if self.staging is not None and os.path.lexists(self.staging):
            remove_tree(self.staging)
        self.staging = new_staging(self.cfg.apps_dir, self.app)
        return self.staging

    def _flush(self) -> None:
        assert self.staging is not None
        try:
            flush_filesystem(self.staging)
        except OSError as exc:
            raise_if_disk_full(exc, self.staging)
            raise TransferIncomplete(f"the copy could not be written to disk: {exc.strerror}") from None
        self.flushed = True

    async def flush(self) -> None:
        """Write the staged copy to disk before commit(), in a thread: a signal meanwhile cancels cleanly."""
        # On disk before it goes live (and before the app is stopped, so the
        # flush does not lengthen its downtime): after a crash the app is
        # then the whole old copy or the whole new one, never empty files.
        with self.report.stage("flush"):
            await asyncio.to_thread(self._flush)

    def commit(self, source_domain: str | None, keep_urls: bool) -> None:
        """Swap the verified staging copy in, with hooks; signals wait until it is consistent."""
        assert self.staging is not None
        if not self.flushed:
            with self.report.stage("flush"):
                self._flush()
        with held_signals() as pending:
            try:
                switch(self.cfg, self.peer, self.app, self.staging, source_domain, keep_urls, self.report)
            finally:
                if os.path.lexists(self.staging):
                    remove_tree(self.staging)
        if pending:
            self.report.notes.append("an interrupt arrived during the swap; the swap finished first")


async def run_transfer(cfg: Config, kind: str, report: Report, work: Awaitable[T],
                       interrupted: str) -> T:
    """Run a pull or push: SIGTERM cancels it like Ctrl-C, errors carry the report, all is logged."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr]
    try:
        result = await work
    except PeerkitError as exc:
        exc.report = report  # type: ignore[attr-defined]
        log_transfer(cfg, kind, report, exc)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        stopped = Interrupted(interrupted)
        stopped.report = report  # type: ignore[attr-defined]
        log_transfer(cfg, kind, report, stopped)
        raise stopped from None
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    log_transfer(cfg, kind, report, None)
    return result
