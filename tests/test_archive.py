"""Tests for peerkit.archive, the hardened streaming tar extractor."""

from __future__ import annotations

import io
import os
import pwd
import random
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerkit import archive
from peerkit.archive import ExtractStats, TarExtractor, extract_fileobj
from peerkit.errors import TransferIncomplete, UnsafeArchive

from tests import tarcraft, trees

directory, gnu_long, hardlink = tarcraft.directory, tarcraft.gnu_long, tarcraft.hardlink
header, member, pax, symlink = tarcraft.header, tarcraft.member, tarcraft.pax, tarcraft.symlink

MAX = 256 << 20
IS_ROOT = os.geteuid() == 0
ERRORS = {"unsafe-archive": UnsafeArchive, "transfer-incomplete": TransferIncomplete}
HAVE_GNU_TAR = shutil.which("tar") is not None


# -- helpers ------------------------------------------------------------------

def pwd_nobody() -> pwd.struct_passwd | None:
    """The 'nobody' account (None when there is none)."""
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def fd_count() -> int:
    """Return how many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def make_site(tmp: Path) -> Path:
    """Create <tmp>/dest plus the sentinel and outside/victim hostile archives aim at."""
    (tmp / tarcraft.SENTINEL).write_bytes(b"original\n")
    (tmp / tarcraft.OUTSIDE).mkdir()
    (tmp / tarcraft.OUTSIDE / "victim").write_bytes(b"victim\n")
    dest = tmp / "dest"
    dest.mkdir()
    return dest


def _open_up(dest: Path) -> dict[str, int]:
    """Make every directory under dest 0o700 (so walks and the cleanup get in as non-root); return their modes before."""
    modes, stack = {}, [str(dest)]
    while stack:
        d = stack.pop()
        modes[os.path.relpath(d, dest)] = stat.S_IMODE(os.lstat(d).st_mode)
        os.chmod(d, 0o700)
        stack.extend(e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
    return modes


def feed_random(ex: TarExtractor, data: bytes, rng: random.Random, max_chunk: int = 3 << 20) -> None:
    """Feed data in pseudo-random chunk sizes from 1 byte up to max_chunk."""
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        r = rng.random()
        if r < 0.2:
            k = rng.randint(1, 16)
        elif r < 0.5:
            k = rng.randint(1, 5000)
        else:
            k = rng.randint(1, max_chunk)
        ex.feed(mv[pos:pos + k])
        pos += k


def extract(data: bytes, dest: Path, *, max_bytes: int = MAX, seed: int | None = None,
            chunk: int | None = None, **kw) -> ExtractStats:
    """Extract data into dest in one chunk, fixed chunks, or random chunks."""
    ex = TarExtractor(dest, max_bytes=max_bytes, **kw)
    try:
        if seed is not None:
            feed_random(ex, data, random.Random(seed))
        elif chunk is not None:
            for i in range(0, len(data), chunk):
                ex.feed(data[i:i + chunk])
        else:
            ex.feed(data)
        return ex.finish()
    except BaseException:
        ex.abort()
        raise


def a(*parts: bytes, **kw) -> bytes:
    """Shorthand for tarcraft.archive."""
    return tarcraft.archive(*parts, **kw)


# -- round trips ----------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The varied source tree (20 MiB file, 500 small files, links, odd names)."""
    src = tmp_path_factory.mktemp("mixed") / "src"
    src.mkdir()
    trees.build_mixed_tree(src)
    return src


def _gnu_tar(src: Path, *extra: str) -> bytes:
    """Archive src with GNU tar (names start with './')."""
    return subprocess.run(["tar", *extra, "-C", str(src), "-cf", "-", "."],
                          check=True, capture_output=True).stdout


