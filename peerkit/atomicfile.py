"""Crash-safe file replacement and advisory locks for files others read.

authorized_keys, config.yaml and friends are read by sshd and by other
peerkit processes at any moment, so they are never written in place: a
temporary file in the same directory is written, fsynced, given its final
mode (and owner), renamed over the target, and the directory is fsynced.
Writers serialise on an flock'd side file so concurrent read-modify-write
cycles never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import Busy


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd``, looping over short writes (pipes, sockets)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically, with ``mode`` set before the rename."""
    path = Path(path)
    parent = path.parent
    owner = None
    try:
        st = os.stat(path, follow_symlinks=False)
        owner = (st.st_uid, st.st_gid)
    except FileNotFoundError:
        pass
    tmp = parent / f".{path.name}.peerkit-{os.getpid()}-{time.monotonic_ns()}.tmp"
    # O_EXCL with mode 0600: the secret-bearing temp file is never readable
    # by others, not even for the instant before chmod.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


def read_bytes(path: str | os.PathLike) -> bytes | None:
    """Return the file's bytes, or None if it does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive flock on ``<path>.lock`` for the duration of the block."""
    lock_path = Path(str(path) + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() >= deadline:
                    raise Busy(f"{lock_path} is held by another process") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        yield
    finally:
        os.close(fd)  # closing releases the flock
