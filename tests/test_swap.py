"""Staging directories, the atomic swap and tree removal (peerkit.swap)."""

from __future__ import annotations

import errno
import os
import pwd
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from peerkit import listing, swap
from peerkit.swap import ASIDE_PREFIX, STAGING_PREFIX, farm_of, leftovers, link_farm, new_staging, remove_tree, swap_in

from tests.trees import diff, fds_into, make_tree, snapshot

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_600_000_000


def _fill(root: Path, version: str) -> None:
    """Write a small app tree whose content depends on ``version``."""
    (root / "data").mkdir()
    (root / ".env").write_text(f"VERSION={version}\n")
    (root / "data" / f"{version}.db").write_bytes(version.encode() * 1000)
    (root / "run.sh").write_text(f"#!/bin/sh\necho {version}\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("data", root / "current")
    # Fixed mtimes, so any metadata change the swap made would show up.
    for p in (root / "data" / f"{version}.db", root / "data", root / ".env", root / "run.sh", root):
        os.utime(p, (T0, T0))


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    path = tmp_path / "apps"
    path.mkdir()
    return path


def _live_and_staging(apps: Path) -> tuple[Path, Path, dict, dict]:
    live = apps / "web"
    live.mkdir(mode=0o755)
    _fill(live, "old")
    staging = new_staging(apps, "web")
    _fill(staging, "new")
    return live, staging, snapshot(live), snapshot(staging)


def test_new_staging_is_private_beside_the_apps(apps: Path) -> None:
    staging = new_staging(apps / "not-yet", "web")
    assert staging.parent == apps / "not-yet"
    assert staging.name.startswith(STAGING_PREFIX + "web-")
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    assert list(staging.iterdir()) == []
    assert new_staging(apps / "not-yet", "web") != staging  # random, never reused


def test_swap_exchanges_live_and_staging(apps: Path) -> None:
    live, staging, old, new = _live_and_staging(apps)
    aside = swap_in(staging, live)
    assert aside is not None and aside != live
    assert aside.parent == apps
    assert diff(snapshot(live), new) == []
    assert diff(snapshot(aside), old) == []
    # Nothing else appeared or vanished beside the app.
    assert sorted(p.name for p in apps.iterdir()) == sorted(["web", aside.name])


def test_swap_back_restores_the_original_exactly(apps: Path) -> None:
    live, staging, old, new = _live_and_staging(apps)
    aside = swap_in(staging, live)
    back = swap_in(aside, live)
    assert diff(snapshot(live), old) == []
    assert back is not None and diff(snapshot(back), new) == []


def test_live_never_missing_during_swaps(apps: Path) -> None:
    """A separate process watching the live path never sees it missing.

    With two plain renames there is a window in which the app directory does
    not exist; RENAME_EXCHANGE has none.
    """
    live, staging, _, _ = _live_and_staging(apps)
    ready = apps.parent / "watcher-ready"
    stop = apps.parent / "watcher-stop"
    watcher = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import os, sys
            live, ready, stop = sys.argv[1:]
            open(ready, "w").close()
            missing = checks = 0
            while True:
                for _ in range(1000):
                    if not os.path.lexists(live):
                        missing += 1
                checks += 1000
                if os.path.exists(stop):
                    break
            print(missing, checks)
            """), str(live), str(ready), str(stop)],
        stdout=subprocess.PIPE, text=True)
    try:
        while not ready.exists():
            assert watcher.poll() is None
        other = staging
        for _ in range(300):
            other = swap_in(other, live)
    finally:
        stop.touch()
        out, _ = watcher.communicate(timeout=30)
    missing, checks = map(int, out.split())
    assert checks > 0
    assert missing == 0


def test_first_install_moves_staging_into_place(apps: Path) -> None:
    staging = new_staging(apps, "web")
    _fill(staging, "new")
    new = snapshot(staging)
    live = apps / "web"
    assert swap_in(staging, live) is None
    assert not staging.exists()
    assert diff(snapshot(live), new) == []


@pytest.mark.parametrize("appeared", ["file", "empty-dir"])
def test_first_install_never_overwrites_what_appeared_meanwhile(
        apps: Path, monkeypatch: pytest.MonkeyPatch, appeared: str) -> None:
    staging = new_staging(apps, "web")
    _fill(staging, "new")
    new = snapshot(staging)
    live = apps / "web"
    real_lexists = os.path.lexists

    def race(path):
        # Something creates the app between swap_in's check and its rename
        # (only the check of the live path is raced; other calls are real).
        if Path(path) == live and not real_lexists(live):
            if appeared == "file":
                live.write_text("someone else's\n")
            else:
                live.mkdir()
            return False
        return real_lexists(path)

    monkeypatch.setattr(swap.os.path, "lexists", race)
    with pytest.raises(FileExistsError):
        swap_in(staging, live)
    monkeypatch.undo()
    if appeared == "file":
        assert live.read_text() == "someone else's\n"
    else:
        assert live.is_dir() and list(live.iterdir()) == []
    assert diff(snapshot(staging), new) == []


def test_missing_staging_raises_and_leaves_live_alone(apps: Path) -> None:
    live, staging, old, _ = _live_and_staging(apps)
    shutil.rmtree(staging)
    with pytest.raises(FileNotFoundError):
        swap_in(staging, live)
    assert diff(snapshot(live), old) == []


def _no_exchange(src, dst, flags):
    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


def test_fallback_without_rename_exchange(apps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No filesystem without RENAME_EXCHANGE is available to the tests, so the
    # kernel's EINVAL answer is simulated by replacing the renameat2 wrapper;
    # the two plain renames that follow are real.
    monkeypatch.setattr(swap, "_rename2", _no_exchange)
    live, staging, old, new = _live_and_staging(apps)
    aside = swap_in(staging, live)
    assert aside is not None
    assert aside.name.startswith(ASIDE_PREFIX + "web-")
    assert not staging.exists()
    assert diff(snapshot(live), new) == []
    assert diff(snapshot(aside), old) == []
    # An interrupted run's aside directory is found as this app's leftover.
    assert leftovers(apps, "web") == [aside]
    # And swapping back with the fallback restores the original.
    back = swap_in(aside, live)
    assert diff(snapshot(live), old) == []
    assert diff(snapshot(back), new) == []


def test_fallback_first_install(apps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swap, "_rename2", _no_exchange)  # see test_fallback_without_rename_exchange
    staging = new_staging(apps, "web")
    _fill(staging, "new")
    new = snapshot(staging)
    assert swap_in(staging, apps / "web") is None
    assert diff(snapshot(apps / "web"), new) == []


def test_other_rename_errors_are_not_swallowed(apps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(src, dst, flags):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(swap, "_rename2", denied)
    live, staging, old, new = _live_and_staging(apps)
    with pytest.raises(PermissionError):
        swap_in(staging, live)
    assert diff(snapshot(live), old) == []
    assert diff(snapshot(staging), new) == []


def test_leftovers_only_for_this_app(apps: Path) -> None:
    web = [new_staging(apps, "web"), apps / f"{ASIDE_PREFIX}web-0123456789ab"]
    web2 = [new_staging(apps, "web-2"), apps / f"{ASIDE_PREFIX}web-2-ba9876543210"]
    other = [new_staging(apps, "we"), new_staging(apps, "webapp"), apps / "web", apps / "web-2",
             apps / f"{STAGING_PREFIX}web-short"]
    for p in web + web2 + other:
        p.mkdir(exist_ok=True)
    assert leftovers(apps, "web") == sorted(web)
    assert leftovers(apps, "web-2") == sorted(web2)
    assert leftovers(apps, "nothing") == []
    assert leftovers(apps / "missing", "web") == []


# -- remove_tree -----------------------------------------------------------

def _hostile_tree(base: Path) -> tuple[Path, Path]:
    """Build a tree with locked directories and symlinks out; return (tree, outside)."""
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "keep.txt").write_text("keep me\n")
    (outside / "dir" / "inner.txt").write_text("inner\n")
    tree = base / "tree"
    for d in ("ro/sub/deeper", "zero/inner", "zeroempty", "listonly/x", "plain"):
        (tree / d).mkdir(parents=True)
    (tree / "ro" / "f.txt").write_text("f\n")
    (tree / "ro" / "sub" / "deeper" / "g.txt").write_text("g\n")
    (tree / "zero" / "inner" / "h.txt").write_text("h\n")
    (tree / "zero" / "locked.txt").write_text("locked\n")
    (tree / "listonly" / "x" / "i.txt").write_text("i\n")
    os.chmod(tree / "zero" / "locked.txt", 0)
    os.symlink(outside, tree / "plain" / "to-outside-dir")
    os.symlink(outside / "keep.txt", tree / "plain" / "to-outside-file")
    os.symlink(outside, tree / "ro" / "escape")
    os.symlink("../../outside", tree / "relative-escape")
    for d, mode in (("ro/sub", 0o555), ("ro", 0o555), ("zero/inner", 0), ("zero", 0),
                    ("zeroempty", 0), ("listonly", 0o444), ("", 0o555)):
        os.chmod(tree / d, mode)
    return tree, outside


def test_remove_tree_locked_dirs_and_symlinks_out(tmp_path: Path) -> None:
    tree, outside = _hostile_tree(tmp_path)
    before = snapshot(outside)
    remove_tree(tree)
    assert not os.path.lexists(tree)
    assert diff(snapshot(outside), before) == []


def test_remove_tree_on_a_symlink_removes_only_the_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x\n")
    os.chmod(target, 0o555)
    before = snapshot(target)
    os.symlink(target, tmp_path / "link")
    remove_tree(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link")
    assert diff(snapshot(target), before) == []
    remove_tree(tmp_path / "never-existed")  # nothing to do is not an error


def test_remove_tree_memory_stays_flat_in_the_width_of_a_directory(tmp_path: Path) -> None:
    """A directory is emptied while it is listed, not listed whole first (about 700 bytes an entry)."""
    import tracemalloc

    def grown(entries: int) -> int:
        tree = tmp_path / f"tree{entries}"
        (tree / "wide").mkdir(parents=True)
        for i in range(entries):
            if i % 2:
                (tree / "wide" / f"file-with-a-name-of-some-length-{i:06d}").touch()
            else:
                (tree / "wide" / f"directory-with-a-name-of-some-length-{i:06d}").mkdir()
        tracemalloc.start()
        try:
            remove_tree(tree)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert not os.path.lexists(tree)
        return peak

    few, many = grown(500), grown(20_000)
    assert many - few < 100_000, (few, many)


def test_remove_tree_deeper_than_the_streamed_levels(tmp_path: Path) -> None:
    """Past listing.STREAMED_LEVELS a level is listed whole, one fd each: a very deep tree still goes."""
    depth = listing.STREAMED_LEVELS + 450  # all of it listed while emptied would take over 1,024 fds
    os.mkdir(tmp_path / "tree")
    fd = os.open(tmp_path / "tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):  # through fds: the path itself would pass PATH_MAX
            os.mkdir("d", dir_fd=fd)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o400, dir_fd=fd), "wb") as fh:
                fh.write(b"x")
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if i % 50 == 0:
                os.fchmod(fd, 0o555)  # a read-only level now and then
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    # about two fds per streamed level and one per level below them, all within the default 1,024
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, limit[1]), limit[1]))
    try:
        remove_tree(tmp_path / "tree")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)
        if os.path.lexists(tmp_path / "tree"):  # pytest's own clean-up recurses, and fails on this depth
            subprocess.run(["chmod", "-R", "u+rwx", str(tmp_path / "tree")], check=False)
            subprocess.run(["rm", "-rf", str(tmp_path / "tree")], check=False)
    assert not os.path.lexists(tmp_path / "tree")
    assert fds_into(tmp_path / "tree") == []  # other tests' fds may close meanwhile: only ours count


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() == 0 and _nobody() is None, reason="no 'nobody' user to drop to")
def test_remove_tree_locked_dirs_as_non_root() -> None:
    """Root ignores permission bits, so run remove_tree as an ordinary user."""
    if os.geteuid() != 0:
        base = Path(tempfile.mkdtemp())
        try:
            tree, outside = _hostile_tree(base)
            before = snapshot(outside)
            remove_tree(tree)
            assert not os.path.lexists(tree)
            assert diff(snapshot(outside), before) == []
        finally:
            subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
            shutil.rmtree(base, ignore_errors=True)
        return

    nobody = _nobody()
    base = Path(tempfile.mkdtemp(prefix="peerkit-rmtree-"))  # in /tmp: nobody can reach it
    try:
        os.chmod(base, 0o755)
        tree, outside = _hostile_tree(base)
        for dirpath, dirnames, filenames in os.walk(base):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        before = snapshot(outside)
        proc = subprocess.run(
            [sys.executable, "-c",
             "import sys; from pathlib import Path; from peerkit.swap import remove_tree; "
             "remove_tree(Path(sys.argv[1]))", str(tree)],
            user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"},
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.lexists(tree)
        assert diff(snapshot(outside), before) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- the link farm: what --link-dest reads instead of the live app ---------------------------------

def test_the_farm_memory_stays_flat_in_the_width_of_a_directory(tmp_path):
    """One listing per level is held, not the name of every subdirectory still to visit."""
    import tracemalloc

    def grown(dirs: int) -> int:
        live = tmp_path / f"live{dirs}"
        for i in range(dirs):
            (live / "wide" / f"directory-with-a-name-of-some-length-{i:06d}").mkdir(parents=True)
        (live / "wide" / "f").write_bytes(b"x")
        farm = tmp_path / f"farm{dirs}"
        farm.mkdir()
        tracemalloc.start()
        try:
            assert link_farm(live, farm) == 1
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = grown(500), grown(20_000)
    assert many - few < 100_000, (few, many)


def test_the_farm_hard_links_every_regular_file_and_makes_its_own_directories(tmp_path):
    live = make_tree(tmp_path / "live", {"a.txt": b"a", "d/b.txt": b"b", "d/e/c.txt": b"c", "empty": None})
    farm = tmp_path / "farm"
    farm.mkdir()
    assert link_farm(live, farm) == 3
    for rel in ("a.txt", "d/b.txt", "d/e/c.txt"):
        assert os.stat(farm / rel).st_ino == os.stat(live / rel).st_ino
    for rel in ("d", "d/e", "empty"):
        st = os.lstat(farm / rel)
        # Directories of our own (new inodes, private), never the live ones.
        assert stat.S_ISDIR(st.st_mode) and st.st_ino != os.stat(live / rel).st_ino
        assert stat.S_IMODE(st.st_mode) == 0o700


def test_the_farm_holds_no_symlink_and_never_goes_through_one(tmp_path):
    """A symlink planted in the live app (a container writing its data directory) stays out of the farm.

    Otherwise rsync's --link-dest lookup of the peer's ``data/x/secret`` would
    follow ``data/x -> outside`` and hard-link a file from outside the app
    into the new copy, for a peer that guessed its size and mtime.
    """
    outside = make_tree(tmp_path / "outside", {"secret": b"not the app's"})
    live = make_tree(tmp_path / "live", {"data/kept": b"k", "data/x": ("link", str(outside)),
                                         "data/file-link": ("link", str(outside / "secret")),
                                         "data/rel": ("link", "kept")})
    os.mkfifo(live / "data" / "fifo")
    farm = tmp_path / "farm"
    farm.mkdir()
    assert link_farm(live, farm) == 1
    assert sorted(os.listdir(farm / "data")) == ["kept"]
    assert os.stat(outside / "secret").st_nlink == 1


def test_a_live_app_that_is_itself_a_symlink_gives_an_empty_farm(tmp_path):
    real = make_tree(tmp_path / "real", {"a": b"a"})
    os.symlink(real, tmp_path / "live")
    farm = tmp_path / "farm"
    farm.mkdir()
    assert link_farm(tmp_path / "live", farm) == 0  # rsync copies every file
    assert os.listdir(farm) == [] and os.stat(real / "a").st_nlink == 1


def test_a_farm_of_a_deep_tree_keeps_few_descriptors_open(tmp_path):
    # Directories are walked one branch at a time: open descriptors grow
    # with the depth of the tree, not with the number of directories.
    live = make_tree(tmp_path / "live", {f"d{i:03d}/f": b"x" for i in range(300)})
    farm = tmp_path / "farm"
    farm.mkdir()
    before = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 32, hard))
    try:
        assert link_farm(live, farm) == 300
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(os.listdir("/proc/self/fd")) == before


def test_farm_of_gives_a_filled_farm_and_removes_it(tmp_path):
    apps = tmp_path / "apps"
    live = make_tree(apps / "app", {"a": b"a", "d/b": b"b"})
    with farm_of(live, apps, "app") as farm:
        assert farm is not None and farm.parent == apps and farm.name.startswith(".peerkit-staging-app-")
        assert os.stat(farm / "d" / "b").st_ino == os.stat(live / "d" / "b").st_ino
    assert not farm.exists() and os.stat(live / "a").st_nlink == 1
    with farm_of(apps / "new", apps, "new") as none:
        assert none is None
    # Removed when the transfer using it fails, too.
    with pytest.raises(RuntimeError):
        with farm_of(live, apps, "app") as farm:
            raise RuntimeError("rsync failed")
    assert not farm.exists()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second filesystem (/dev/shm)")
def test_a_farm_across_filesystems_links_nothing_and_fails_nothing(tmp_path):
    # An app directory that is a mount point: rsync copies its files instead.
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem here")
        live = make_tree(Path(other) / "live", {"a": b"a", "d/b": b"b"})
        farm = tmp_path / "farm"
        farm.mkdir()
        assert link_farm(live, farm) == 0
        assert os.listdir(farm) == ["d"] and os.listdir(farm / "d") == []


def test_a_farm_that_cannot_be_opened_leaves_no_descriptor_open(tmp_path):
    live = make_tree(tmp_path / "live", {"a": b"a"})
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        link_farm(live, tmp_path / "no-farm")
    assert sorted(os.listdir("/proc/self/fd")) == before
