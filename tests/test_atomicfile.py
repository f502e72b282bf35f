"""peerkit.atomicfile: atomic replacement with the final mode, and the writers' lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peerkit.atomicfile import locked, read_bytes, write_atomic
from peerkit.errors import Busy


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty directory of our own (tmp_path also holds the test's HOME)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400])
def test_write_creates_file_with_exact_mode_whatever_the_umask(work, mode):
    path = work / "f"
    old = os.umask(0o077 if mode & 0o044 else 0)
    try:
        write_atomic(path, b"hello\n", mode=mode)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"hello\n"
    assert _mode(path) == mode
    assert os.listdir(work) == ["f"]


def test_replace_changes_bytes_and_mode_and_leaves_no_temp_files(work):
    path = work / "authorized_keys"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o666)
    write_atomic(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert _mode(path) == 0o600
    write_atomic(path, b"")
    assert path.read_bytes() == b""
    big = os.urandom(3 << 20)
    write_atomic(path, big)
    assert path.read_bytes() == big
    assert os.listdir(work) == ["authorized_keys"]


def test_replace_is_a_rename_not_an_in_place_write(work):
    path = work / "f"
    path.write_bytes(b"old")
    with open(path, "rb") as reader:  # a reader holding the old file sees it whole
        write_atomic(path, b"new content")
        assert reader.read() == b"old"
    assert path.read_bytes() == b"new content"


def test_a_symlink_target_is_replaced_not_followed(work):
    victim = work / "victim"
    victim.write_bytes(b"secret")
    link = work / "link"
    link.symlink_to(victim)
    write_atomic(link, b"x")
    assert victim.read_bytes() == b"secret"
    assert not link.is_symlink() and link.read_bytes() == b"x"


def test_file_is_never_visible_with_another_mode_or_partial_content(work):
    path = work / "f"
    contents = [bytes([65 + i % 26]) * 50_000 for i in range(60)]
    write_atomic(path, contents[0], mode=0o640)
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                seen.append((-1, -1))
                continue
            try:
                mode = stat.S_IMODE(os.fstat(fd).st_mode)
                data = os.read(fd, 100_000)
            finally:
                os.close(fd)
            seen.append((mode, len(data) if data in contents else -2))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for data in contents:
            write_atomic(path, data, mode=0o640)
    finally:
        stop.set()
        watcher.join()
    assert seen, "the watcher never ran"
    assert set(seen) == {(0o640, 50_000)}
    assert os.listdir(work) == ["f"]


def test_missing_parent_raises_and_leaves_nothing(work):
    with pytest.raises(FileNotFoundError):
        write_atomic(work / "no" / "such" / "f", b"x")
    assert os.listdir(work) == []


def test_failure_during_write_keeps_old_content_and_no_temp(work):
    path = work / "f"
    path.write_bytes(b"precious")
    os.chmod(path, 0o600)
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"precious"
    assert os.listdir(work) == ["f"]


def test_failure_at_rename_keeps_target_and_no_temp(work):
    target = work / "d"
    target.mkdir()
    (target / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):
        write_atomic(target, b"x")
    assert (target / "inside").read_bytes() == b"kept"
    assert sorted(os.listdir(work)) == ["d"]


def test_read_bytes(work):
    assert read_bytes(work / "missing") is None
    (work / "f").write_bytes(b"\x00\xffab")
    assert read_bytes(work / "f") == b"\x00\xffab"


# -- locking ------------------------------------------------------------------

HOLDER = """
import sys, time
from peerkit.atomicfile import locked
with locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock on tmp_path/'ak' until its stdin closes."""
    target = tmp_path / "ak"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield target, proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=10)


def test_lock_held_by_another_process_gives_busy(holder):
    target, _ = holder
    started = time.monotonic()
    with pytest.raises(Busy) as info:
        with locked(target, timeout=0.3):
            pytest.fail("acquired a lock another process holds")
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3
    assert info.value.code == "busy" and info.value.exit_code == 15


def test_lock_is_acquired_once_the_holder_exits(holder):
    target, proc = holder
    threading.Timer(0.2, proc.stdin.close).start()
    started = time.monotonic()
    with locked(target, timeout=10):
        waited = time.monotonic() - started
    assert 0.1 < waited < 10
    assert proc.wait(timeout=10) == 0


def test_lock_is_released_after_the_block_even_on_error(tmp_path):
    target = tmp_path / "ak"
    with pytest.raises(RuntimeError):
        with locked(target):
            raise RuntimeError("boom")
    # Another process can take it immediately.
    code = "import sys\nfrom peerkit.atomicfile import locked\nwith locked(sys.argv[1], timeout=0.2): pass\n"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, timeout=30)
    assert stat.S_IMODE((tmp_path / "ak.lock").stat().st_mode) == 0o600
    assert not target.exists()


def test_lock_serialises_read_modify_write_cycles(tmp_path):
    target = tmp_path / "counter"
    write_atomic(target, b"0")
    code = """
import sys
from pathlib import Path
from peerkit.atomicfile import locked, write_atomic
p = Path(sys.argv[1])
for _ in range(20):
    with locked(p):
        n = int(p.read_bytes())
        write_atomic(p, str(n + 1).encode())
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 3
    assert target.read_bytes() == b"60"
