"""Pre-backups: a snapshot of the local app before anything replaces it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .apps import TAR
from .atomicfile import fsync_dir
from .config import Config
from .errors import BackupFailed

_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


def backup(cfg: Config, app: str, app_dir: Path, tag: str = "pre-pull") -> str:
    """Snapshot ``app_dir``; return the archive path or restic snapshot id."""
    if cfg.hooks.pre_backup == "restic":
        return _restic(cfg, app_dir, tag)
    return _tarball(cfg, app, app_dir, tag)


def _tarball(cfg: Config, app: str, app_dir: Path, tag: str) -> str:
    target_dir = cfg.backups_dir / app
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    zstd = shutil.which("zstd", path=_ENV["PATH"]) is not None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = f"tar.{'zst' if zstd else 'gz'}"
    final = target_dir / f"{stamp}-{tag}.{suffix}"
    n = 1
    while final.exists():  # two backups within one second keep both
        n += 1
        final = target_dir / f"{stamp}-{tag}-{n}.{suffix}"
    tmp = target_dir / f".{final.name}.partial"
    argv = [TAR, "--create", f"--file={tmp}", "--zstd" if zstd else "--gzip",
            f"--directory={app_dir.parent}", "--numeric-owner", "--", app_dir.name]
    old_umask = os.umask(0o077)  # backups hold app secrets
    try:
        proc = subprocess.run(argv, env=_ENV, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise BackupFailed(f"tar exited {proc.returncode}: "
                               f"{proc.stderr.decode('utf-8', 'replace')[-300:]}")
        os.rename(tmp, final)
    except BaseException:
        # Never leave a partial archive that looks like a backup.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.umask(old_umask)
    fsync_dir(target_dir)
    return str(final)


def _restic(cfg: Config, app_dir: Path, tag: str) -> str:
    if cfg.restic_repository is None:
        raise BackupFailed("hooks.pre_backup is restic but restic.repository is not set")
    restic = shutil.which("restic", path=_ENV["PATH"])
    if restic is None:
        raise BackupFailed("restic is not installed")
    env = dict(_ENV, HOME=os.environ.get("HOME", "/"), RESTIC_REPOSITORY=str(cfg.restic_repository))
    if cfg.restic_password_file is not None:
        env["RESTIC_PASSWORD_FILE"] = str(cfg.restic_password_file)
    argv = [restic, "backup", "--json", "--tag", "peerkit", "--tag", tag, "--", str(app_dir)]
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise BackupFailed(f"restic exited {proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-300:]}")
    for line in reversed(proc.stdout.decode("utf-8", "replace").splitlines()):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("message_type") == "summary":
                return f"restic:{event.get('snapshot_id', '')}"
    raise BackupFailed("restic reported no snapshot")
