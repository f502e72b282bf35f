"""The flush before the swap: the staged copy is on disk before it goes live, or nothing changes."""

from __future__ import annotations

import ctypes
import errno
import os
import time
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


def test_background_flush_syncs_once_per_step_in_its_own_thread(tmp_path):
    flusher = durable.BackgroundFlush(tmp_path, step=1 << 20)
    try:
        data = os.urandom(1 << 20)
        for i in range(3):
            (tmp_path / f"f{i}").write_bytes(data)
            flusher.wrote(len(data))
            # Each full step wakes the thread; wait for its sync to be counted.
            deadline = time.monotonic() + 10
            while flusher.syncs < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert flusher.syncs == i + 1
        flusher.wrote((1 << 20) - 1)  # short of a step: no sync
        time.sleep(0.1)
        assert flusher.syncs == 3
    finally:
        flusher.close()
    flusher.close()  # twice is harmless
    assert all((tmp_path / f"f{i}").read_bytes() == data for i in range(3))


def test_background_flush_ignores_a_failing_sync_the_final_flush_reports_it(tmp_path, monkeypatch):
    failing = _FailingSyncfs(errno.EIO)
    monkeypatch.setattr(durable, "_syncfs", failing)
    flusher = durable.BackgroundFlush(tmp_path, step=1)
    flusher.wrote(1)
    deadline = time.monotonic() + 10
    while flusher.syncs < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    flusher.close()
    assert failing.calls == 1 and flusher.syncs == 1
    with pytest.raises(OSError) as caught:
        durable.flush_filesystem(tmp_path)
    assert caught.value.errno == errno.EIO


def test_background_flush_needs_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        durable.BackgroundFlush(tmp_path / "missing")


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
    hooks = cfg.hooks._replace(stop=(("/bin/sh", "-c", f"touch {marks}/stopped"),))
    return cfg._replace(hooks=hooks), live, marks


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


def test_a_decompressor_that_cannot_start_leaves_no_flush_thread_or_fd(tmp_path, monkeypatch):
    import threading

    from peerkit import compress, receive

    cfg = make_instance(tmp_path / "inst", "alpha")
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(compress, "zstd_binary", lambda: None)  # zstd vanished after the choice
    fds_before = set(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        with pytest.raises(Exception, match="zstd is not installed"):
            receive._extract_stdin(cfg, staging, r, True, Report("beta", "app"), {})
    finally:
        os.close(r)
        os.close(w)
    assert not any(t.name == "flush" and t.is_alive() for t in threading.enumerate())
    assert set(os.listdir("/proc/self/fd")) <= fds_before