def _tarfile_pax(src: Path) -> bytes:
    """Archive src with tarfile in PAX format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(str(src), arcname=".")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_archives(mixed_tree: Path) -> dict[str, bytes]:
    """The mixed tree archived by GNU tar (gnu and posix formats) and by tarfile."""
    out = {"tarfile-pax": _tarfile_pax(mixed_tree)}
    if HAVE_GNU_TAR:
        out["gnu-tar"] = _gnu_tar(mixed_tree)
        out["gnu-tar-posix"] = _gnu_tar(mixed_tree, "--format=posix")
    return out


@pytest.mark.parametrize("fmt,seed", [("gnu-tar", 1), ("gnu-tar", 2), ("gnu-tar-posix", 3),
                                      ("tarfile-pax", 4), ("tarfile-pax", 5)])
def test_round_trip_mixed_tree(mixed_tree: Path, mixed_archives: dict[str, bytes],
                               tmp_path: Path, fmt: str, seed: int) -> None:
    if fmt not in mixed_archives:
        pytest.skip("GNU tar not installed")
    data = mixed_archives[fmt]
    dest = tmp_path / "dest"
    dest.mkdir()
    before = fd_count()
    stats = extract(data, dest, seed=seed)
    assert fd_count() == before
    src_snap, dest_snap = trees.snapshot(mixed_tree), trees.snapshot(dest)
    assert trees.diff(src_snap, dest_snap) == []
    assert trees.inode_groups(dest) == trees.inode_groups(mixed_tree) == [["a/hard.txt", "top.txt"]]
    assert stats.bytes_in == len(data)
    assert stats.hardlinks == 1
    assert stats.symlinks == 7
    assert stats.files == sum(1 for r in src_snap.values() if r["type"] == "file") - 1
    assert stats.content_bytes == sum(r["size"] for k, r in src_snap.items()
                                      if r["type"] == "file" and k != "a/hard.txt")
    assert dest_snap["big.bin"]["size"] == 20 << 20
    assert dest_snap["ro"]["mode"] == 0o555 and dest_snap["sticky"]["mode"] == 0o1777
    if IS_ROOT:
        assert dest_snap["secret"]["uid"] == 3_000_000


def test_extract_fileobj_round_trip(mixed_tree: Path, mixed_archives: dict[str, bytes],
                                    tmp_path: Path) -> None:
    data = mixed_archives.get("gnu-tar") or mixed_archives["tarfile-pax"]
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = extract_fileobj(io.BytesIO(data), dest, max_bytes=MAX, chunk=65536)
    assert stats.bytes_in == len(data)
    assert trees.diff(trees.snapshot(mixed_tree), trees.snapshot(dest)) == []


@pytest.mark.parametrize("case", sorted(tarcraft.BENIGN_CASES))
def test_benign_small_archives_any_chunking(tmp_path: Path, case: str) -> None:
    data = tarcraft.BENIGN_CASES[case]()
    snaps = []
    for i, how in enumerate([{}, {"chunk": 1}, {"chunk": 511}, {"chunk": 513}, {"seed": 9}]):
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        extract(data, dest, **how)
        snap = trees.snapshot(dest)
        if "ünï cödé" in snap:  # implicit parent (no member): its mtime is "now"
            del snap["ünï cödé"]["mtime"]
        snaps.append(snap)
    assert all(trees.diff(s, snaps[0]) == [] for s in snaps)
    assert len(snaps[0]) > 5


def test_benign_pax_contents(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = extract(tarcraft.benign_pax(), dest)
    assert (stats.files, stats.dirs, stats.symlinks, stats.hardlinks) == (6, 3, 3, 1)
    snap = trees.snapshot(dest)
    assert snap["."]["mode"] == 0o755
    assert snap["bin"]["mode"] == 0o750
    assert snap["ro"]["mode"] == 0o555 and snap["ro/inside.txt"]["mode"] == 0o444
    assert snap["bin/run"]["mode"] == 0o755
    assert snap["bin/readme-link"] == {"type": "symlink", "target": "../docs/readme.txt",
                                       "uid": snap["bin/readme-link"]["uid"],
                                       "gid": snap["bin/readme-link"]["gid"]}
    assert (dest / "ünï cödé" / "日本語.txt").read_text() == "データ\n"
    assert snap["ünï cödé"]["mode"] == 0o700  # implicit parent, no directory member
    assert os.stat(dest / "docs/hard.txt").st_ino == os.stat(dest / "docs/readme.txt").st_ino
    assert snap["docs/readme.txt"]["mtime"] == tarcraft.MTIME
    assert snap["ro"]["mtime"] == tarcraft.MTIME


def test_benign_raw_contents(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(tarcraft.benign_raw(), dest)
    long_dir = dest / ("d" * 150)
    assert sorted(p.name for p in long_dir.iterdir()) == ["gnu-name.txt", "pax-name.txt", "ustar-prefix.txt"]
    assert (long_dir / "ustar-prefix.txt").read_bytes() == b"prefix\n"
    assert os.stat(long_dir / "pax-name.txt").st_mtime_ns == 1_700_000_000_500_000_000
    assert os.stat(long_dir).st_mode & 0o7777 == 0o700
    assert os.readlink(dest / "a" / "l") == "f.txt"


# -- hostile archives -------------------------------------------------------------

@pytest.mark.parametrize("how", [{}, {"chunk": 7}])
@pytest.mark.parametrize("case", sorted(tarcraft.HOSTILE_CASES))
def test_hostile_case_refused(tmp_path: Path, case: str, how: dict) -> None:
    dest = make_site(tmp_path)
    before = trees.snapshot(tmp_path, exclude=("dest",))
    fds = fd_count()
    data = tarcraft.HOSTILE_CASES[case]()
    expected = ERRORS[tarcraft.EXPECTED_ERROR[case]]
    with pytest.raises(expected) as info:
        extract(data, dest, max_bytes=64 << 20, **how)
    assert type(info.value) is expected
    assert info.value.detail and len(info.value.detail) < 400
    assert trees.snapshot(tmp_path, exclude=("dest",)) == before
    assert fd_count() == fds
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        assert not os.path.lexists(victim)


def test_hostile_cases_cover_the_brief() -> None:
    required = {"dotdot_escape", "absolute_path", "symlink_write_through", "symlink_chain",
                "hardlink_outside", "hardlink_to_symlink", "char_device", "block_device", "fifo",
                "setuid_file", "setgid_dir", "huge_size", "truncated_header", "truncated_data",
                "bad_checksum", "pax_path_dotdot", "pax_linkpath_escape", "gnu_longname_traversal",
                "deep_nesting_10000", "dot_symlink", "dot_file", "symlink_absolute",
                "symlink_relative_escape", "missing_eoa", "garbage_after_end",
                "duplicate_file_over_symlink"}
    assert required <= set(tarcraft.HOSTILE_CASES)
    assert set(tarcraft.EXPECTED_ERROR) == set(tarcraft.HOSTILE_CASES)


def test_symlink_write_through_leaves_only_the_link(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="symlink or not a directory"):
        extract(tarcraft.symlink_write_through(), dest)
    assert os.listdir(dest) == ["l"] and os.readlink(dest / "l") == "."


# -- names ------------------------------------------------------------------------

REFUSED_NAMES = [
    b"/abs", b"//abs", b"/", b"../x", b"..", b"a/..", b"a/../b", b"a/../../x", b"./../x",
    b"a\0b", b"x" * 4097, b"a/" * 257 + b"f", b"c" * 256, b"a/" + b"c" * 256,
]


def _encodings(name: bytes) -> list[str]:
    """Return the ways a name can be put in a header."""
    out = ["pax"]
    if b"\0" not in name:
        out.append("gnu")
        if len(name) <= 100:
            out.append("ustar")
    return out


def _named(name: bytes, enc: str, data: bytes = b"data\n", **kw) -> bytes:
    """A one-file archive whose member name is given with the chosen encoding."""
    if enc == "ustar":
        return a(member(name, data, **kw))
    if enc == "gnu":
        return a(gnu_long(name), member("placeholder", data, fmt="gnu", **kw))
    return a(pax({"path": name}), member("placeholder", data, **kw))


@pytest.mark.parametrize("name,enc", [(n, e) for n in REFUSED_NAMES for e in _encodings(n)])
def test_refused_names(tmp_path: Path, name: bytes, enc: str) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive):
        extract(_named(name, enc), dest)
    assert os.listdir(dest) == []


ACCEPTED_NAMES = [
    (b"./a", "a"), (b"a//b", "a/b"), (b"a/./b", "a/b"), (b"././c", "c"), (b"...", "..."),
    (b"..a", "..a"), (b"a..", "a.."), (b".hidden", ".hidden"), ("ü/日本 語".encode(), "ü/日本 語"),
    (b"new\nline", "new\nline"), (b"back\\slash", "back\\slash"), (b"\xff\xfe", os.fsdecode(b"\xff\xfe")),
    (b"a/" * 255 + b"f", "a/" * 255 + "f"), (b"c" * 255, "c" * 255),
]


@pytest.mark.parametrize("name,rel,enc", [(n, r, e) for n, r in ACCEPTED_NAMES for e in _encodings(n)])
def test_accepted_names(tmp_path: Path, name: bytes, rel: str, enc: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(_named(name, enc), dest)
    assert (dest / rel).read_bytes() == b"data\n"


@pytest.mark.parametrize("typeflag", [b"0", b"2", b"1", b"7"])
@pytest.mark.parametrize("name", [".", "./", "./.", "././"])
def test_root_entry_must_be_a_directory(tmp_path: Path, name: str, typeflag: bytes) -> None:
    dest = make_site(tmp_path)
    data = a(member("f", b"x"), header(name, typeflag=typeflag, linkname="f" if typeflag in b"12" else ""))
    with pytest.raises(UnsafeArchive, match="staging directory"):
        extract(data, dest)
    assert os.path.isdir(dest) and not os.path.islink(dest)


def test_root_entry_directory_sets_dest_mode_and_mtime(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    extract(a(directory("./", mode=0o751, mtime=1_234_567_890), member("./f", b"x")), dest)
    st_ = os.stat(dest)
    assert st_.st_mode & 0o7777 == 0o751 and st_.st_mtime == 1_234_567_890


# -- symlinks and hard links ---------------------------------------------------------

SYMLINK_TARGETS = [
    ("l", "x", True), ("l", "./x", True), ("d/l", "../x", True), ("d/e/l", "../../x", True),
    ("l", ".", True), ("d/l", "..", True), ("d/l", "../d/./e/", True), ("d/e/l", "../../d/e", True),
    ("l", "dangling/nowhere", True), ("l", "x" * 300, True),
    ("l", "/etc", False), ("l", "/", False), ("l", "..", False), ("d/l", "../..", False),
    ("l", "a/../b", False), ("l", "x/..", False), ("d/e/l", "../../../x", False), ("l", "", False),
    ("l", "a/b/../../..", False), ("d/l", "./../..", False), ("l", "x\0y", False),
    ("l", "x/" * 2100, False),
]


@pytest.mark.parametrize("name,target,ok", SYMLINK_TARGETS)
def test_symlink_targets(tmp_path: Path, name: str, target: str, ok: bool) -> None:
    dest = make_site(tmp_path)
    link = (pax({"linkpath": target}) + symlink(name, "placeholder")) if target else symlink(name, "")
    data = a(directory("d"), directory("d/e"), link)
    if ok:
        stats = extract(data, dest)
        assert os.readlink(dest / name) == target and stats.symlinks == 1
    else:
        with pytest.raises(UnsafeArchive):
            extract(data, dest)
        assert not os.path.lexists(dest / name)


def test_symlink_is_never_followed_by_later_members(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    for later in [member("d/l/x", b"x"), directory("d/l"), member("d/l", b"x"), hardlink("d/l", "f"),
                  symlink("d/l", "e"), directory("d/l/y")]:
        shutil.rmtree(dest)
        dest.mkdir()
        with pytest.raises(UnsafeArchive):
            extract(a(member("f", b"f"), directory("d"), directory("d/e"), symlink("d/l", "e"), later), dest)
        assert os.listdir(dest / "d" / "e") == []


def test_symlink_mtime_and_owner(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(a(symlink("l", "x", mtime=1_111_111_111, uid=4242, gid=4343)), dest,
            preserve_owner=IS_ROOT)
    st_ = os.lstat(dest / "l")
    assert st_.st_mtime == 1_111_111_111
    if IS_ROOT:
        assert (st_.st_uid, st_.st_gid) == (4242, 4343)


def test_hardlinks_share_inodes(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = extract(a(directory("x"), member("x/f", b"hello", mode=0o640), directory("y"),
                      hardlink("y/h1", "./x/f"), hardlink("h2", "y/h1")), dest)
    inos = {os.lstat(dest / p).st_ino for p in ["x/f", "y/h1", "h2"]}
    assert len(inos) == 1 and os.lstat(dest / "h2").st_nlink == 3
    assert (stats.files, stats.hardlinks, stats.content_bytes) == (1, 2, 5)


@pytest.mark.parametrize("target", ["missing", ".", "d", "s", "d/../f", "/f", "../f", "f/",
                                    # through a symlinked directory, in a missing one, under a file
                                    "sd/g", "nodir/f", "f/f", "d/missing", "sd/"])
def test_hardlink_bad_targets(tmp_path: Path, target: str) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="hard link target|not a regular file of this archive"):
        extract(a(member("f", b"f"), directory("d"), member("d/g", b"g"), symlink("s", "f"), symlink("sd", "d"),
                  hardlink("h", target)), dest)
    assert not os.path.lexists(dest / "h")
    assert not os.path.lexists(dest / "nodir")  # looking a target up creates nothing


def test_hardlink_to_a_deep_file_and_to_a_link(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = extract(a(member("a/b/c/f", b"deep"), hardlink("a/h", "a/b/c/f"), hardlink("x/y/h2", "a/h")), dest)
    assert (dest / "x/y/h2").read_bytes() == b"deep" and os.lstat(dest / "a/b/c/f").st_nlink == 3
    assert stats.hardlinks == 2


def test_memory_stays_flat_in_the_number_of_files(tmp_path: Path) -> None:
    """What the extractor keeps does not grow with the files it wrote (a million-file app is no special case)."""
    import tracemalloc

    def grown(files: int) -> int:
        dest = tmp_path / f"dest{files}"
        dest.mkdir()
        ex = TarExtractor(dest, max_bytes=MAX)
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(files):  # streamed: the archive itself is never held
                ex.feed(member(f"d{i % 10}/file-with-a-name-of-some-length-{i:06d}", b"x" * 10))
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        ex.feed(bytes(1024))
        ex.finish()
        return after - before

    few, many = grown(500), grown(10_000)
    # remembering each file's path cost about 150 bytes a file (1.4 MB here)
    assert many - few < 100_000, (few, many)


def test_hardlink_onto_existing_name_refused(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="already exists"):
        extract(a(member("f", b"f"), member("g", b"g"), hardlink("g", "f")), dest)
    assert (dest / "g").read_bytes() == b"g"


# -- modes, directories, owners -------------------------------------------------------

def test_directories_deferred_modes_and_mtimes(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(
        directory("ro", mode=0o555, mtime=1_000_000_000),
        member("ro/f", b"x", mode=0o444, mtime=1_000_000_001),
        directory("ro/sub", mode=0o500, mtime=1_000_000_002),
        member("ro/sub/g", b"y", mtime=1_000_000_003),
        member("late/f", b"z"),                       # parent created implicitly ...
        directory("late", mode=0o750, mtime=1_000_000_004),  # ... and fixed up later
        member("implicit/f", b"w"),
        directory("ro", mode=0o551, mtime=1_000_000_005),  # duplicate dir member: last wins
        directory("sticky", mode=0o1777, mtime=1_000_000_006),
        member("stickyfile", b"s", mode=0o1755),
        directory("closed", mode=0o000, mtime=1_000_000_007),
        member("closed/f", b"c"),
    )
    stats = extract(data, dest)
    mode = lambda p: os.lstat(dest / p).st_mode & 0o7777  # noqa: E731
    mtime = lambda p: os.lstat(dest / p).st_mtime  # noqa: E731
    assert (mode("ro"), mtime("ro")) == (0o551, 1_000_000_005)
    assert (mode("ro/sub"), mtime("ro/sub")) == (0o500, 1_000_000_002)
    assert (mode("ro/f"), mtime("ro/f")) == (0o444, 1_000_000_001)
    assert (mode("late"), mtime("late")) == (0o750, 1_000_000_004)
    assert mode("implicit") == 0o700
    assert mode("sticky") == 0o1777 and mode("stickyfile") == 0o755
    assert (mode("closed"), mtime("closed")) == (0o000, 1_000_000_007)
    assert stats.dirs == 6
    os.chmod(dest / "closed", 0o700)  # let tmp_path cleanup in as a non-root user


def test_a_directory_gets_its_metadata_when_the_stream_leaves_it(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    mode = lambda p: os.lstat(dest / p).st_mode & 0o7777  # noqa: E731
    mtime = lambda p: os.lstat(dest / p).st_mtime  # noqa: E731
    ex = TarExtractor(dest, max_bytes=MAX)
    ex.feed(directory(".", mode=0o755, mtime=1_000_000_009) + directory("a", mode=0o750, mtime=1_000_000_000)
            + member("a/f", b"x") + directory("a/b", mode=0o500, mtime=1_000_000_001) + member("a/b/g", b"y"))
    assert (mode("a"), mode("a/b")) == (0o700, 0o700)  # still being written into
    ex.feed(member("a/h", b"z"))  # left a/b, still in a
    assert (mode("a/b"), mtime("a/b"), mode("a")) == (0o500, 1_000_000_001, 0o700)
    ex.feed(member("c", b"w"))
    assert (mode("a"), mtime("a")) == (0o750, 1_000_000_000)
    assert mode("") == 0o700  # dest itself, which keeps everything private until the end
    ex.feed(bytes(1024))
    ex.finish()
    assert (mode(""), mtime("")) == (0o755, 1_000_000_009)
    assert (mode("a"), mtime("a"), mode("a/b")) == (0o750, 1_000_000_000, 0o500)


def test_memory_stays_flat_in_the_number_of_directories(tmp_path: Path) -> None:
    """A peer sending empty directories (512 bytes each) cannot grow what the extractor keeps."""
    import tracemalloc

    def grown(dirs: int) -> int:
        dest = tmp_path / f"dest{dirs}"
        dest.mkdir()
        ex = TarExtractor(dest, max_bytes=MAX)
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(dirs):
                ex.feed(directory(f"d{i % 10}/directory-with-a-name-of-some-length-{i:06d}", mtime=i))
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        ex.feed(bytes(1024))
        ex.finish()
        assert os.lstat(dest / "d3/directory-with-a-name-of-some-length-000013").st_mtime == 13
        return after - before

    few, many = grown(500), grown(10_000)
    # remembering each directory until the end cost about 380 bytes a directory (3.6 MB here)
    assert many - few < 100_000, (few, many)


_COME_BACK = """
import sys
from peerkit.archive import TarExtractor
from peerkit.errors import UnsafeArchive
ex = TarExtractor(sys.argv[1], max_bytes=1 << 20)
try:
    ex.feed(open(sys.argv[2], "rb").read())
    ex.finish()
    print("extracted")
