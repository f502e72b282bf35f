"""The peers database: one SQLite file in state_dir, schema under migrations."""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import Busy, StateError

KIND_DIRECT = "direct-ssh-direct"


class _Errors:
    """Turn SQLite's errors into ours: Busy for a file another process held past the timeout, else StateError.

    Callers (the CLI's exit codes, the web UI's messages, peer-shell's audit
    line) then say "busy" or name the damaged file, instead of reporting a
    raw ``OperationalError`` as an internal error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, sqlite3.Error):
            # SQLITE_BUSY / SQLITE_LOCKED (extended codes keep them in the low byte).
            busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            raise (Busy if busy else StateError)(f"{self.path}: {exc}") from None


# Append only: each entry (its statements) moves the schema one version forward.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("""
    CREATE TABLE peers (
        name        TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        config_json TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'new',
        last_seen   TEXT,
        created_at  TEXT NOT NULL
    )
    """,),
    # v2: per-peer permissions (enforced by peer-shell) and key expiry.
    ("ALTER TABLE peers ADD COLUMN permissions_json TEXT NOT NULL DEFAULT '{}'",
     "ALTER TABLE peers ADD COLUMN expires_at TEXT"),
)
SCHEMA_VERSION = len(_MIGRATIONS)

# What a peer may do unless the operator says otherwise: see and pull every
# app (the seed's behaviour), never push, from any address.
DEFAULT_PERMISSIONS: dict[str, Any] = {"apps": "all", "deny_apps": [], "push": False, "from": []}


def default_permissions() -> dict[str, Any]:
    """Return a fresh copy of the default permissions (safe to mutate)."""
    return json.loads(json.dumps(DEFAULT_PERMISSIONS))


def now() -> str:
    """Return the current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Peer:
    """One paired peer (copy one with changes with ``peer.replace(...)``)."""

    # A plain class, not a dataclass, for peer-shell's start-up: see config.py.
    __slots__ = ("name", "kind", "config", "status", "last_seen", "created_at", "permissions", "expires_at")
    __hash__ = None  # type: ignore[assignment]  # mutable: unhashable, like the dataclass was

    def __init__(self, name: str, kind: str = KIND_DIRECT, config: dict[str, Any] | None = None,
                 status: str = "new", last_seen: str | None = None, created_at: str | None = None,
                 permissions: dict[str, Any] | None = None, expires_at: str | None = None) -> None:
        self.name = name
        self.kind = kind
        self.config: dict[str, Any] = {} if config is None else config
        self.status = status
        self.last_seen = last_seen
        self.created_at: str = now() if created_at is None else created_at
        self.permissions: dict[str, Any] = default_permissions() if permissions is None else permissions
        self.expires_at = expires_at

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> "Peer":
        """Return a copy with ``changes`` (shallow, like dataclasses.replace)."""
        return type(self)(**{**{name: getattr(self, name) for name in self.__slots__}, **changes})

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, **self.config, "status": self.status,
                "last_seen": self.last_seen, "created_at": self.created_at,
                "permissions": self.permissions, "expires_at": self.expires_at}

    def may_see(self, slug: str) -> bool:
        """Tell whether this peer may list and pull app ``slug``."""
        perms = {**default_permissions(), **self.permissions}
        if slug in perms["deny_apps"]:
            return False
        return perms["apps"] == "all" or slug in perms["apps"]

    @property
    def may_push(self) -> bool:
        return bool(self.permissions.get("push", False))

    def expired(self, at: datetime | None = None) -> bool:
        """Tell whether the peer's access has expired."""
        if not self.expires_at:
            return False
        return (at or datetime.now(timezone.utc)) >= datetime.fromisoformat(self.expires_at)


