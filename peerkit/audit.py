"""The peer-shell audit log: one JSON line per invocation, appended atomically."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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


def record(log_path: Path, **fields: Any) -> None:
    """Append one event to the log as a single write (never interleaved)."""
    event = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}
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