except UnsafeArchive as exc:
    ex.abort()
    print("refused:", exc.detail)
"""


_COME_BACK_CASES = {
    # a hard link into a 0o555 directory left before (an archive built member by member may do that)
    "read-only": (a(directory("ro", mode=0o555, mtime=1_000_000_000), member("ro/f", b"x"), member("other", b"y"),
                    hardlink("ro/late", "other")),
                  "extracted"),
    # a 0o000 directory left before cannot even be looked into by its owner
    "closed": (a(directory("shut", mode=0o000), member("shut/f", b"x"), member("other", b"y"),
                 hardlink("h", "shut/f")),
               "refused: cannot look up the target of hard link 'h': Permission denied"),
}


@pytest.mark.skipif(IS_ROOT and pwd_nobody() is None, reason="no 'nobody' user to drop to")
@pytest.mark.parametrize("case", sorted(_COME_BACK_CASES))
def test_coming_back_to_a_directory_left_before_as_an_ordinary_user(case: str) -> None:
    """A read-only directory the stream left is written into again and keeps its mode and mtime.

    Root ignores modes, so this runs as an ordinary user.  What cannot be
    done (looking into a 0o000 directory) is the archive's doing and must
    read as a refusal, not as a local failure.
    """
    data, outcome = _COME_BACK_CASES[case]
    base = Path(tempfile.mkdtemp(prefix="peerkit-comeback-"))  # in /tmp: nobody can reach it
    try:
        os.chmod(base, 0o755)
        (base / "dest").mkdir()
        (base / "archive.tar").write_bytes(data)
        nobody = pwd_nobody() if IS_ROOT else None
        if nobody is not None:
            os.chown(base / "dest", nobody.pw_uid, nobody.pw_gid)
        env = {**os.environ, "PYTHONPATH": str(Path(archive.__file__).parents[1])}
        out = subprocess.run([sys.executable, "-c", _COME_BACK, str(base / "dest"), str(base / "archive.tar")],
                             capture_output=True, text=True, env=env, timeout=60,
                             user=nobody.pw_uid if nobody else None, group=nobody.pw_gid if nobody else None)
        assert out.stdout == f"{outcome}\n", (out.stdout, out.stderr)
        if case == "read-only":
            ro = base / "dest" / "ro"
            assert (ro / "late").read_bytes() == b"y" and os.lstat(ro / "late").st_nlink == 2
            assert (os.lstat(ro).st_mode & 0o7777, os.lstat(ro).st_mtime) == (0o555, 1_000_000_000)
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_coming_back_to_a_directory_left_before_keeps_its_mode_and_mtime(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(a(directory("ro", mode=0o555, mtime=1_000_000_000), member("ro/f", b"x"), member("o", b"y"),
              directory("ro/sub", mode=0o750, mtime=1_000_000_001), member("ro/late", b"z"),
              directory("d", mode=0o700, mtime=1_000_000_002), member("ro/sub/later", b"w")), dest)
    assert (dest / "ro/late").read_bytes() == b"z" and (dest / "ro/sub/later").read_bytes() == b"w"
    ro, sub = os.lstat(dest / "ro"), os.lstat(dest / "ro/sub")
    assert (ro.st_mode & 0o7777, ro.st_mtime, sub.st_mode & 0o7777, sub.st_mtime) == (0o555, 1_000_000_000,
                                                                                    0o750, 1_000_000_001)
    os.chmod(dest / "ro", 0o755)  # let tmp_path cleanup in as a non-root user


def test_a_gnu_tarfile_with_a_hard_link_in_a_directory_left_before_extracts_the_same_each_time(tmp_path: Path) -> None:
    """This archive adds docs/hard.txt after bin/: docs still ends with its own mtime, not the time of extraction."""
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(tarcraft.BENIGN_CASES["tarfile_gnu"](), dest)
    assert os.lstat(dest / "docs").st_mtime == 1_700_000_000


_FILE_MODES = [0o644, 0o755, 0o444, 0o000, 0o600, 0o777, 0o640, 0o1755]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000, 0o777, 0o002])
def test_file_modes_and_data_exact_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    # Files are created with their final mode when the umask keeps it whole,
    # and fixed with fchmod when it would not: either way the mode is exact,
    # and read-only or mode-0 files still get their data.
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(*(member(f"d/f{m:o}", b"data %o" % m, mode=m) for m in _FILE_MODES))
    old = os.umask(umask)
    try:
        extract(data, dest)
    finally:
        os.umask(old)
    for m in _FILE_MODES:
        path = dest / "d" / f"f{m:o}"
        assert os.lstat(path).st_mode & 0o7777 == m & 0o777, f"mode {m:o} under umask {umask:o}"
        os.chmod(path, 0o600)  # read mode-0 files as a non-root user too
        assert path.read_bytes() == b"data %o" % m


def test_fchmod_only_where_the_umask_would_cut_the_mode(tmp_path: Path) -> None:
    # One syscall fewer per file is the point (20,000-file pulls): count the
    # fchmod calls (audit event os.chmod) in a fresh interpreter.
    (tmp_path / "in.tar").write_bytes(a(member("keep", b"k", mode=0o644), member("cut", b"c", mode=0o666),
                                        member("ro", b"r", mode=0o444)))
    (tmp_path / "dest").mkdir()
    script = """if True:
        import os, sys
        from peerkit.archive import extract_fileobj, process_umask
        calls = []
        os.umask(0o022)
        assert process_umask() == 0o022
        sys.addaudithook(lambda e, a: calls.append(a[1]) if e == "os.chmod" and a[2] == -1 else None)
        with open("in.tar", "rb") as fh:
            extract_fileobj(fh, "dest", max_bytes=1 << 20, preserve_owner=False)
        print(sorted(calls))
    """
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(archive.__file__).parents[1])})
    assert out.stdout.split("\n")[0] == "[438]"  # 0o666 only: the umask 022 would cut its group/other write
    assert os.lstat(tmp_path / "dest" / "cut").st_mode & 0o777 == 0o666


def test_process_umask_reads_without_changing(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert archive.process_umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6755, 0o4000])
@pytest.mark.parametrize("kind", ["file", "dir", "symlink", "hardlink"])
def test_setuid_setgid_refused(tmp_path: Path, mode: int, kind: str) -> None:
    dest = make_site(tmp_path)
    ent = {"file": lambda: member("x", b"x", mode=mode),
           "dir": lambda: directory("x", mode=mode),
           "symlink": lambda: header("x", typeflag=b"2", linkname="f", mode=mode),
           "hardlink": lambda: header("x", typeflag=b"1", linkname="f", mode=mode)}[kind]()
    with pytest.raises(UnsafeArchive, match="setuid"):
        extract(a(member("f", b"f"), ent), dest)
    assert not os.path.lexists(dest / "x")


def test_owner_not_preserved_when_disabled(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(a(directory("d", uid=4242, gid=4343), member("d/f", b"x", uid=4242, gid=4343)), dest,
            preserve_owner=False)
    for p in ["d", "d/f"]:
        st_ = os.lstat(dest / p)
        assert (st_.st_uid, st_.st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_owner_preserved_by_default_as_root(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(a(directory("d", uid=4242, gid=4343), member("d/f", b"x", uid=5, gid=6),
              pax({"uid": "3000000", "gid": "3000001"}) + member("big-ids", b"y")), dest)
    assert (os.lstat(dest / "d").st_uid, os.lstat(dest / "d").st_gid) == (4242, 4343)
    assert (os.lstat(dest / "d/f").st_uid, os.lstat(dest / "d/f").st_gid) == (5, 6)
    assert os.lstat(dest / "big-ids").st_uid == 3_000_000


# -- header parsing ----------------------------------------------------------------------

def test_signed_checksum_accepted(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    name = "ünïcödé-näme".encode()
    h = header(name, size=2, signed_checksum=True)
    assert tarcraft.checksum(h, signed=True) != tarcraft.checksum(h)
    extract(a(h + tarcraft.pad(b"ok")), dest)
    assert (dest / os.fsdecode(name)).read_bytes() == b"ok"


def test_base256_and_negative_fields(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(header("f", size=5, size_field=b"\x80" + (5).to_bytes(11, "big"), mtime=-86400) + tarcraft.pad(b"hello"))
    extract(data, dest)
    assert (dest / "f").read_bytes() == b"hello"
    assert os.stat(dest / "f").st_mtime == -86400


@pytest.mark.parametrize("field", [b"000012 34\0\0\0", b"0000000001x\0", b"\x81" + bytes(11),
                                   b"\0" * 9 + b"12\0", b"-0000000012\0", b"\xff" * 12])
def test_malformed_size_fields_refused(tmp_path: Path, field: bytes) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive):
        extract(a(header("f", size_field=field) + bytes(512)), dest)


def test_pax_overrides(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(
        pax({"mtime": "1600000000"}, typeflag=b"g"),
        member("g1", b"1"),
        pax({"path": "renamed", "size": "5", "mtime": "1700000000.123456789", "comment": "ignored",
             "SCHILY.xattr.user.x": "ignored", "atime": "1"}),
        header("placeholder", size=0) + tarcraft.pad(b"hello"),
        pax({"mtime": ""}),  # empty value: back to the header field
        member("g2", b"2", mtime=1_200_000_000),
    )
    extract(data, dest)
    assert (dest / "renamed").read_bytes() == b"hello"
    assert os.stat(dest / "renamed").st_mtime_ns == 1_700_000_000_123_456_789
    assert os.stat(dest / "g1").st_mtime == 1_600_000_000
    assert os.stat(dest / "g2").st_mtime == 1_200_000_000


@pytest.mark.parametrize("records", [
    b"9 path=a\n\n", b"8 path=a", b"08 path=a\n", b"x path=a\n", b"6 =ab\n", b"7 patha\n",
    tarcraft.pax_records({"path": "ok"}) + b"junk", tarcraft.pax_records({"size": "12a"}),
    tarcraft.pax_records({"mtime": "1.2.3"}), tarcraft.pax_records({"uid": "-1"}),
    tarcraft.pax_records({"GNU.sparse.major": "1"}),
])
def test_malformed_pax_refused(tmp_path: Path, records: bytes) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive):
        extract(a(pax(records), member("placeholder", b"x")), dest)


def test_two_pax_headers_for_one_member_refused(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="consecutive"):
        extract(a(pax({"path": "a"}), pax({"path": "b"}), member("c", b"x")), dest)


def test_v7_header_refused(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="unrecognized"):
        extract(a(member("f", b"x", fmt="v7")), dest)


def test_old_style_directory_with_trailing_slash(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    extract(a(header("d/", typeflag=b"\0", mode=0o751), member("d/f", b"x")), dest)
    assert os.stat(dest / "d").st_mode & 0o7777 == 0o751


def test_regular_file_with_trailing_slash_refused(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    with pytest.raises(UnsafeArchive, match="ends with"):
        extract(a(member("f/", b"x")), dest)


# -- size ceiling ---------------------------------------------------------------------------

def test_cap_header_size_refused_before_any_data(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    data = a(member("big", b"x" * 10_000))
    ex = TarExtractor(dest, max_bytes=8192)
    with pytest.raises(UnsafeArchive, match="limit"):
        ex.feed(data[:512])
    ex.abort()
    assert os.listdir(dest) == []


def test_cap_running_total(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    data = a(member("one", b"1" * 6000), member("two", b"2" * 6000), record=False)
    with pytest.raises(UnsafeArchive, match="limit"):
        extract(data, dest, max_bytes=11_000, chunk=512)
    assert os.listdir(dest) == ["one"] and (dest / "one").read_bytes() == b"1" * 6000


def test_cap_raw_bytes_including_trailing_zeros(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    data = a(member("f", b"x"), record=False)
    with pytest.raises(UnsafeArchive, match="limit"):
        extract(data + bytes(1 << 20), dest, max_bytes=len(data) + 4096, chunk=1000)


def test_cap_many_empty_members(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    data = a(*(directory(f"d{i}") for i in range(100)))
    with pytest.raises(UnsafeArchive, match="limit"):
        extract(data, dest, max_bytes=20_000, chunk=512)


def _limited(dest: Path, data: bytes, fed: int, limit: int, *, max_bytes: int = MAX) -> TarExtractor:
    """Feed ``fed`` bytes, then lower the cap to ``limit`` (a pull learning the advertised size)."""
    ex = TarExtractor(dest, max_bytes=max_bytes)
    ex.feed(data[:fed])
    ex.limit(limit)
    return ex


def test_limit_below_what_already_arrived_is_refused_at_the_next_feed(tmp_path: Path) -> None:
    # A transfer started before the listing: the peer advertised less than it already sent.
    dest = make_site(tmp_path)
    data = a(member("one", b"1" * 6000), member("two", b"2" * 6000), record=False)
    ex = _limited(dest, data, 8192, 4096)
    with pytest.raises(UnsafeArchive, match="4096-byte limit"):
        ex.feed(data[8192:])
    ex.abort()


def test_limit_below_the_end_of_the_member_being_written_is_refused(tmp_path: Path) -> None:
    # The header of "big" was accepted under the old cap; its data would end past the new one.
    dest = make_site(tmp_path)
    data = a(member("big", b"x" * 100_000), record=False)
    ex = _limited(dest, data, 1024, 50_000)
    with pytest.raises(UnsafeArchive, match="limit"):
        ex.feed(data[1024:2048])
    ex.abort()


def test_limit_is_applied_at_finish_when_nothing_more_arrives(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    data = a(member("f", b"x" * 5000), record=False)
    ex = _limited(dest, data, len(data), 2048)
    with pytest.raises(UnsafeArchive, match="limit"):
        ex.finish()
    ex.abort()


def test_limit_that_fits_lets_the_archive_through_and_never_raises_the_cap(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(member("f", b"x" * 5000), member("g", b"y" * 5000), record=False)
    ex = _limited(dest, data, 700, len(data))
    ex.feed(data[700:])
    assert ex.finish().files == 2 and (dest / "g").read_bytes() == b"y" * 5000
    # A larger limit than the cap leaves the cap.
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    ex = _limited(dest2, data, 700, 1 << 40, max_bytes=6000)
    with pytest.raises(UnsafeArchive, match="6000-byte limit"):
        ex.feed(data[700:])
    ex.abort()


def test_cap_exact_fit(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    data = a(member("f", b"x" * 1000))
    stats = extract(data, dest, max_bytes=len(data), chunk=4096)
    assert stats.bytes_in == len(data) and stats.content_bytes == 1000


# -- API behaviour ----------------------------------------------------------------------------

def test_feed_and_finish_after_error_raise_again(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    ex = TarExtractor(dest, max_bytes=MAX)
    with pytest.raises(UnsafeArchive):
        ex.feed(tarcraft.dotdot_escape())
    with pytest.raises(UnsafeArchive):
        ex.feed(tarcraft.END)
    with pytest.raises(UnsafeArchive):
        ex.finish()
    ex.abort()
    ex.abort()


def test_abort_closes_fds_mid_file(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    before = fd_count()
    ex = TarExtractor(dest, max_bytes=MAX)
    ex.feed(directory("a") + header("a/f", size=10_000) + b"x" * 100)
    assert fd_count() > before
    ex.abort()
    assert fd_count() == before
    with pytest.raises(TransferIncomplete):
        ex.feed(b"x")


def test_finish_twice_and_feed_after_finish(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    ex = TarExtractor(dest, max_bytes=MAX)
    ex.feed(a(member("f", b"x")))
    assert ex.finish().files == 1
    with pytest.raises(RuntimeError):
        ex.feed(b"")
    with pytest.raises(RuntimeError):
        ex.finish()


def test_dest_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"")
    before = fd_count()
    with pytest.raises(ValueError):
        TarExtractor(tmp_path, max_bytes=MAX)
    assert fd_count() == before


def test_extract_fileobj_aborts_on_error(tmp_path: Path) -> None:
    dest = make_site(tmp_path)
    before = fd_count()
    with pytest.raises(TransferIncomplete):
        extract_fileobj(io.BytesIO(tarcraft.truncated_data()), dest, max_bytes=MAX, chunk=100)
    assert fd_count() == before


def test_empty_stream_is_incomplete(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(TransferIncomplete):
        extract(b"", dest)


def test_only_end_marker_is_an_empty_archive(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract(tarcraft.END + bytes(8192), dest) == ExtractStats(bytes_in=9216)


def test_fd_cache_is_bounded_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    dirs = [f"p{i // 20}/q{i}" for i in range(120)]
    grouped = [(d, f"{d}/f{j}") for d in dirs for j in range(4)]
    shuffled = grouped[:]
    rng.shuffle(shuffled)
    for order, name in [(grouped, "grouped"), (shuffled, "shuffled")]:
        parts = [directory(d) for d in dirs] + [member(f, b"x" * 100) for _, f in order]
        data = a(*parts)
        dest = tmp_path / name
        dest.mkdir()
        dir_opens = 0
        real_open = os.open

        def counting_open(path, flags, *args, **kw):  # type: ignore[no-untyped-def]
            """Count directory opens made by the extractor."""
            nonlocal dir_opens
            if flags & os.O_DIRECTORY:
                dir_opens += 1
            return real_open(path, flags, *args, **kw)

        monkeypatch.setattr(archive.os, "open", counting_open)
        base = fd_count()
        peak = 0
        ex = TarExtractor(dest, max_bytes=MAX)
        for i in range(0, len(data), 4096):
            ex.feed(data[i:i + 4096])
            peak = max(peak, fd_count() - base)
        ex.finish()
        monkeypatch.setattr(archive.os, "open", real_open)
        assert peak <= archive.FD_CACHE_SIZE + 3
        assert fd_count() == base
        assert sum(1 for _ in Path(dest).rglob("f*")) == len(order)
        if name == "grouped":
            # ~2 opens to create each of the 126 dirs, ~1 to revisit each when its
            # files start and ~1 at finish: nothing per file (480 files, 2 levels)
            assert dir_opens < 5 * 126


# -- the quick path for plain headers (TarExtractor._plain_member) ----------------------------

def _outcome(data: bytes, seed: int, *, quick: bool) -> tuple:
    """Extract data into a fresh dest, with or without the quick path: what happened and what is left."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "dest"
        dest.mkdir()
        ex = TarExtractor(dest, max_bytes=1 << 20)
        if not quick:
            ex._plain_member = lambda block, end_offset: False  # every header through the full parser
        try:
            feed_random(ex, data, random.Random(seed))
            result: tuple = ("ok", ex.finish())
        except (UnsafeArchive, TransferIncomplete) as exc:
            ex.abort()
            result = (type(exc).__name__, exc.detail)
        modes = _open_up(dest)
        snap = trees.snapshot(dest, include_root=False)
        now = time.time()
        for rel, rec in snap.items():
            if rec["type"] == "dir":
                rec["mode"] = modes[rel]
                # a directory the archive only implies keeps the time it was made: the two runs differ
                if abs(rec["mtime"] - now) < 600:
                    rec["mtime"] = "made now"
        return result, snap


