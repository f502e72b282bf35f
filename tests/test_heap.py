"""peerkit.heap: after the tuning, churning transfer-sized buffers reuses memory instead of faulting."""

from __future__ import annotations

import subprocess
import sys

_CHURN = """
import os, resource, sys
from peerkit import heap
if sys.argv[1] == "tuned":
    assert heap.keep_freed_memory()
keep = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(400):
    chunk = os.urandom(1) * (300 << 10)   # what a received packet costs: a buffer...
    keep.append(chunk[1000:])             # ...and the slice handed on
    if len(keep) > 4:
        keep.pop(0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_tuned_heap_reuses_freed_buffers():
    # 400 buffers of 300 KiB touch ~30,000 fresh pages if every free goes back to the kernel.
    plain, tuned = _faults("plain"), _faults("tuned")
    assert tuned < 2000
    assert tuned * 3 < plain


def test_tuning_twice_is_harmless():
    from peerkit import heap

    assert heap.keep_freed_memory() is True
    assert heap.keep_freed_memory() is True
