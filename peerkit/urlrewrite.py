"""Repoint a pulled app from the source peer's domain to ours."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from pathlib import Path

from .atomicfile import write_atomic

MAX_FILE = 16 << 20


def _pattern(domain: str) -> re.Pattern[bytes]:
    # Whole labels only: "example.org" must not turn "myexample.org" into
    # "myours.org", nor "example.org.uk" into "ours.org.uk"; subdomains
    # ("app.example.org") are rewritten.
    return re.compile(rb"(?<![A-Za-z0-9-])" + re.escape(domain.encode("ascii")) + rb"(?!\.?[A-Za-z0-9-])",
                      re.IGNORECASE)


def _matches(rel: str, globs: tuple[str, ...]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel if "/" in g else name, g) for g in globs)


def rewrite(app_dir: Path, source: str, target: str, globs: tuple[str, ...]) -> list[str]:
    """Replace ``source`` with ``target`` in the matching text files; return what changed."""
    pattern, replacement = _pattern(source), target.encode("ascii")
    changed: list[str] = []
    for top, dirs, files in os.walk(app_dir):  # os.walk never follows symlinked dirs
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            rel = path.relative_to(app_dir).as_posix()
            if not _matches(rel, globs):
                continue
            st = os.lstat(path)
            # Symlinks could point outside the app; huge files are not config.
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
                continue
            data = path.read_bytes()
            if b"\0" in data[:8192]:
                continue  # binary
            new = pattern.sub(replacement, data)
            if new != data:
                write_atomic(path, new, mode=stat.S_IMODE(st.st_mode))
                changed.append(rel)
    return sorted(changed)
