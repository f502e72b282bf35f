"""The flush before the swap: the staged copy is on disk before it goes live, or nothing changes."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from pathlib import Path

import pytest

from peerkit import durable
from peerkit.errors import NoSpace, TransferIncomplete
from peerkit.install import Receiver, Report
from tests.instances import make_instance


def test_flush_filesystem_of_a_directory(tmp_path):
    (tmp_path / "data").write_bytes(os.urandom(1 << 20))
    durable.flush_filesystem(tmp_path)


def test_flush_refuses_what_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        durable.flush_filesystem(tmp_path / "file")
    with pytest.raises(FileNotFoundError):
        durable.flush_filesystem(tmp_path / "missing")


def test_start_writeback_leaves_the_file_as_written(tmp_path):
    data = os.urandom(3 * durable.WRITEBACK_STEP // 2)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        durable.start_writeback(fd, 0, durable.WRITEBACK_STEP)
        durable.start_writeback(fd, durable.WRITEBACK_STEP, 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


class _FailingSyncfs:
    """Stands in for syncfs(2) reporting a write-back error.

    A real one needs a failing block device (dm-error or dm-flakey), which a
    test cannot create here; everything else in these tests is real.
    """

    def __init__(self, err: int) -> None:
        self.err = err
        self.calls = 0

    def __call__(self, fd: int) -> int:
        self.calls += 1
        ctypes.set_errno(self.err)
        return -1


@pytest.fixture
def receiver_world(tmp_path):
    cfg = make_instance(tmp_path / "inst", "alpha")
    live = cfg.apps_dir / "wiki"
    live.mkdir(parents=True)
    (live / "page.txt").write_text("old\n")
    marks = tmp_path / "marks"
    marks.mkdir()
    # The stop hook leaves a mark: it must not run when the flush fails.
    hooks = dataclasses.replace(cfg.hooks, stop=(("/bin/sh", "-c", f"touch {marks}/stopped"),))
    return dataclasses.replace(cfg, hooks=hooks), live, marks


def _staged(receiver: Receiver) -> Path:
    staging = receiver.new_staging()
    (staging / "page.txt").write_text("new\n")
    return staging


def test_the_copy_goes_live_only_after_the_flush(receiver_world):
    cfg, live, marks = receiver_world
    report = Report("beta", "wiki")
    with Receiver(cfg, "wiki", "beta", report) as receiver:
        _staged(receiver)
        receiver.commit(None, keep_urls=True)
    names = [s.name for s in report.stages]
    assert names.index("flush") < names.index("stop") < names.index("swap")
    assert (live / "page.txt").read_text() == "new\n" and (marks / "stopped").exists()


@pytest.mark.parametrize(("err", "expected"), [(errno.EIO, TransferIncomplete), (errno.ENOSPC, NoSpace)])
def test_a_failed_flush_changes_nothing(receiver_world, monkeypatch, err, expected):
    cfg, live, marks = receiver_world
    failing = _FailingSyncfs(err)
    monkeypatch.setattr(durable, "_syncfs", failing)
    report = Report("beta", "wiki")
    with pytest.raises(expected):
        with Receiver(cfg, "wiki", "beta", report) as receiver:
            staging = _staged(receiver)
            receiver.commit(None, keep_urls=True)
    assert failing.calls == 1
    assert (live / "page.txt").read_text() == "old\n"
    assert not (marks / "stopped").exists()  # the app was never stopped
    assert not staging.exists() and sorted(p.name for p in cfg.apps_dir.iterdir()) == ["wiki"]
    assert [(s.name, s.outcome) for s in report.stages][-1] == ("flush", "failed")


def test_an_interrupt_during_the_flush_changes_nothing(receiver_world, monkeypatch):
    """Ctrl-C or SIGTERM while the copy is being written to disk: cancelled, the app as it was."""
    import asyncio
    import threading

    cfg, live, marks = receiver_world
    started, release = threading.Event(), threading.Event()

    def slow_syncfs(fd: int) -> int:  # a disk that takes its time (stand-in, see above)
        started.set()
        release.wait(10)
        return 0

    monkeypatch.setattr(durable, "_syncfs", slow_syncfs)
    report = Report("beta", "wiki")

    async def pull_until_cancelled() -> None:
        with Receiver(cfg, "wiki", "beta", report) as receiver:
            staging = _staged(receiver)
            flushing = asyncio.ensure_future(receiver.flush())
            await asyncio.to_thread(started.wait, 10)
            flushing.cancel()  # what run_transfer's SIGTERM handler and asyncio's SIGINT handler do
            try:
                await flushing
            finally:
                release.set()
                assert staging.exists()  # still ours to remove, by the Receiver
        receiver.commit(None, keep_urls=True)  # never reached

    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(pull_until_cancelled())
    finally:
        release.set()
    assert (live / "page.txt").read_text() == "old\n" and not (marks / "stopped").exists()
    assert sorted(p.name for p in cfg.apps_dir.iterdir()) == ["wiki"]
    assert [(s.name, s.outcome) for s in report.stages][-1] == ("flush", "failed")