class PeerStore:
    """Access to ``peers.db``."""

    def __init__(self, db_path: Path, *, readonly: bool = False, timeout: float = 10) -> None:
        """Open ``db_path``; a statement that finds it locked waits up to ``timeout`` s."""
        self.path = db_path
        self._errors = _Errors(db_path)
        with self._errors:
            if readonly:
                # peer-shell only reads; it must never create or migrate the DB.
                # Quoted: a '#', '?' or '%' in the path would otherwise end or
                # alter the URI and open (and create) some other file.
                self.db = sqlite3.connect(f"file:{urllib.parse.quote(str(db_path))}?mode=ro",
                                          uri=True, timeout=timeout)
            else:
                db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                old_umask = os.umask(0o077)
                try:
                    self.db = sqlite3.connect(db_path, timeout=timeout)
                finally:
                    os.umask(old_umask)
                self._migrate()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "PeerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        # BEGIN IMMEDIATE serialises concurrent first runs: the second process
        # waits, then sees the schema already applied.
        self.db.isolation_level = None
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
            current = self.schema_version()
            if current > len(_MIGRATIONS):
                raise StateError(f"{self.path} has schema version {current}; "
                                 f"this peerkit knows {len(_MIGRATIONS)}")
            for version, statements in enumerate(_MIGRATIONS[current:], start=current + 1):
                for sql in statements:
                    self.db.execute(sql)
                self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now()))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        finally:
            self.db.isolation_level = ""

    def schema_version(self) -> int:
        """Return the applied schema version."""
        with self._errors:
            return self.db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]

    _COLUMNS = "name, kind, config_json, status, last_seen, created_at, permissions_json, expires_at"

    @staticmethod
    def _row(row: tuple) -> Peer:
        name, kind, config_json, status, last_seen, created_at, permissions_json, expires_at = row
        permissions = {**default_permissions(), **json.loads(permissions_json)}
        return Peer(name, kind, json.loads(config_json), status, last_seen, created_at,
                    permissions, expires_at)

    def get(self, name: str) -> Peer | None:
        """Return the peer called ``name``, or None; raise Busy if a writer held the file past the timeout."""
        with self._errors:
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM peers WHERE name = ?", (name,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[Peer]:
        """Return every peer, sorted by name."""
        with self._errors:
            rows = self.db.execute(f"SELECT {self._COLUMNS} FROM peers ORDER BY name").fetchall()
        return [self._row(r) for r in rows]

    def put(self, peer: Peer) -> None:
        """Insert or replace a peer row (keeping its creation time)."""
        with self._errors, self.db:
            self.db.execute(
                f"INSERT INTO peers ({self._COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, "
                "config_json = excluded.config_json, status = excluded.status, "
                "last_seen = excluded.last_seen, permissions_json = excluded.permissions_json, "
                "expires_at = excluded.expires_at",
                (peer.name, peer.kind, json.dumps(peer.config, sort_keys=True), peer.status,
                 peer.last_seen, peer.created_at, json.dumps(peer.permissions, sort_keys=True),
                 peer.expires_at))

    def delete(self, name: str) -> bool:
        """Delete a peer row; return whether it existed."""
        with self._errors, self.db:
            return self.db.execute("DELETE FROM peers WHERE name = ?", (name,)).rowcount > 0

    def set_status(self, name: str, status: str, *, seen: bool, features: list[str] | None = None) -> None:
        """Record the outcome of talking to a peer (and the features its ping offered)."""
        self.set_statuses([(name, status, seen, features)])

    def set_statuses(self, outcomes: list[tuple[str, str, bool, list[str] | None]]) -> None:
        """Record several ``(name, status, seen, features)`` outcomes in one transaction."""
        stamp = now()
        with self._errors, self.db:
            for name, status, seen, features in outcomes:
                if seen:
                    self.db.execute("UPDATE peers SET status = ?, last_seen = ? WHERE name = ?",
                                    (status, stamp, name))
                else:
                    self.db.execute("UPDATE peers SET status = ? WHERE name = ?", (status, name))
                if features is not None:
                    # One statement: a concurrent change to the rest of the config is kept.
                    self.db.execute("UPDATE peers SET config_json = json_set(config_json, '$.features', "
                                    "json(?)) WHERE name = ?", (json.dumps(features), name))