def _agree(data: bytes, seed: int) -> None:
    """The quick path may only decline: with it or without it, the same outcome and the same tree."""
    (quick, quick_tree), (full, full_tree) = _outcome(data, seed, quick=True), _outcome(data, seed, quick=False)
    assert quick == full
    assert trees.diff(quick_tree, full_tree) == []


def _plain(name: str | bytes, data: bytes = b"x", **kw) -> bytes:
    return member(name, data, **kw)


# Headers on either side of every condition of the quick path.
_EDGES = {
    "file": _plain("f"),
    "dot-slash": _plain("./d/f"),
    "gnu-magic": _plain("./d/f", fmt="gnu"),
    "name-of-100": _plain("n" * 100),
    "dir": directory("d", mode=0o755),
    "dir-trailing-slash": directory("d/"),
    "dir-with-data": header("d", typeflag=b"5", size=1) + tarcraft.pad(b"x"),
    "root-dir": directory("./"),
    "root-dot": directory("."),
    "file-trailing-slash": _plain("f/"),
    "old-style-dir": header("d/", typeflag=b"\0"),
    "absolute": _plain("/tmp/peerkit-tarcraft-escape"),
    "dotdot": _plain("../sentinel"),
    "dotdot-inside": _plain("a/../f"),
    "double-slash": _plain("a//f"),
    "dot-inside": _plain("a/./f"),
    "empty-name": _plain(""),
    "setuid": _plain("f", mode=0o4755),
    "setgid-dir": directory("d", mode=0o2755),
    "sticky-dir": directory("d", mode=0o1777),
    "signed-checksum": _plain("ünï", signed_checksum=True),
    "checksum-off-by-one": _plain("f", chksum=1),
    "posix-prefix": _plain("f", prefix="p"),
    "gnu-with-prefix-bytes": _plain("f", fmt="gnu", prefix="p"),
    "v7": _plain("f", fmt="v7"),
    "size-base256": header("f", size=1, size_field=b"\x80" + (1).to_bytes(11, "big")) + tarcraft.pad(b"x"),
    "size-spaces": header("f", size=1, size_field=b"         1 \0") + tarcraft.pad(b"x"),
    "big-uid": _plain("f", uid=8 ** 7),
    "too-big": _plain("f", os.urandom(600 << 10)) + _plain("g", os.urandom(600 << 10)),
    "symlink": symlink("l", "f"),
    "hardlink": _plain("f") + hardlink("h", "f"),
    "after-pax": pax({"path": "p"}) + _plain("f"),
    "after-gnu-long": gnu_long("L" * 120) + _plain("f"),
    "after-global": pax({"path": "g"}, typeflag=b"g") + _plain("f") + _plain("f2"),
    "duplicate": _plain("f") + _plain("f"),
    "file-then-dir": _plain("f") + directory("f/"),
    "under-a-file": _plain("f") + _plain("f/g"),
    "under-a-symlink": symlink("l", ".") + _plain("l/f"),
}


