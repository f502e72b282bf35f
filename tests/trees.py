"""Snapshot and build directory trees for tests.

:func:`snapshot` maps every path beneath a directory (not following symlinks)
to a comparable record, so a test can assert that an extracted tree equals
its source or that a directory was left unchanged.  :func:`build_mixed_tree`
makes the varied source tree the archive round-trip tests use.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def _sha256(path: str) -> str:
    """Return the hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def record(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """Describe one file system object (lstat, never following a symlink)."""
    st = st or os.lstat(path)
    mode = st.st_mode
    rec: dict[str, Any] = {"mode": stat.S_IMODE(mode), "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(mode):
        rec.update(type="file", size=st.st_size, sha256=_sha256(path),
                   mtime=st.st_mtime_ns // 1_000_000_000)
    elif stat.S_ISDIR(mode):
        rec.update(type="dir", mtime=st.st_mtime_ns // 1_000_000_000)
    elif stat.S_ISLNK(mode):
        rec.update(type="symlink", target=os.readlink(path))
        del rec["mode"]  # symlink permission bits are meaningless on Linux
    else:
        rec.update(type="other", fmt=stat.S_IFMT(mode))
    return rec


def snapshot(path: str | os.PathLike, *, include_root: bool = True,
             exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Map each relative path under path ('.' for the root) to its record.

    Symlinks are recorded, never followed.  ``exclude`` names top-level
    entries to leave out (with everything below them).
    """
    root = os.fspath(path)
    out: dict[str, dict[str, Any]] = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        full = os.path.join(root, rel) if rel else root
        st = os.lstat(full)
        if rel or include_root:
            out[rel or "."] = record(full, st)
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(full):
                if not rel and name in exclude:
                    continue
                stack.append(os.path.join(rel, name))
    return out


def diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    """Return human-readable differences between two snapshots (empty if equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            out.append(f"only in second: {key!r} {b[key]}")
        elif key not in b:
            out.append(f"only in first: {key!r} {a[key]}")
        elif a[key] != b[key]:
            out.append(f"differs: {key!r} {a[key]} != {b[key]}")
    return out


def inode_groups(path: str | os.PathLike) -> list[list[str]]:
    """Return groups (size > 1) of relative paths that share one inode (hard links)."""
    root = os.fspath(path)
    groups: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                groups.setdefault((st.st_dev, st.st_ino), []).append(os.path.relpath(full, root))
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def build_mixed_tree(root: str | os.PathLike, *, big_size: int = 20 << 20,
                     small_files: int = 500, seed: int = 1234,
                     other_owner: tuple[int, int] | None = (1234, 5678)) -> None:
    """Populate an existing empty directory with a varied tree for round-trip tests.

    Nested and empty directories, a 0o555 directory with files, a sticky
    directory, relative symlinks (to files, to a directory, dangling), a hard
    link, a big file, many small files, long names (> 100 bytes) and link
    targets, names with spaces and UTF-8, assorted modes and mtimes, and (as
    root, when other_owner is given) files owned by other ids.
    """
    rng = random.Random(seed)
    root = os.fspath(root)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    t0 = 1_600_000_000

    def write(rel: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file, set its mode and a pseudo-random mtime."""
        with open(j(rel), "wb") as f:
            f.write(data)
        os.chmod(j(rel), mode)
        ns = (t0 + rng.randrange(10**8)) * 1_000_000_000 + rng.choice([0, 250_000_000, 500_000_000])
        os.utime(j(rel), ns=(ns, ns))

    dirs = ["a", "a/b", "a/b/c", "empty", "ro", "links", "many", "sticky",
            "dir with space", "ünïcödé", "ünïcödé/日本語", "long", "n" * 120]
    dirs += [f"many/d{i:02d}" for i in range(10)]
    for d in dirs:
        os.makedirs(j(d), exist_ok=True)

    write("top.txt", b"top\n" * 1000)
    write("exec.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write("secret", b"s3cr3t\n", 0o600)
    write("zero-length", b"", 0o640)
    write("a/b/c/deep.txt", b"deep\n")
    write("ro/one.txt", b"one\n", 0o444)
    write("ro/two.txt", b"two\n" * 3000, 0o644)
    write("dir with space/file with space.txt", b"spaces\n")
    write("ünïcödé/日本語/ファイル 名.txt", "データ\n".encode())
    write("long/" + "x" * 150 + ".txt", b"long name\n")
    write("n" * 120 + "/" + "y" * 90, b"long dir\n")
    write("big.bin", rng.randbytes(big_size), 0o640)
    for i in range(small_files):
        write(f"many/d{i % 10:02d}/f{i:04d}", rng.randbytes(rng.randrange(0, 3000)))

    os.link(j("top.txt"), j("a/hard.txt"))
    os.symlink("../top.txt", j("links/up"))
    os.symlink("../a/b/c/deep.txt", j("links/down"))
    os.symlink("c", j("a/b/dirlink"))
    os.symlink("missing", j("links/dangling"))
    os.symlink(".", j("links/self"))
    os.symlink("../long/" + "x" * 150 + ".txt", j("links/long-target"))
    os.symlink("ファイル 名.txt", j("ünïcödé/日本語/link"))

    if other_owner is not None and os.geteuid() == 0:
        uid, gid = other_owner
        os.chown(j("exec.sh"), uid, gid)
        os.chown(j("many/d03"), uid, gid)
        os.chown(j("links/up"), uid, gid, follow_symlinks=False)
        os.chown(j("secret"), 3_000_000, 3_000_001)  # beyond 7 octal digits: base-256 / pax

    modes = {"empty": 0o750, "ro": 0o555, "sticky": 0o1777, "a/b": 0o711}
    for d in sorted(dirs, key=lambda p: p.count("/"), reverse=True) + ["."]:
        os.chmod(j(d), modes.get(d, 0o755))
        ns = (t0 + rng.randrange(10**8)) * 1_000_000_000
        os.utime(j(d), ns=(ns, ns))


def make_tree(root: Path, entries: dict[str, Any]) -> Path:
    """Create ``root`` from {relpath: bytes | None (a directory) | ("link", target)}; return it."""
    for rel, body in entries.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if body is None:
            path.mkdir()
        elif isinstance(body, tuple):
            os.symlink(body[1], path)
        else:
            path.write_bytes(body)
    return root


def fds_into(path: Path) -> list[str]:
    """What this process still has open under ``path`` (a removed directory reads "<path> (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own fd, closed by now
            continue
        if target == str(path) or target.startswith(f"{path}/") or target == f"{path} (deleted)":
            found.append(target)
    return found
