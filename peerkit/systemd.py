"""systemd units for an instance: the embedded server, health checks, scheduled pulls, the web UI, the agent.

The templates live in the repository's ``systemd/`` directory (installed to
``<prefix>/share/peerkit/systemd``); ``peerkit systemd install`` fills in
this instance's paths and writes them where systemd looks.
"""

from __future__ import annotations

import os
import pwd
import grp
import sys
from pathlib import Path

from .atomicfile import write_atomic
from .config import Config
from .errors import PeerkitError

UNITS = ("peerkit-serve.service", "peerkit-health.service", "peerkit-health.timer",
         "peerkit-pull@.service", "peerkit-pull@.timer", "peerkit-web.service", "peerkit-agent.service")


def template_dir() -> Path:
    """Return the directory holding the unit templates."""
    candidates = [Path(__file__).resolve().parent.parent / "systemd",
                  Path(sys.prefix) / "share" / "peerkit" / "systemd"]
    for path in candidates:
        if (path / UNITS[0]).is_file():
            return path
    raise PeerkitError("the systemd unit templates are not installed")


def peerkit_executable() -> str:
    """Return the absolute path of the peerkit command beside this Python."""
    return str(Path(sys.executable).parent / "peerkit")


def render(cfg: Config, *, user_mode: bool, peerkit: str | None = None) -> dict[str, str]:
    """Return every unit's text with this instance's values filled in."""
    writable = sorted({str(p) for p in (cfg.state_dir, cfg.apps_dir, cfg.backups_dir,
                                        cfg.ssh.authorized_keys.parent, cfg.ssh.identity.parent)})
    uid = os.geteuid()
    user_lines = "" if user_mode else (f"User={pwd.getpwuid(uid).pw_name}\n"
                                       f"Group={grp.getgrgid(os.getegid()).gr_name}")
    values = {
        "@PEERKIT@": peerkit or peerkit_executable(),
        "@CONFIG@": str(cfg.path),
        "@USER_LINES@": user_lines,
        "@STATE_DIR@": f"-{cfg.state_dir}",
        # '-': a directory that does not exist yet is not an error.
        "@RW_PATHS@": " ".join(f"-{p}" for p in writable),
    }
    for key, value in values.items():
        # Values end up in unit files: no newlines, no specifier surprises.
        if "\n" in value.replace(user_lines, "") or "%" in value:
            raise PeerkitError(f"{key} cannot be used in a unit file: {value!r}")
    out = {}
    for name in UNITS:
        text = (template_dir() / name).read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace(key, value)
        if user_mode:
            # A user manager has no multi-user.target: enabling there would
            # never start the service again after the first `--now`.
            text = text.replace("WantedBy=multi-user.target", "WantedBy=default.target")
        out[name] = text.replace("\n\n\n", "\n\n")
    return out


def default_target(user_mode: bool) -> Path:
    """Return where systemd reads units from."""
    if user_mode:
        return Path(os.path.expanduser("~/.config/systemd/user"))
    return Path("/etc/systemd/system")


def install(cfg: Config, target: Path, *, user_mode: bool) -> list[Path]:
    """Write the units into ``target``; return their paths."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(cfg, user_mode=user_mode).items():
        path = target / name
        write_atomic(path, text.encode("utf-8"), mode=0o644)
        written.append(path)
    return written
