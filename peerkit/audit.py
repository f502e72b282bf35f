"""The peer-shell audit log: one JSON line per invocation, appended atomically."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

MAX_UNTRUSTED = 200


def clean(text: str | None, limit: int = MAX_UNTRUSTED) -> str | None:
    """Truncate untrusted text; JSON encoding with ensure_ascii escapes the rest."""
    if text is None:
        return None
    # Truncation bounds log growth per call; ensure_ascii (in record) turns
    # control characters and non-ASCII into \\u escapes, so a hostile string
    # can neither forge a second log line nor hide behind terminal escapes.
    return text[:limit] + ("…" if len(text) > limit else "")


def client_address(ssh_connection: str | None) -> tuple[str | None, int | None]:
    """Return the client address and port from SSH_CONNECTION."""
    parts = (ssh_connection or "").split(" ")
    if len(parts) != 4:
        return None, None
    try:
        return clean(parts[0], 64), int(parts[1])
    except ValueError:
        return clean(parts[0], 64), None


def utc_now() -> str:
    """Return the time as ``2026-11-24T22:34:05.123+00:00`` (datetime's isoformat, without importing datetime).

    peer-shell writes one audit line per call; ``datetime`` cost about 1 ms of
    each call's start.
    """
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos // 1_000_000:03d}+00:00"


def record(log_path: Path, **fields: Any) -> None:
    """Append one event to the log as a single write (never interleaved)."""
    event = {"time": utc_now(), **fields}
    line = json.dumps(event, ensure_ascii=True, separators=(",", ":")) + "\n"
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
    finally:
        os.close(fd)


def read_events(log_path: Path) -> list[dict[str, Any]]:
    """Return every well-formed event in the log, oldest first."""
    events = []
    try:
        with open(log_path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    events.append(event)
    except FileNotFoundError:
        pass
    return events


def query(log_path: Path, *, peer: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
    """Return the events of ``peer`` (or everyone) at or after ``since``, oldest first."""
    from datetime import datetime  # here: peer-shell's record() never needs it

    out = []
    for event in read_events(log_path):
        if peer is not None and event.get("peer") != peer:
            continue
        if since is not None:
            try:
                when = datetime.fromisoformat(str(event.get("time")))
            except ValueError:
                continue
            if when < since:
                continue
        out.append(event)
    return out
