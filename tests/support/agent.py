"""A real `peerkit agent` process for tests: started, waited for, its log read, stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

PYTHON_AGENT = [sys.executable, "-m", "peerkit.cli", "agent"]


class AgentProcess:
    """`peerkit agent --socket SOCKET`, started by ``popen`` (this user, or a throwaway one)."""

    def __init__(self, socket_path: Path, *, argv: list[str] | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen, env: dict | None = None,
                 wait: bool = True) -> None:
        self.socket = socket_path
        self.log_file = tempfile.TemporaryFile()
        self.proc = popen([*(argv or PYTHON_AGENT), "--socket", str(socket_path)],
                          env=env if env is not None else dict(os.environ), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=self.log_file)
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log():
            assert self.proc.poll() is None, f"the agent exited {self.proc.returncode}: {self.log()}"
            assert time.monotonic() < deadline, f"the agent did not start: {self.log()}"
            time.sleep(0.02)

    def log(self) -> str:
        # pread, never seek-and-read: the agent writes through the same open
        # file, so moving its offset back to 0 while it runs would make its
        # next line overwrite the start of the log.
        fd = self.log_file.fileno()
        size = os.fstat(fd).st_size
        data = b""
        while len(data) < size:
            chunk = os.pread(fd, size - len(data), len(data))
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")

    def workers(self) -> list[tuple[int, str, str]]:
        """Every finished worker in the agent's log: (pid, command, 'exit N' or 'signal N')."""
        return [(int(m[1]), m[2], m[3]) for m in re.finditer(
            r"^peerkit agent: worker (\d+): (\S+): (exit \d+|signal \d+), [\d.]+ s$", self.log(), re.MULTILINE)]

    def wait_workers(self, count: int, timeout: float = 30) -> list[tuple[int, str, str]]:
        """Wait until ``count`` workers have finished (the caller may exit before the agent logs it)."""
        deadline = time.monotonic() + timeout
        while len(self.workers()) < count:
            assert time.monotonic() < deadline, f"{count} workers never finished: {self.log()}"
            time.sleep(0.02)
        return self.workers()

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"no {text!r} in the agent's log: {self.log()}"
            time.sleep(0.02)

    def worker_pids(self) -> list[int]:
        pids = []
        for line in self.log().splitlines():
            if line.startswith("peerkit agent: worker "):
                pid = int(line.split()[3].rstrip(":"))
                if pid not in pids:
                    pids.append(pid)
        return pids

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "AgentProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.log_file.close()


def private_dir(path: Path, uid: int | None = None, gid: int | None = None) -> Path:
    """Make ``path`` a directory only its owner can use (what the agent requires of its socket's)."""
    path.mkdir(parents=True, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, gid if gid is not None else -1)
    path.chmod(0o700)
    return path
