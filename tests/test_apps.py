"""peerkit.apps: the app inventory peers see, and the tar stream they receive."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from peerkit import apps
from peerkit.errors import BadSlug, NoSuchApp, StreamFailed


@pytest.fixture
def apps_dir(tmp_path) -> Path:
    d = tmp_path / "apps"
    d.mkdir()
    return d


def _tree(root: Path) -> dict[str, tuple]:
    """Everything a user would notice about a directory tree (not times or owners)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def test_list_apps_sorted_and_filtered(apps_dir, tmp_path):
    for name in ("nextcloud", "alpha", "b-2", "0day"):
        (apps_dir / name).mkdir()
    (apps_dir / "alpha" / "f").write_bytes(b"x")
    (apps_dir / "nextcloud" / "data").mkdir()
    (apps_dir / "nextcloud" / "data" / "a").write_bytes(b"a" * 2048)
    (apps_dir / "nextcloud" / "b").write_bytes(b"b")
    # Never listed: bad names, files, symlinks to directories.
    for name in ("Upper", ".hidden", "bad_name", "-dash", "a.b", "x" * 64):
        (apps_dir / name).mkdir()
    (apps_dir / "file-app").write_bytes(b"not a dir")
    outside = tmp_path / "outside"
    outside.mkdir()
    (apps_dir / "linked").symlink_to(outside)
    (apps_dir / "dangling").symlink_to(tmp_path / "missing")
    assert apps.list_apps(apps_dir) == [
        {"slug": name, "size_kb": tar_bytes(apps_dir / name) // 1024}
        for name in ("0day", "alpha", "b-2", "nextcloud")]
    # app-info's one entry is list-apps' entry, and None for every name list-apps leaves out.
    listed = {app["slug"]: app for app in apps.list_apps(apps_dir)}
    for name in os.listdir(apps_dir) + ["missing", "..", ".", "../outside", "alpha/", "/etc", ""]:
        assert apps.app_entry(apps_dir, name) == listed.get(name), name


def test_list_apps_of_missing_dir_is_empty(tmp_path):
    assert apps.list_apps(tmp_path / "none") == []


def tar_bytes(app: Path) -> int:
    """Return the length of the stream stream-app really sends for ``app``."""
    proc = subprocess.run(apps.tar_command(app), capture_output=True, check=True)
    return len(proc.stdout)


def test_size_is_the_stream_size_and_follows_no_links(apps_dir, tmp_path):
    app = apps_dir / "app"
    (app / "sub").mkdir(parents=True)
    (app / "one").write_bytes(b"1" * 1000)
    os.link(app / "one", app / "sub" / "hardlink")
    big = tmp_path / "big"
    big.write_bytes(b"0" * 100_000)
    (app / "link-to-big").symlink_to(big)
    (app / "link-to-dir").symlink_to(tmp_path)
    os.mkfifo(app / "fifo")
    # Links are not followed: the 100 kB outside the app is not counted.
    assert apps.archive_size(app) == tar_bytes(app) == 10240
    (app / "two").write_bytes(b"2" * 25_000)
    assert apps.archive_size(app) == tar_bytes(app)
    assert apps.list_apps(apps_dir) == [{"slug": "app", "size_kb": tar_bytes(app) // 1024}]


@pytest.mark.parametrize("seed", range(8))
def test_size_never_underestimates_the_stream(tmp_path, seed):
    # Long names, long link targets and hard links with long names take pax
    # headers; the estimate may round up by a record, never down.
    rnd = random.Random(seed)
    app = tmp_path / "app"
    files = []
    for i in range(rnd.randint(1, 120)):
        sub = app / ("x" * rnd.randint(1, 60)) / f"d{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / ("f" * rnd.randint(1, 120) + str(i))
        path.write_bytes(rnd.randbytes(rnd.randint(0, 3000)))
        files.append(path)
        if i % 9 == 0:
            (sub / f"l{i}").symlink_to("y" * rnd.randint(1, 150))
        if i % 11 == 0:
            os.link(rnd.choice(files), sub / ("h" * rnd.randint(1, 100) + str(i)))
    actual = tar_bytes(app)
    assert actual <= apps.archive_size(app) <= actual + 10240


def test_app_path(apps_dir, tmp_path):
    (apps_dir / "good").mkdir()
    (apps_dir / "afile").write_bytes(b"")
    (tmp_path / "target").mkdir()
    (apps_dir / "alias").symlink_to(tmp_path / "target")
    (apps_dir / "loop").symlink_to(apps_dir / "loop")
    assert apps.app_path(apps_dir, "good") == apps_dir / "good"
    for slug in ("missing", "afile", "alias", "loop"):
        with pytest.raises(NoSuchApp):
            apps.app_path(apps_dir, slug)
    for slug in ("../apps", "..", "/etc", "-rf", "a/b", "Good", "", "good/", "a" * 64):
        with pytest.raises(BadSlug):
            apps.app_path(apps_dir, slug)


def test_app_path_inside_symlinked_apps_dir_is_fine(tmp_path, apps_dir):
    (apps_dir / "good").mkdir()
    alias = tmp_path / "apps-alias"
    alias.symlink_to(apps_dir)
    assert apps.app_path(alias, "good") == alias / "good"


def _make_app(root: Path) -> Path:
    app = root / "myapp"
    (app / "data" / "empty-dir").mkdir(parents=True)
    (app / "compose.yaml").write_text("services: {}\n")
    (app / "data" / "blob.bin").write_bytes(os.urandom(300_000))
    (app / "data" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(app / "data" / "run.sh", 0o750)
    (app / "data" / "secret").write_text("s")
    os.chmod(app / "data" / "secret", 0o600)
    (app / "data" / "name with spaces & ünïcode").write_text("x")
    (app / "current").symlink_to("data/blob.bin")
    (app / "escape").symlink_to("/etc/passwd")
    (app / "dangling").symlink_to("nowhere")
    return app


CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def _extract(archive: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["tar", "-x", "-p", "-f", "-", "-C", str(dest)], input=archive, check=True, timeout=60,
                   env=CLEAN_ENV)


def test_stream_app_writes_a_tar_of_the_app(apps_dir, tmp_path):
    app = _make_app(apps_dir)
    out = tmp_path / "out.tar"
    with open(out, "wb") as fh:
        sent = apps.stream_app(app, fh.fileno())
    archive = out.read_bytes()
    assert sent == len(archive) > 300_000
    _extract(archive, tmp_path / "x")
    assert _tree(tmp_path / "x") == _tree(app)
    # Symlinks travel as symlinks, never as the files they point to.
    assert os.readlink(tmp_path / "x" / "escape") == "/etc/passwd"
    assert os.readlink(tmp_path / "x" / "current") == "data/blob.bin"
    listing = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, text=True, check=True,
                             env=CLEAN_ENV).stdout
    assert "./escape -> /etc/passwd" in listing
    names = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True, check=True,
                             env=CLEAN_ENV).stdout.split("\n")
    assert all(n == "" or n == "./" or n.startswith("./") for n in names)


def test_stream_app_into_a_pipe(apps_dir, tmp_path):
    app = _make_app(apps_dir)
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(r, 65536):
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        sent = apps.stream_app(app, w)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    archive = b"".join(chunks)
    assert sent == len(archive)
    _extract(archive, tmp_path / "x")
    assert _tree(tmp_path / "x") == _tree(app)


def test_stream_app_ignores_hostile_tar_environment(apps_dir, tmp_path, monkeypatch):
    app = _make_app(apps_dir)
    monkeypatch.setenv("TAR_OPTIONS", "--exclude=data --dereference")
    out = tmp_path / "out.tar"
    with open(out, "wb") as fh:
        apps.stream_app(app, fh.fileno())
    _extract(out.read_bytes(), tmp_path / "x")
    assert _tree(tmp_path / "x") == _tree(app)


def test_stream_app_failure_is_stream_failed(tmp_path):
    out = tmp_path / "out.tar"
    with open(out, "wb") as fh:
        with pytest.raises(StreamFailed) as info:
            apps.stream_app(tmp_path / "missing", fh.fileno())
    assert info.value.code == "failed"
