"""Local peerkit instances for unit tests: every file under one directory, no SSH involved."""

from __future__ import annotations

import sys
from pathlib import Path

from peerkit import pairing
from peerkit.config import Config

PEER_SHELL = Path(sys.executable).parent / "peer-shell"


def make_instance(root: Path, name: str, **ssh) -> Config:
    """Initialise a peerkit instance whose every file lives under ``root``."""
    overrides = {
        "name": name, "apps_dir": str(root / "apps"), "backups_dir": str(root / "backups"),
        "state_dir": str(root / "state"), "peer_shell": str(PEER_SHELL),
        "ssh": {"user": "peer", "host": f"{name}.example.test", "port": 22, "identity": str(root / "id"),
                "authorized_keys": str(root / "ssh" / "authorized_keys"), "host_keys": [], **ssh},
    }
    return pairing.init(root / "config.yaml", overrides).config