@pytest.mark.parametrize("end", ["end", "lone-block", "none"])
@pytest.mark.parametrize("case", sorted(_EDGES))
def test_quick_path_agrees_with_the_full_parser(case: str, end: str) -> None:
    data = _EDGES[case] + {"end": tarcraft.END, "lone-block": bytes(512) + _plain("z"), "none": b""}[end]
    for seed in range(3):
        _agree(data, seed)


@pytest.mark.parametrize("case", sorted(tarcraft.HOSTILE_CASES))
def test_quick_path_agrees_on_hostile_archives(case: str) -> None:
    _agree(tarcraft.HOSTILE_CASES[case](), 1)


@pytest.mark.skipif(not HAVE_GNU_TAR, reason="GNU tar not installed")
def test_quick_path_takes_what_peers_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every member of a peer's stream (apps.tar_command) but the root takes the quick path."""
    from peerkit.apps import tar_command

    src = tmp_path / "src"
    for d in range(4):
        for f in range(25):
            (src / f"d{d}" / "sub").mkdir(parents=True, exist_ok=True)
            (src / f"d{d}" / "sub" / f"f{f}.dat").write_bytes(os.urandom(f * 100))
    data = subprocess.run(tar_command(src), check=True, capture_output=True).stdout
    taken = []
    plain_member = TarExtractor._plain_member

    def counting(self: TarExtractor, block: bytes, end_offset: int) -> bool:
        ok = plain_member(self, block, end_offset)
        taken.append(ok)
        return ok

    monkeypatch.setattr(TarExtractor, "_plain_member", counting)
    dest = tmp_path / "dest"
    dest.mkdir()
    stats = extract(data, dest, seed=7)
    assert (stats.files, stats.dirs) == (100, 8)  # dest itself is not counted
    assert taken.count(True) == 108  # all but "./", which the full parser applies to dest
    assert trees.diff(trees.snapshot(src), trees.snapshot(dest)) == []


