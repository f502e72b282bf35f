"""Shared fixtures: every test runs with a throwaway home and no PEERKIT_* variables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Started in the background (`cmd &` in a script, nohup), this process
    # ignores SIGINT, and so would every command it starts: the tests that
    # stop a pull with Ctrl-C's signal would see it run to the end.  A
    # handler of ours is not inherited, so commands start as a terminal's would.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # A run stopped with SIGTERM (kill, timeout(1), a CI job cancelled) would
    # end at once and leave the session's throwaway users, sshds and mounts
    # behind.  As a KeyboardInterrupt, pytest stops and tears them down.
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def _stop_like_ctrl_c(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise KeyboardInterrupt(f"stopped by signal {signum}")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME at a fresh directory and clear peerkit's environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("PEERKIT_") or name == "SSH_ORIGINAL_COMMAND":
            monkeypatch.delenv(name, raising=False)
    return home


def run_peerkit(*args: str, env: dict | None = None, input: str | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `peerkit` CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "peerkit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"peerkit {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@pytest.fixture
def peerkit():
    """Return a function that runs the peerkit CLI and returns the completed process."""
    return run_peerkit
