"""Directory listings for walks whose memory does not grow with the width of a directory.

A walk that keeps one listing open per level, instead of reading each
directory whole first (as ``os.walk`` and ``shutil.rmtree`` do, at 65 to 700
bytes an entry), holds only what the levels on its current path hold.  Each
open listing costs a file descriptor, so past ``STREAMED_LEVELS`` levels a
directory is read whole after all: a tree as deep as paths allow then stays
within the default 1,024 descriptors.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

STREAMED_LEVELS = 128


def open_listing(directory: int | str, depth: int) -> tuple[Iterator[os.DirEntry], Any]:
    """Return the entries of ``directory`` (a path or an fd) at ``depth``, and the listing to close (None: read whole)."""
    if depth >= STREAMED_LEVELS:
        with os.scandir(directory) as listing:
            return iter(list(listing)), None
    listing = os.scandir(directory)
    return iter(listing), listing
