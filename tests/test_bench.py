"""Tests for the benchmark harness's own helpers (the benchmarks themselves are a separate command)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from peerkit.bench import run


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def filesystem_type(path: Path) -> str:
    return subprocess.run(["stat", "--file-system", "--format=%T", str(path)],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")
def test_evict_drops_a_discarded_tree_from_the_page_cache_and_follows_no_link(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs pages have no other copy: nothing can drop them")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(1 << 20))
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    files = [tree / "a.bin", tree / "d" / "b.bin"]
    for f in files:
        f.write_bytes(os.urandom(4 << 20))  # dirty: evict must write them out first
    (tree / "d" / "link").symlink_to(outside)
    assert all(resident_pages(f) > 0 for f in [*files, outside])
    assert run.evict(tree) == 2
    assert [resident_pages(f) for f in files] == [0, 0]
    assert resident_pages(outside) > 0, "a symlink led evict out of the tree"
    assert [f.stat().st_size for f in files] == [4 << 20, 4 << 20]
