"""The local app inventory: list app directories, locate one, stream it as tar."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable

from . import grammar
from .errors import BadSlug, NoSuchApp, StreamFailed

TAR = "/usr/bin/tar" if os.path.exists("/usr/bin/tar") else "/bin/tar"
# A fixed, minimal environment for tar: TAR_OPTIONS, POSIXLY_CORRECT or a
# hostile PATH in our environment must not change what tar does.
_TAR_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
_CHUNK = 1 << 20


_BLOCK = 512
_RECORD = 20 * _BLOCK
_USTAR_NAME = 100


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _pax(length: int) -> int:
    """Return what a name or link target of ``length`` bytes adds beyond ustar."""
    # Too long for ustar: a pax header block and its record.
    return _BLOCK + _padded(length + 32) if length >= _USTAR_NAME else 0


def archive_size(path: Path) -> int:
    """Return the size of the tar stream ``stream-app`` sends for ``path`` (links not followed).

    Headers and padding included, so a client can use it for progress and as
    the basis of its size ceiling; it is exact for short names and an upper
    estimate for long ones.
    """
    total = _BLOCK  # the "./" entry
    seen: dict[tuple[int, int], int] = {}  # inode -> length of its first name
    stack = [(str(path), "./")]
    while stack:
        top, prefix = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    name = prefix + entry.name
                    length = len(os.fsencode(name))
                    header = _BLOCK + _pax(length)
                    inode = (st.st_dev, st.st_ino)
                    if stat.S_ISSOCK(st.st_mode):
                        continue  # tar skips sockets
                    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and inode in seen:
                        # A second name of a hard link is sent as a link, without data.
                        total += header + _pax(seen[inode])
                        continue
                    seen.setdefault(inode, length)
                    if stat.S_ISDIR(st.st_mode):
                        total += header
                        stack.append((entry.path, name + "/"))
                    elif stat.S_ISREG(st.st_mode):
                        total += header + _padded(st.st_size)
                    elif stat.S_ISLNK(st.st_mode):
                        total += header + _pax(len(os.fsencode(os.readlink(entry.path))))
                    else:
                        total += header
        except OSError:
            continue
    total += 2 * _BLOCK  # end of archive
    return -(-total // _RECORD) * _RECORD


def list_apps(apps_dir: Path) -> list[dict]:
    """Return ``[{slug, size_kb}]`` for each app directory, sorted by slug.

    ``size_kb`` is the size of the archive ``stream-app`` would send, in KiB.
    """
    try:
        names = sorted(os.listdir(apps_dir))
    except FileNotFoundError:
        return []
    entries = (app_entry(apps_dir, name) for name in names)
    return [entry for entry in entries if entry is not None]


def app_entry(apps_dir: Path, slug: str) -> dict | None:
    """Return ``{slug, size_kb}`` of app ``slug`` as list_apps() lists it, or None if it lists no such app."""
    # Names outside the slug grammar could never be requested, and a name
    # from a peer must not reach the filesystem before this check.
    if not grammar.is_slug(slug):
        return None
    path = os.path.join(apps_dir, slug)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    # A symlink could point anywhere on the host: never advertised.
    if not stat.S_ISDIR(st.st_mode):
        return None
    return {"slug": slug, "size_kb": (archive_size(Path(path)) + 1023) // 1024}


def app_path(apps_dir: Path, slug: str) -> Path:
    """Return the directory of app ``slug``; raise BadSlug or NoSuchApp."""
    # Grammar first: no '/', '..' or leading '-' can reach the filesystem.
    if not grammar.is_slug(slug):
        raise BadSlug(slug[:80])
    path = apps_dir / slug
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NoSuchApp(slug) from None
    # A symlinked app directory could expose anything on the host.
    if not stat.S_ISDIR(st.st_mode):
        raise NoSuchApp(f"{slug} is not a directory")
    # Belt and braces: the resolved path must sit inside apps_dir (trailing
    # separator, so /apps-evil never passes as inside /apps).
    root = os.path.realpath(apps_dir) + os.sep
    if not os.path.realpath(path).startswith(root):
        raise NoSuchApp(f"{slug} resolves outside apps_dir")
    return path


def tar_command(app_dir: Path) -> list[str]:
    """Return the argument list that writes ``app_dir`` as a POSIX tar to stdout."""
    return [TAR, "--create", "--file=-", f"--directory={app_dir}", "--format=posix",
            # Without these, pax headers carry atime/ctime for every member and
            # double the size of an archive of small files.
            "--pax-option=delete=atime,delete=ctime,delete=mtime",
            # Numbers only: no user or group names of this host leak to the peer.
            "--numeric-owner", "--", "."]


# zstd's default level on all cores: about 90 MB/s per core, far above any
# link slow enough for "auto" to compress (< 1 Gbit/s), and about 4% smaller
# than -1 on text and SQL dumps, which on such a link is 4% less time.
# Higher levels and --adapt were measured slower (README, Benchmarks).
ZSTD_SEND = ["zstd", "-3", "-T0", "-q", "-c"]


def stream_app(app_dir: Path, out_fd: int, on_bytes: Callable[[int], None] | None = None,
               *, compress: bool = False) -> int:
    """Write ``app_dir`` as tar (zstd-compressed if asked) to ``out_fd``; return the bytes written."""
    import subprocess  # here: list-apps and app-info, which import this module too, start no process

    # tar's and zstd's stderr, for the error message: an anonymous memory
    # file (tempfile costs list-apps and stream-app 6 ms of import each).
    with open(os.memfd_create("peerkit-stream-errors", os.MFD_CLOEXEC), "w+b") as errors:
        procs = [subprocess.Popen(tar_command(app_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=errors, env=_TAR_ENV, close_fds=True)]
        if compress:
            procs.append(subprocess.Popen(ZSTD_SEND, stdin=procs[0].stdout,
                                          stdout=subprocess.PIPE, stderr=errors, env=_TAR_ENV,
                                          close_fds=True))
            procs[0].stdout.close()  # zstd holds it now; tar gets SIGPIPE if zstd dies
        source = procs[-1].stdout
        assert source is not None
        sent = 0
        try:
            sent = _copy(source.fileno(), out_fd, on_bytes or (lambda n: None))
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        finally:
            source.close()
            statuses = [proc.wait() for proc in procs]
        if any(statuses):
            errors.seek(0)
            message = errors.read(500).decode("utf-8", "replace").strip()
            raise StreamFailed(f"{'tar | zstd' if compress else 'tar'} exited {statuses}: {message}")
        return sent


def _copy(src: int, dst: int, on_bytes: Callable[[int], None]) -> int:
    """Move bytes from pipe ``src`` to ``dst`` until EOF; splice when possible."""
    total = 0
    try:
        while True:
            n = os.splice(src, dst, _CHUNK)
            if n == 0:
                return total
            total += n
            on_bytes(n)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    while True:
        data = os.read(src, _CHUNK)
        if not data:
            return total
        view = memoryview(data)
        while view:
            n = os.write(dst, view)
            view = view[n:]
            total += n
            on_bytes(n)
