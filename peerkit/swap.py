"""Staging directories beside the live app, and the atomic swap between them.

A transfer lands in ``<apps_dir>/.peerkit-staging-<app>-<random>`` (same
filesystem, never listed as an app).  The swap exchanges staging and live in
one ``renameat2(RENAME_EXCHANGE)`` call, so there is no instant at which the
app directory is missing; where the kernel or filesystem cannot exchange,
two renames do it.  The parent directory is fsynced so the swap survives a
crash.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from .atomicfile import fsync_dir

STAGING_PREFIX = ".peerkit-staging-"
ASIDE_PREFIX = ".peerkit-aside-"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except AttributeError:  # pragma: no cover - glibc before 2.28
    _renameat2 = None


def _rename2(src: Path, dst: Path, flags: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def new_staging(apps_dir: Path, app: str) -> Path:
    """Create an empty, private staging directory for ``app`` beside it."""
    apps_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = apps_dir / f"{STAGING_PREFIX}{app}-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    return path


def leftovers(apps_dir: Path, app: str) -> list[Path]:
    """Return staging and aside directories an interrupted run left for ``app``."""
    prefixes = (f"{STAGING_PREFIX}{app}-", f"{ASIDE_PREFIX}{app}-")
    try:
        entries = list(apps_dir.iterdir())
    except FileNotFoundError:
        return []
    # Exactly 12 random hex digits after the prefix, so app "web" never
    # claims the leftovers of app "web-2".
    return sorted(p for p in entries
                  if any(p.name.startswith(x) and len(p.name) == len(x) + 12 for x in prefixes))


def swap_in(staging: Path, live: Path) -> Path | None:
    """Put ``staging`` in place of ``live``; return where the old app now is (or None)."""
    parent = live.parent
    if not os.path.lexists(live):
        # First pull of this app: never overwrite something that appeared meanwhile.
        try:
            _rename2(staging, live, _RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            os.rename(staging, live)
        fsync_dir(parent)
        return None
    try:
        _rename2(staging, live, _RENAME_EXCHANGE)
        aside = staging
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # The filesystem cannot exchange: two renames, live first, so a crash
        # between them leaves the old app intact under the aside name.
        aside = parent / f"{ASIDE_PREFIX}{live.name}-{secrets.token_hex(6)}"
        os.rename(live, aside)
        os.rename(staging, live)
    fsync_dir(parent)
    return aside


def remove_tree(path: Path) -> None:
    """Delete a tree, including read-only directories an archive created."""
    def unlock(func, failed: str, _exc: object) -> None:
        # A 0o555 directory from the archive blocks deleting its entries.
        parent = os.path.dirname(failed)
        try:
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                # A directory rmtree could not open, list or remove (0o000,
                # 0o555 parent): unlock it and remove it with its contents.
                os.chmod(failed, stat.S_IRWXU)
                shutil.rmtree(failed, onerror=unlock)
            else:
                func(failed)
        except FileNotFoundError:
            pass

    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, onerror=unlock)
        else:
            os.unlink(path)