# -- property tests -------------------------------------------------------------------------

def _check_extract_safely(data: bytes, seed: int) -> None:
    """Extract data into a fresh site: only our errors, nothing outside touched, no fd leaks."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        dest = make_site(tmp_path)
        before = trees.snapshot(tmp_path, exclude=("dest",))
        fds = fd_count()
        try:
            extract(data, dest, max_bytes=1 << 20, seed=seed)
            ok = True
        except (UnsafeArchive, TransferIncomplete):
            ok = False
        assert trees.snapshot(tmp_path, exclude=("dest",)) == before
        assert fd_count() == fds
        for victim in tarcraft.ABSOLUTE_VICTIMS:
            assert not os.path.lexists(victim)
        _open_up(dest)
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                assert not os.lstat(path).st_mode & 0o6000
                if ok:
                    resolved = os.path.realpath(path)
                    real_dest = os.path.realpath(dest)
                    assert resolved == real_dest or resolved.startswith(real_dest + os.sep), resolved


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=3000), st.integers(0, 2**32))
def test_fuzz_random_bytes(data: bytes, seed: int) -> None:
    _check_extract_safely(data, seed)


_BASES = [tarcraft.benign_raw(), tarcraft.benign_pax(), tarcraft.benign_gnu()]
_BASE_HEADERS = [tarcraft.header_offsets(b) for b in _BASES]


def _mutated(data: st.DataObject) -> bytes:
    """One of the benign archives with a few bytes changed (checksums mostly fixed up), maybe cut short."""
    which = data.draw(st.integers(0, len(_BASES) - 1))
    buf = bytearray(_BASES[which])
    offsets = _BASE_HEADERS[which]
    for _ in range(data.draw(st.integers(1, 6))):
        if data.draw(st.booleans()):  # inside a header, checksum fixed up below
            pos = data.draw(st.sampled_from(offsets)) + data.draw(st.integers(0, 511))
        else:
            pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.integers(0, 3)):
        buf = bytearray(tarcraft.fix_checksums(buf, offsets))
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf)))]
    return bytes(buf)


@FUZZ
@given(st.data())
def test_fuzz_mutated_archives(data: st.DataObject) -> None:
    _check_extract_safely(_mutated(data), data.draw(st.integers(0, 2**32)))


@FUZZ
@given(st.data())
def test_fuzz_quick_path_agrees_on_mutated_archives(data: st.DataObject) -> None:
    _agree(_mutated(data), data.draw(st.integers(0, 2**32)))


_SAFE_NAMES = ["a", "a/b", "./a/c", "b", "b/f", "a/f", "l", "l/x", "a/l2", "a/l2/y", "up",
               "up/sentinel", "c/d/e", "a/b/c/d", "./", "x"]
_BAD_NAMES = [".", "..", "../sentinel", "a/../../sentinel", tarcraft.ABSOLUTE_VICTIMS[0], "/", ""]
_SAFE_TARGETS = [".", "..", "a", "a/b", "l", "x", "b/f", "a/f", "../a", "../../a/f", "l2", "up", "missing"]
_BAD_TARGETS = ["../..", "l/..", "../sentinel", "/", tarcraft.ABSOLUTE_VICTIMS[0], "a/l2/..",
                "../outside", "../../outside/victim", "", "up/..", "b/../..", "l2/../.."]
_SAFE_MODES = [0o644, 0o755, 0o555, 0o000, 0o1777, 0o700, 0o500]
_BAD_MODES = [0o4755, 0o2755]


def _mostly(safe: list, bad: list) -> st.SearchStrategy:
    """Draw mostly from safe, sometimes from bad."""
    return st.sampled_from(safe * 6 + bad)


def _entry() -> st.SearchStrategy[bytes]:
    """A strategy for one raw member (possibly with a pax or GNU name override)."""
    name = _mostly(_SAFE_NAMES, _BAD_NAMES)
    target = _mostly(_SAFE_TARGETS + _SAFE_NAMES, _BAD_TARGETS)
    mode = _mostly(_SAFE_MODES, _BAD_MODES)
    file_ = st.builds(lambda n, d, m: member(n, d, mode=m), name, st.binary(max_size=700), mode)
    dir_ = st.builds(lambda n, m: directory(n, mode=m), name, mode)
    link = st.builds(lambda n, t: symlink(n, t), name, target)
    hard = st.builds(lambda n, t: hardlink(n, t), name, target)
    special = st.builds(lambda n, t: header(n, typeflag=t), name,
                        st.sampled_from([b"3", b"4", b"6", b"S", b"V", b"g"]))
    plain = st.sampled_from(["file"] * 3 + ["dir"] * 3 + ["link"] * 3 + ["hard"] * 2 + ["special"]).flatmap(
        {"file": file_, "dir": dir_, "link": link, "hard": hard, "special": special}.__getitem__)
    over_ = st.one_of(
        st.builds(lambda n: pax({"path": n}), name),
        st.builds(lambda t: pax({"linkpath": t}), target),
        st.builds(lambda n: gnu_long(n), name),
        st.builds(lambda t: gnu_long(t, b"K"), target),
    )
    over = st.sampled_from([False] * 6 + [True]).flatmap(lambda o: over_ if o else st.just(b""))
    return st.builds(lambda o, p: o + p, over, plain)


@FUZZ
@given(st.lists(_entry(), max_size=12), st.sampled_from(["end", "none", "garbage"]), st.integers(0, 2**32))
def test_fuzz_structured_member_sequences(entries: list[bytes], ending: str, seed: int) -> None:
    data = b"".join(entries)
    if ending == "end":
        data = a(data)
    elif ending == "garbage":
        data = a(data) + b"\x01"
    _check_extract_safely(data, seed)


@FUZZ
@given(st.lists(_entry(), max_size=12), st.booleans(), st.integers(0, 2**32))
def test_fuzz_quick_path_agrees_on_member_sequences(entries: list[bytes], end: bool, seed: int) -> None:
    data = b"".join(entries)
    _agree(a(data) if end else data, seed)


def _flush_threads() -> int:
    import threading

    return sum(t.name == "flush" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("end", ["finish", "abort", "failure"])
def test_background_flush_stops_with_the_extractor(tmp_path: Path, end: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    before = _flush_threads()
    ex = TarExtractor(dest, max_bytes=1 << 30, background_flush=True)
    assert _flush_threads() == before + 1
    data = tarcraft.archive(member("big.bin", os.urandom(64 << 10)), member("small.txt", b"x\n"))
    ex.feed(data[:-2048])
    if end == "finish":
        ex.feed(data[-2048:])
        assert ex.finish().files == 2
        assert (dest / "big.bin").stat().st_size == 64 << 10
    elif end == "abort":
        ex.abort()
    else:
        with pytest.raises(UnsafeArchive):
            ex.feed(member("../escape", b"x"))
    assert _flush_threads() == before, "the flush thread outlived the extractor"
    ex.abort()  # harmless afterwards


# -- check_tree: the rules applied to a tree rsync wrote -----------------------

def _tree(root: Path) -> Path:
    (root / "conf" / "deep").mkdir(parents=True)
    (root / "VERSION").write_bytes(b"1\n")
    (root / "conf" / "app.ini").write_bytes(b"x=1\n" * 10)
    (root / "conf" / "deep" / "data.bin").write_bytes(bytes(100))
    os.symlink("../VERSION", root / "conf" / "version")
    os.symlink("deep/data.bin", root / "conf" / "data")
    return root


def test_check_tree_counts_what_a_clean_tree_holds(tmp_path):
    stats = archive.check_tree(_tree(tmp_path / "t"))
    assert (stats.files, stats.dirs, stats.symlinks) == (3, 2, 2)
    assert stats.content_bytes == 2 + 40 + 100


def test_check_tree_memory_stays_flat_in_the_width_of_a_directory(tmp_path):
    """One listing per level is held, not every subdirectory still to visit (about 350 bytes each)."""
    import tracemalloc

    def grown(dirs: int) -> int:
        root = tmp_path / f"t{dirs}"
        for i in range(dirs):
            (root / "wide" / f"directory-with-a-name-of-some-length-{i:06d}").mkdir(parents=True)
        tracemalloc.start()
        try:
            assert archive.check_tree(root).dirs == dirs + 1
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = grown(500), grown(20_000)
    assert many - few < 100_000, (few, many)


@pytest.mark.parametrize("bit", [stat.S_ISUID, stat.S_ISGID])
def test_check_tree_refuses_setuid_and_setgid_anywhere(tmp_path, bit):
    root = _tree(tmp_path / "t")
    target = root / "conf" / "deep" / "data.bin"
    os.chmod(target, 0o755 | bit)
    if not os.stat(target).st_mode & bit:
        pytest.skip("this filesystem or user cannot set the bit")
    with pytest.raises(UnsafeArchive, match=r"setuid or setgid bit on 'conf/deep/data.bin'"):
        archive.check_tree(root)


def test_check_tree_refuses_a_setgid_directory(tmp_path):
    root = _tree(tmp_path / "t")
    os.chmod(root / "conf", 0o2755)
    if not os.stat(root / "conf").st_mode & stat.S_ISGID:
        pytest.skip("this filesystem or user cannot set the bit")
    with pytest.raises(UnsafeArchive, match=r"setuid or setgid bit on 'conf'$"):
        archive.check_tree(root)


def test_check_tree_refuses_special_files(tmp_path):
    root = _tree(tmp_path / "t")
    os.mkfifo(root / "conf" / "pipe")
    with pytest.raises(UnsafeArchive, match=r"special file 'conf/pipe'"):
        archive.check_tree(root)
    os.unlink(root / "conf" / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        with pytest.raises(UnsafeArchive, match=r"special file 'sock'"):
            archive.check_tree(root)


@pytest.mark.parametrize("target", ["/etc", "../../outside", "deep/../../../x"])
def test_check_tree_refuses_symlinks_that_leave_the_tree(tmp_path, target):
    root = _tree(tmp_path / "t")
    os.symlink(target, root / "conf" / "escape")
    with pytest.raises(UnsafeArchive, match="conf/escape"):
        archive.check_tree(root)


def test_check_tree_allows_the_nesting_archives_may_have_and_no_more(tmp_path):
    root = tmp_path / "t"
    os.makedirs(root / "/".join(["d"] * archive.MAX_DEPTH))
    assert archive.check_tree(root).dirs == archive.MAX_DEPTH
    os.mkdir(root / "/".join(["d"] * (archive.MAX_DEPTH + 1)))
    # The path in the message is cut short (200 characters), never the check.
    with pytest.raises(UnsafeArchive, match=rf"more than {archive.MAX_DEPTH} levels at '(d/)+d/\.\.\.$"):
        archive.check_tree(root)


def test_check_tree_shows_undecodable_names_escaped(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    os.mkfifo(os.fsencode(root) + b"/\xff\n")
    # backslashreplace, then repr: a raw byte and a line break cannot reach a log line as such.
    with pytest.raises(UnsafeArchive, match=r"special file '\\\\xff\\n'$"):
        archive.check_tree(root)
