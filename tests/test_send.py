"""peerkit.send: how peer-shell starts rsync (os.posix_spawn, with what subprocess gave it before)."""

from __future__ import annotations

import os
import signal

import pytest

from peerkit import send


def _run(argv: list[str], fds: tuple[int, int, int]) -> int:
    return send._wait(send._spawn(argv, fds))


def test_the_child_gets_its_three_fds_and_nothing_else_of_ours(tmp_path):
    out = tmp_path / "fds"
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)  # what close_fds is for: an fd someone made inheritable
    kept = os.open(os.devnull, os.O_RDONLY)  # not inheritable: gone at exec anyway
    with open(out, "wb") as fh:
        try:
            status = _run(["/bin/sh", "-c", "ls /proc/self/fd"], (0, fh.fileno(), 2))
        finally:
            os.close(leak)
            os.close(kept)
    assert status == 0
    # ls's own directory fd shows up too (3 here): nothing else.
    listed = sorted(int(name) for name in out.read_text().split())
    assert listed[:3] == [0, 1, 2] and len(listed) == 4, listed


def test_fds_in_each_others_places_are_not_overwritten(tmp_path):
    # The embedded server's fds can be anything, 0-2 among them: stdin
    # given as fd 1 and stdout as fd 0 must still reach the child as such.
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    saved = [os.dup(0), os.dup(1)]
    try:
        os.dup2(r_in, 1)   # the child's stdin is our fd 1
        os.dup2(w_out, 0)  # its stdout our fd 0
        os.write(w_in, b"hello\n")
        os.close(w_in)
        pid = send._spawn(["/bin/cat"], (1, 0, 2))
    finally:
        os.dup2(saved[0], 0)
        os.dup2(saved[1], 1)
        for fd in (*saved, r_in, w_out):
            os.close(fd)
    assert send._wait(pid) == 0
    assert os.read(r_out, 100) == b"hello\n"
    os.close(r_out)


def test_rsync_gets_a_fixed_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RSYNC_RSH", "evil")
    out = tmp_path / "env"
    with open(out, "wb") as fh:
        assert _run(["/usr/bin/env"], (0, fh.fileno(), 2)) == 0
    assert sorted(out.read_text().split()) == ["LC_ALL=C", "PATH=/usr/local/bin:/usr/bin:/bin"]


def test_exit_statuses_read_as_subprocess_reads_them():
    assert _run(["/bin/sh", "-c", "exit 23"], (0, 1, 2)) == 23
    assert _run(["/bin/sh", "-c", "kill -TERM $$"], (0, 1, 2)) == -signal.SIGTERM


def test_a_missing_program_raises_and_leaves_no_fd_behind():
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        send._spawn(["/nonexistent/rsync"], (1, 0, 2))  # copies made for the swapped fds go too
    assert sorted(os.listdir("/proc/self/fd")) == before
