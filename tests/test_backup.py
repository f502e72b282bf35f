"""Pre-backups of the local app before a pull replaces it (peerkit.backup)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from peerkit import backup as backup_mod
from peerkit.apps import TAR
from peerkit.backup import backup
from peerkit.config import Config, read_config
from peerkit.errors import BackupFailed

from tests.trees import build_mixed_tree, diff, inode_groups, snapshot

# backup() looks programs up in this fixed PATH, not the caller's.
SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"
HAVE_ZSTD = shutil.which("zstd", path=SEARCH_PATH) is not None
RESTIC = shutil.which("restic", path=SEARCH_PATH)
needs_restic = pytest.mark.skipif(
    RESTIC is None and os.environ.get("CI") != "true",
    reason="restic is not installed (in CI, CI=true makes this a failure instead)")


def make_config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(
        "name: here\n"
        "ssh: {user: peer, host: here.example}\n"
        f"apps_dir: {tmp_path / 'apps'}\n"
        f"backups_dir: {tmp_path / 'backups'}\n"
        f"state_dir: {tmp_path / 'state'}\n" + extra)
    return read_config(path)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    path = tmp_path / "apps" / "web"
    path.mkdir(parents=True)
    build_mixed_tree(path, big_size=256 << 10, small_files=40)
    return path


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    subprocess.run([TAR, "--extract", f"--file={archive}", f"--directory={dest}", "--numeric-owner",
                    "--same-permissions", "--same-owner"], check=True, capture_output=True)
    return dest


def _check_tarball(result: str, cfg: Config, app_dir: Path, tmp_path: Path, ext: str, magic: bytes) -> None:
    archive = Path(result)
    assert archive.parent == cfg.backups_dir / "web"
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-pre-pull\.tar\.{ext}", archive.name), archive.name
    assert archive.read_bytes()[:len(magic)] == magic
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    assert stat.S_IMODE(archive.parent.stat().st_mode) == 0o700
    # Only the finished archive: no temporary or partial file beside it.
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]
    dest = _extract(archive, tmp_path / "restored")
    assert sorted(os.listdir(dest)) == ["web"]
    assert diff(snapshot(dest / "web"), snapshot(app_dir)) == []
    assert inode_groups(dest / "web") == inode_groups(app_dir) != []


def test_tar_backup_round_trips(tmp_path: Path, app_dir: Path) -> None:
    cfg = make_config(tmp_path)
    before = snapshot(app_dir)
    result = backup(cfg, "web", app_dir)
    assert diff(snapshot(app_dir), before) == []  # the app itself is untouched
    if HAVE_ZSTD:
        _check_tarball(result, cfg, app_dir, tmp_path, "zst", b"\x28\xb5\x2f\xfd")
    else:
        _check_tarball(result, cfg, app_dir, tmp_path, "gz", b"\x1f\x8b")


def test_gzip_without_zstd(tmp_path: Path, app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PATH holding gzip but no zstd: backup() must fall back to .tar.gz.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gzip = shutil.which("gzip", path=SEARCH_PATH)
    assert gzip is not None
    os.symlink(gzip, bin_dir / "gzip")
    monkeypatch.setitem(backup_mod._ENV, "PATH", str(bin_dir))
    cfg = make_config(tmp_path)
    _check_tarball(backup(cfg, "web", app_dir), cfg, app_dir, tmp_path, "gz", b"\x1f\x8b")


def test_tag_names_the_archive_and_backups_are_private(tmp_path: Path, app_dir: Path) -> None:
    cfg = make_config(tmp_path)
    old_umask = os.umask(0o022)
    try:
        result = Path(backup(cfg, "web", app_dir, tag="pre-restore"))
        assert os.umask(0o022) == 0o022  # backup() restored the process umask
    finally:
        os.umask(old_umask)
    assert result.name.endswith("-pre-restore.tar." + ("zst" if HAVE_ZSTD else "gz"))
    assert stat.S_IMODE(result.stat().st_mode) == 0o600


def test_missing_app_fails_without_leaving_a_file(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(BackupFailed) as info:
        backup(cfg, "web", tmp_path / "apps" / "web")
    assert "tar exited" in str(info.value)
    target = cfg.backups_dir / "web"
    assert list(target.iterdir()) == []  # neither a partial nor a "finished" archive


def test_failed_backup_keeps_earlier_backups(tmp_path: Path, app_dir: Path) -> None:
    cfg = make_config(tmp_path)
    first = Path(backup(cfg, "web", app_dir))
    content = first.read_bytes()
    with pytest.raises(BackupFailed):
        backup(cfg, "web", tmp_path / "apps" / "missing")
    assert [p.name for p in (cfg.backups_dir / "web").iterdir()] == [first.name]
    assert first.read_bytes() == content


# -- restic ----------------------------------------------------------------

def test_restic_without_repository_fails(tmp_path: Path, app_dir: Path) -> None:
    cfg = make_config(tmp_path, "hooks: {pre_backup: restic}\n")
    with pytest.raises(BackupFailed, match="restic.repository"):
        backup(cfg, "web", app_dir)
    assert not cfg.backups_dir.exists()  # and no tarball instead


@pytest.fixture
def restic_repo(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    assert RESTIC is not None, "restic is required in CI"
    repo = tmp_path / "restic-repo"
    password = tmp_path / "restic-password"
    password.write_text("correct horse battery staple\n")
    password.chmod(0o600)
    env = {"PATH": SEARCH_PATH, "HOME": os.environ["HOME"], "RESTIC_REPOSITORY": str(repo),
           "RESTIC_PASSWORD_FILE": str(password)}
    subprocess.run([RESTIC, "init"], env=env, check=True, capture_output=True, timeout=60)
    return repo, password, env


@needs_restic
def test_restic_snapshot_tagged(tmp_path: Path, app_dir: Path, restic_repo) -> None:
    repo, password, env = restic_repo
    cfg = make_config(tmp_path, f"hooks: {{pre_backup: restic}}\n"
                                f"restic: {{repository: {repo}, password_file: {password}}}\n")
    result = backup(cfg, "web", app_dir)
    assert re.fullmatch(r"restic:[0-9a-f]{8,64}", result), result
    snap_id = result.removeprefix("restic:")

    proc = subprocess.run([RESTIC, "snapshots", "--json"], env=env, check=True, capture_output=True,
                          timeout=60)
    snapshots = json.loads(proc.stdout)
    assert len(snapshots) == 1
    snap = snapshots[0]
    assert snap["id"].startswith(snap_id) or snap["short_id"] == snap_id
    assert sorted(snap["tags"]) == ["peerkit", "pre-pull"]
    assert snap["paths"] == [str(app_dir)]
    assert not cfg.backups_dir.exists()  # restic, not a tarball

    # The snapshot holds the app's files and links.
    dest = tmp_path / "restored"
    subprocess.run([RESTIC, "restore", snap_id, "--target", str(dest)], env=env, check=True,
                   capture_output=True, timeout=60)
    restored = dest / str(app_dir).lstrip("/")

    def content(tree: Path) -> dict:
        return {k: {f: v.get(f) for f in ("type", "sha256", "target", "mode")}
                for k, v in snapshot(tree).items()}
    assert diff(content(restored), content(app_dir)) == []


@needs_restic
def test_restic_with_missing_repository_fails(tmp_path: Path, app_dir: Path) -> None:
    password = tmp_path / "restic-password"
    password.write_text("pw\n")
    cfg = make_config(tmp_path, f"hooks: {{pre_backup: restic}}\n"
                                f"restic: {{repository: {tmp_path / 'no-repo'}, password_file: {password}}}\n")
    with pytest.raises(BackupFailed, match="restic exited"):
        backup(cfg, "web", app_dir)
