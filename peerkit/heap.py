"""Tune the C heap for bulk transfers: keep freed memory instead of returning it to the kernel.

A transfer allocates and frees a few hundred KiB per received SSH packet
(asyncssh slices its input buffer; each chunk becomes a new bytes object).
glibc's default trims the top of the heap as soon as 128 KiB are free, so the
next packet's buffer is fresh memory the kernel must zero page by page: a
1 GiB pull took a million page faults and about 3 s of system time.  Keeping
a bounded amount of freed memory makes the heap reuse its pages.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# Free memory kept at the top of the heap before trimming, padding added
# to every heap growth, and the size from which blocks get their own mmap.
TRIM_THRESHOLD = 64 << 20
TOP_PAD = 16 << 20
MMAP_THRESHOLD = 4 << 20

_done = False


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed memory; return False where that is not possible (not glibc)."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
    _done = ok
    return ok
