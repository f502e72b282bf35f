"""Run the peerkit CLI with --json as a subprocess: the only way the web UI acts.

Argument lists, never a shell, and ``--`` before every value that came from
a browser, so the page exercises exactly the contract a host dashboard
relies on: JSON progress events on stdout, then one result object.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

CLI_TIMEOUT = 120.0
_LINE_LIMIT = 16 << 20
_MAX_REMARKS = 20
_MAX_REMARK_CHARS = 500
_ERROR_PREFIX = "peerkit: error:"

Event = Callable[[dict[str, Any]], None]


@dataclass
class CliResult:
    """What one CLI run said: its exit status, its result object, its remarks on stderr."""

    status: int
    result: dict[str, Any]
    remarks: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The CLI's result object, plus its stderr remarks (notes, warnings) for the operator."""
        return {**self.result, "remarks": self.remarks}


def default_command() -> list[str]:
    """Return the command that runs this very peerkit's CLI."""
    return [sys.executable, "-m", "peerkit.cli"]


def _failure(message: str) -> dict[str, Any]:
    return {"ok": False, "error": "error", "message": message}


def _remarks(stderr: bytes) -> list[str]:
    out = []
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith(_ERROR_PREFIX):
            out.append(line[:_MAX_REMARK_CHARS])
    return out[:_MAX_REMARKS]


class Cli:
    """The peerkit CLI of one instance (one config file), run as a subprocess."""

    def __init__(self, config: Path, command: Sequence[str] | None = None) -> None:
        self.prefix = [*(command or default_command()), "--config", str(config), "--json"]

    def argv(self, *args: str) -> list[str]:
        """Return the full argument list for a CLI run."""
        return [*self.prefix, *args]

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """Start the CLI; its stdout and stderr are pipes."""
        # No shell: a token or a name from the page is one argv element.
        return await asyncio.create_subprocess_exec(
            *self.argv(*args), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=_LINE_LIMIT, env=dict(os.environ))

    async def run(self, *args: str, timeout: float | None = CLI_TIMEOUT,
                  on_event: Event | None = None) -> CliResult:
        """Run the CLI to its end; pass progress events to ``on_event``; return its result."""
        proc = await self.start(*args)
        return await self.collect(proc, timeout=timeout, on_event=on_event)

    async def collect(self, proc: asyncio.subprocess.Process, *, timeout: float | None = CLI_TIMEOUT,
                      on_event: Event | None = None) -> CliResult:
        """Read a started CLI's output to its end and return its result."""
        last: dict[str, Any] | None = None

        async def read_stdout() -> None:
            nonlocal last
            assert proc.stdout is not None
            async for raw in proc.stdout:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(obj, dict):
                    continue
                if obj.get("event") == "progress":
                    if on_event is not None:
                        on_event(obj)
                else:
                    last = obj

        async def read_stderr() -> bytes:
            assert proc.stderr is not None
            kept: list[bytes] = []
            size = 0
            # Read to the end (a child blocked on a full pipe never exits), keep the first MiB.
            while chunk := await proc.stderr.read(1 << 16):
                if size < 1 << 20:
                    kept.append(chunk)
                    size += len(chunk)
            return b"".join(kept)

        try:
            _, stderr = await asyncio.wait_for(asyncio.gather(read_stdout(), read_stderr()), timeout)
            status = await proc.wait()
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return CliResult(-1, _failure(f"peerkit gave no answer within {timeout:g} s"))
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if last is None or not isinstance(last.get("ok"), bool):
            last = _failure(f"peerkit exited with status {status} without a result")
        elif status != 0 and last["ok"]:
            last = {**last, "ok": False, "error": last.get("error") or "error"}
        return CliResult(status, last, _remarks(stderr))
