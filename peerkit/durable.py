"""Get a transfer's data onto the disk before the swap makes it the live app.

Neither tar nor rsync syncs what it writes: after a crash shortly after a
swap, the new app could hold empty or partial files while the old one had
already been removed.  peerkit therefore flushes the staging copy's
filesystem once (``syncfs``) before the swap.  To keep that flush short, the
extractor asks the kernel to start writing each file back while the
transfer is still running (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``,
which does not wait), so disk and network work at the same time.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_SYNC_FILE_RANGE_WRITE = 2

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except (AttributeError, OSError):  # pragma: no cover - not glibc/Linux
    _syncfs = None
    _sync_file_range = None

# Start writeback after this many new bytes of one file (a few per stream
# chunk would cost a syscall each for no gain).
WRITEBACK_STEP = 8 << 20


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` of ``fd`` (0 = to the end); never wait."""
    if _sync_file_range is not None:
        # A hint only: an error (a filesystem without support) changes nothing
        # because flush_filesystem() below is what the swap relies on.
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def flush_filesystem(path: Path) -> None:
    """Write every dirty page of the filesystem holding ``path`` to disk, and wait for it."""
    if _syncfs is None:
        os.sync()  # no syncfs here: the whole system, which is never less
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            # A write-back error (EIO, ENOSPC): the copy is not safely on disk.
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
