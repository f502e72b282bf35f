"""Get a transfer's data onto the disk before the swap makes it the live app.

Neither tar nor rsync syncs what it writes: after a crash shortly after a
swap, the new app could hold empty or partial files while the old one had
already been removed.  peerkit therefore flushes the staging copy's
filesystem once (``syncfs``) before the swap.  To keep that flush short, a
tar transfer runs ``BackgroundFlush``: a thread that syncs the filesystem
whenever another 16 MiB arrived, so the disk writes while the network
delivers.  It must be a thread: starting write-back from the extractor
itself (``sync_file_range`` per file, tried first) blocked the event loop
whenever the disk queue was full, and cost more than it saved (README,
Benchmarks).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

try:
    _libc = ctypes.CDLL(None, use_errno=True)  # CDLL: calls release the GIL
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
except (AttributeError, OSError):  # pragma: no cover - not glibc/Linux
    _syncfs = None

# Sync again after this many new bytes: large enough that a sync is worth
# its fixed cost, small enough that the final flush has little left.  16 MiB
# against 64: the final flush of a 1 GiB pull 0.09-0.12 -> 0.02-0.03 s, the
# transfer no slower, and no cost to 20,000 small files (README, Benchmarks).
FLUSH_STEP = 16 << 20


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


class BackgroundFlush:
    """Sync the filesystem holding ``path`` from a thread, each time ``step`` more bytes were written.

    Only a head start: errors are ignored here, because ``flush_filesystem``
    before the swap is what the swap relies on, and it reports them.
    """

    def __init__(self, path: str | os.PathLike, step: int = FLUSH_STEP) -> None:
        self._step = step
        self._pending = 0
        self.syncs = 0  # how many background syncs ran (for tests and curiosity)
        self._wake = threading.Event()
        self._stop = False
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="flush", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        """Count ``n`` bytes written; wake the thread once a step is full (never waits)."""
        self._pending += n
        if self._pending >= self._step:
            self._pending = 0
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            if _syncfs is not None:
                _syncfs(self._fd)  # waits for the disk, in this thread only
            self.syncs += 1

    def close(self) -> None:
        """Stop the thread (after a sync in progress ends); safe to call twice."""
        if not self._stop:
            self._stop = True
            self._wake.set()
            self._thread.join()
            os.close(self._fd)
