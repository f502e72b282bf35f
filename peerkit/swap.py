"""Staging directories beside the live app, and the atomic swap between them.

A transfer lands in ``<apps_dir>/.peerkit-staging-<app>-<random>`` (same
filesystem, never listed as an app).  The swap exchanges staging and live in
one ``renameat2(RENAME_EXCHANGE)`` call, so there is no instant at which the
app directory is missing; where the kernel or filesystem cannot exchange,
two renames do it.  The parent directory is fsynced so the swap survives a
crash.  Incremental transfers find the files that did not change in a
link farm (``link_farm``), also a staging directory beside the app.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

from .atomicfile import fsync_dir
from .listing import open_listing

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
    """Delete a tree, including read-only directories an archive created; memory stays flat in its size.

    Each directory is opened with ``O_NOFOLLOW`` relative to its parent
    (a symlink is removed, never followed), made ``0o700`` so that its
    entries can go, and emptied while it is listed: what is kept is one
    listing per level, not every entry of a directory.  ``shutil.rmtree``
    lists each directory whole first, about 700 bytes an entry: a
    million-file directory of a pulled app cost 700 MB at the clean-up of
    every pull after it, and a peer's wide tree as much when its staging
    copy was removed.
    """
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    # the parent is the caller's (apps_dir may itself be a symlink): only a handle for the names in it
    parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = _open_writable_dir(parent, os.path.basename(path))
        if top >= 0:
            try:
                _empty_dir(top)
            finally:
                os.close(top)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(os.path.basename(path), dir_fd=parent)
    finally:
        os.close(parent)


def _empty_dir(top: int) -> None:
    """Remove everything inside the directory open at ``top``."""
    # (fd, its entries still to remove, the listing to close, its name in the level below);
    # an open listing holds a second fd (listing.STREAMED_LEVELS)
    stack: list[tuple[int, Iterator[os.DirEntry], Any, str]] = [(top, *open_listing(top, 0), "")]
    try:
        while stack:
            fd, entries, listing, _ = stack[-1]
            entry = next(entries, None)
            if entry is None:
                if listing is not None:
                    listing.close()
                _, _, _, name = stack.pop()
                if stack:
                    os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(name, dir_fd=stack[-1][0])
                continue
            if not _is_dir(entry):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
                continue
            sub = _open_writable_dir(fd, entry.name)
            if sub >= 0:
                try:
                    stack.append((sub, *open_listing(sub, len(stack)), entry.name))
                except BaseException:
                    os.close(sub)
                    raise
    finally:
        for fd, _, listing, _ in stack:
            if listing is not None:
                listing.close()
            if fd != top:
                os.close(fd)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except FileNotFoundError:
        return False


def _open_writable_dir(parent: int, name: str) -> int:
    """Open directory ``name`` without following a symlink and make it 0o700; -1 when it is gone.

    A symlink or file found there instead is unlinked.  A 0o000 directory
    cannot be opened for listing by its owner: it is opened as a path first
    and changed through /proc (the fd of a path has no fchmod).
    """
    for attempt in range(2):
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            break
        except FileNotFoundError:
            return -1
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # a file or a symlink now: remove that name only
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=parent)
                return -1
            if exc.errno != errno.EACCES or attempt:
                raise
        ref = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{ref}", stat.S_IRWXU)
        finally:
            os.close(ref)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & stat.S_IRWXU != stat.S_IRWXU:
            os.fchmod(fd, stat.S_IRWXU)
    except BaseException:
        os.close(fd)
        raise
    return fd


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A file we may not link (another user's, under fs.protected_hardlinks), one
# at its link limit, on another filesystem, or gone meanwhile: rsync
# transfers it instead.
_SKIP_LINK = frozenset({errno.EPERM, errno.EACCES, errno.EMLINK, errno.EXDEV, errno.ENOENT})


def link_farm(live: Path, farm: Path) -> int:
    """Hard-link every regular file of ``live`` into the empty directory ``farm``; return how many.

    rsync's ``--link-dest`` then looks up the peer's names in the farm, not
    in the live app (pulls and pushes alike).  The live app may hold
    symlinks its containers made (they write its data directory, often as
    root), and a lookup of the peer's ``data/x/secret`` through
    ``data/x -> /etc`` would hard-link a file from outside the app into the
    new copy, for a peer that guessed its size, mtime and mode.  rsync
    before 3.5 follows any symlink there; 3.5 refuses only those not owned
    by root or by us.  The farm holds only
    directories we made and regular files, so there is nothing to follow:
    each source directory is opened relative to its parent with O_NOFOLLOW
    (a directory swapped for a symlink meanwhile is skipped), files are
    linked by name within directory fds, and the type of what was linked is
    checked after linking (an inode's type never changes, so a file swapped
    for a symlink between listing and linking is caught and dropped).  A
    live app that is itself a symlink gives an empty farm: rsync then
    copies every file.
    """
    try:
        top = os.open(live, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return 0
        raise
    try:
        made = os.open(farm, _DIR_FLAGS)
    except BaseException:
        os.close(top)
        raise
    count = 0
    # (source fd, farm fd, the source's entries, its listing to close): one
    # listing per level (listing.open_listing), not every subdirectory to visit
    try:
        first = open_listing(top, 0)
    except BaseException:
        os.close(top)
        os.close(made)
        raise
    stack: list[tuple[int, int, Iterator[os.DirEntry], Any]] = [(top, made, *first)]
    try:
        while stack:
            src, dst, entries, listing = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                if listing is not None:
                    listing.close()
                os.close(src)
                os.close(dst)
                continue
            name = entry.name
            if entry.is_file(follow_symlinks=False):
                try:
                    os.link(name, name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in _SKIP_LINK:
                        raise
                    continue
                if not stat.S_ISREG(os.stat(name, dir_fd=dst, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=dst)
                    continue
                count += 1
            elif entry.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=src)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EACCES):
                        continue  # gone, swapped for a symlink, or not ours to read
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=dst)
                    made = os.open(name, _DIR_FLAGS, dir_fd=dst)
                except BaseException:
                    os.close(sub)
                    raise
                try:
                    stack.append((sub, made, *open_listing(sub, len(stack))))
                except BaseException:
                    os.close(sub)
                    os.close(made)
                    raise
    except BaseException:
        for src, dst, _, listing in stack:
            if listing is not None:
                listing.close()
            os.close(src)
            os.close(dst)
        raise
    return count


@contextlib.contextmanager
def farm_of(live: Path, apps_dir: Path, app: str) -> Iterator[Path | None]:
    """Give a filled link farm of ``live`` beside it (None when there is no live app); remove it after."""
    if not live.is_dir():
        yield None
        return
    farm = new_staging(apps_dir, app)
    try:
        link_farm(live, farm)
        yield farm
    finally:
        remove_tree(farm)
