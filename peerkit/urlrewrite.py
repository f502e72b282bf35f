"""Repoint a pulled app from the source peer's domain to ours."""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

from .atomicfile import write_atomic
from .listing import open_listing

MAX_FILE = 16 << 20


def _pattern(domain: str) -> re.Pattern[bytes]:
    # Whole labels only: "example.org" must not turn "myexample.org" into
    # "myours.org", nor "example.org.uk" into "ours.org.uk"; subdomains
    # ("app.example.org") are rewritten.
    return re.compile(rb"(?<![A-Za-z0-9-])" + re.escape(domain.encode("ascii")) + rb"(?!\.?[A-Za-z0-9-])",
                      re.IGNORECASE)


def _matcher(globs: tuple[str, ...]) -> Callable[[str, str], bool]:
    """Return match(relative path, name): a glob with '/' matches the relative path, any other the name."""
    def one(patterns: list[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(fnmatch.translate(g) for g in patterns)) if patterns else None

    by_path, by_name = one([g for g in globs if "/" in g]), one([g for g in globs if "/" not in g])
    return lambda rel, name: bool(by_name and by_name.match(name) or by_path and by_path.match(rel))


def rewrite(app_dir: Path, source: str, target: str, globs: tuple[str, ...]) -> list[str]:
    """Replace ``source`` with ``target`` in the matching text files; return what changed."""
    pattern, replacement = _pattern(source), target.encode("ascii")
    changed: list[str] = []
    for rel in _candidates(app_dir, _matcher(globs)):
        path = app_dir / rel
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


def _candidates(app_dir: Path, match: Callable[[str, str], bool]) -> Iterator[str]:
    """Yield the relative path of every non-directory under ``app_dir`` that ``match`` accepts.

    Never through a symlinked directory.  Only the matching names of a
    directory are kept, and given once its listing is closed: a rewrite
    renames a new file over the old one, and whether a listing still open
    shows that name again is left to the filesystem (POSIX leaves it
    unspecified), where a second pass would rewrite the file twice.  The
    names that do not match are never kept, so an app of a million files
    walks in the memory of a few (os.walk lists each directory whole: about
    150 bytes a file).
    """
    stack: list[tuple[Iterator[os.DirEntry], Any, str, list[str]]] = [(*_listing(str(app_dir), 0), "", [])]
    try:
        while stack:
            entries, listing, prefix, found = stack[-1]
            entry = next(entries, None)
            if entry is None:
                if listing is not None:
                    listing.close()
                stack.pop()
                yield from found
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                stack.append((*_listing(entry.path, len(stack)), rel + "/", []))
            elif match(rel, entry.name):
                found.append(rel)
    finally:
        for _, listing, _, _ in stack:
            if listing is not None:
                listing.close()


def _listing(path: str, depth: int) -> tuple[Iterator[os.DirEntry], Any]:
    """Return ``listing.open_listing(path, depth)``; a directory that cannot be listed is empty.

    As under os.walk: a 0o000 directory (another user than root cannot list
    it) has nothing to rewrite.
    """
    try:
        return open_listing(path, depth)
    except OSError:
        return iter(()), None
