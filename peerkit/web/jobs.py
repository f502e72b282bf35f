"""Pulls started from the page: one CLI process each, its latest progress and its result.

A job keeps only the last progress event and the final result, so a pull
of any length costs the same memory; browsers follow a job by waiting for
its next change.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from .runner import Cli

_KEEP_FINISHED = 50
_STOP_GRACE = 60.0


@dataclass
class PullJob:
    """One `peerkit pull` run by the page."""

    id: str
    peer: str
    app: str
    pre_backup: bool
    rewrite_urls: bool
    started: float = field(default_factory=time.time)
    progress: dict[str, Any] | None = None
    progress_events: int = 0
    result: dict[str, Any] | None = None
    version: int = 0
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def done(self) -> bool:
        return self.result is not None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "peer": self.peer, "app": self.app, "pre_backup": self.pre_backup,
                "rewrite_urls": self.rewrite_urls, "started": self.started, "done": self.done,
                "progress": self.progress, "progress_events": self.progress_events, "result": self.result,
                "version": self.version}

    async def _bump(self) -> None:
        async with self.changed:
            self.version += 1
            self.changed.notify_all()

    async def wait_change(self, seen: int, timeout: float) -> int:
        """Wait until the job's version passes ``seen`` (or ``timeout``); return the version."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.version > seen), timeout)
            except asyncio.TimeoutError:
                pass
            return self.version


def pull_args(peer: str, app: str, *, pre_backup: bool, rewrite_urls: bool) -> list[str]:
    """Return the CLI arguments of a pull with the page's two safety toggles."""
    args = ["pull"]
    if not pre_backup:
        args.append("--no-pre-backup")
    if not rewrite_urls:
        args.append("--keep-urls")
    # `--` ends the options: a name can never be read as one.
    return [*args, "--", peer, app]


class PullJobs:
    """The pulls this page started, newest last."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.jobs: dict[str, PullJob] = {}

    def get(self, job_id: str) -> PullJob | None:
        return self.jobs.get(job_id)

    async def start(self, peer: str, app: str, *, pre_backup: bool, rewrite_urls: bool) -> PullJob:
        """Start `peerkit pull` for ``peer``/``app``; the CLI itself refuses a second pull of one app."""
        job = PullJob(secrets.token_urlsafe(12), peer, app, pre_backup, rewrite_urls)
        self._forget_old()
        self.jobs[job.id] = job
        job.proc = await self.cli.start(*pull_args(peer, app, pre_backup=pre_backup, rewrite_urls=rewrite_urls))
        job.task = asyncio.create_task(self._follow(job))
        return job

    async def _follow(self, job: PullJob) -> None:
        loop = asyncio.get_running_loop()

        def on_event(event: dict[str, Any]) -> None:
            job.progress = {k: event.get(k) for k in ("stage", "bytes", "total")}
            job.progress_events += 1
            loop.create_task(job._bump())

        assert job.proc is not None
        try:
            outcome = await self.cli.collect(job.proc, timeout=None, on_event=on_event)
            job.result = {**outcome.to_json(), "event": "result"}
        except BaseException:
            job.result = {"ok": False, "event": "result", "error": "interrupted",
                          "message": "the web UI stopped while the pull ran", "remarks": []}
            raise
        finally:
            await job._bump()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.done]
        for job in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del self.jobs[job.id]

    async def stop(self) -> None:
        """Ask running pulls to stop (SIGTERM: the CLI rolls back safely) and wait for them."""
        running = [j for j in self.jobs.values() if not j.done and j.task is not None]
        for job in running:
            if job.proc is not None and job.proc.returncode is None:
                job.proc.send_signal(signal.SIGTERM)
        if running:
            await asyncio.wait([j.task for j in running], timeout=_STOP_GRACE)
        for job in running:
            if job.proc is not None and job.proc.returncode is None:
                job.proc.kill()
