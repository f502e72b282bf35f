"""Run the operator's hooks (stop, start, post_restore) without a shell."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import HookFailed

COMPOSE_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
_AUTO = {
    "stop": ("docker", "compose", "down"),
    "start": ("docker", "compose", "up", "-d"),
}
MAX_OUTPUT = 64 << 10


@dataclass
class HookRun:
    """One hook command and what it printed."""

    hook: str
    argv: list[str]
    exit_status: int | None
    output: str
    duration_ms: float


def commands_for(hook: str, configured: tuple[tuple[str, ...], ...] | None,
                 app_dir: Path) -> tuple[tuple[str, ...], ...]:
    """Return the commands to run for ``hook`` ("auto" = docker compose if the app has a compose file)."""
    if configured is not None:
        return configured
    if hook in _AUTO and any((app_dir / name).is_file() for name in COMPOSE_FILES):
        return (_AUTO[hook],)
    return ()


def hook_env(app: str, app_dir: Path, peer: str) -> dict[str, str]:
    """Return the scrubbed environment hooks run with."""
    # Only what a hook needs: our own environment (and any secret in it)
    # stays with us.
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "LC_ALL", "USER", "LOGNAME",
                                            "DOCKER_HOST", "XDG_RUNTIME_DIR") if key in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(PEERKIT_APP=app, PEERKIT_APP_DIR=str(app_dir), PEERKIT_PEER=peer)
    return env


def run_hook(hook: str, commands: tuple[tuple[str, ...], ...], *, app: str, app_dir: Path,
             peer: str, timeout: float) -> list[HookRun]:
    """Run each command of ``hook`` in order; raise HookFailed on the first failure."""
    runs: list[HookRun] = []
    env = hook_env(app, app_dir, peer)
    cwd = app_dir if app_dir.is_dir() else app_dir.parent
    for argv in commands:
        exe = shutil.which(argv[0], path=env["PATH"]) if "/" not in argv[0] else argv[0]
        if exe is None:
            runs.append(HookRun(hook, list(argv), None, f"{argv[0]}: command not found", 0.0))
            raise HookFailed(f"{hook} hook: {argv[0]}: command not found", runs)
        started = time.monotonic()
        # Own process group, so a timeout kills the hook and everything it started.
        try:
            proc = subprocess.Popen([exe, *argv[1:]], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:  # an explicit path that is missing or not executable
            runs.append(HookRun(hook, list(argv), None, f"{argv[0]}: {exc.strerror}", 0.0))
            raise HookFailed(f"{hook} hook: {argv[0]}: {exc.strerror}", runs) from None
        try:
            out, _ = proc.communicate(timeout=timeout)
            status: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = None
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        text = out[-MAX_OUTPUT:].decode("utf-8", "replace")
        runs.append(HookRun(hook, list(argv), status, text, round((time.monotonic() - started) * 1000, 1)))
        if status is None:
            raise HookFailed(f"{hook} hook {argv[0]} timed out after {timeout:g}s", runs)
        if status != 0:
            raise HookFailed(f"{hook} hook {argv[0]} exited {status}", runs)
    return runs
