"""peerkit.state: migrations, the peers table, and read-only opens."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from peerkit.errors import StateError
from peerkit.state import DEFAULT_PERMISSIONS, KIND_DIRECT, SCHEMA_VERSION, Peer, PeerStore


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "state" / "peers.db"


def _versions(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_first_open_creates_db_at_the_current_schema_version(db):
    with PeerStore(db) as store:
        assert store.schema_version() == SCHEMA_VERSION == 2
    assert _versions(db) == [1, 2]
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_migrations", "peers"} <= tables
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700


def test_reopening_does_not_reapply_migrations(db):
    with PeerStore(db) as store:
        store.put(Peer("beta", config={"host": "b.example"}))
    with sqlite3.connect(db) as conn:
        applied_at = conn.execute("SELECT applied_at FROM schema_migrations").fetchall()
    for _ in range(3):
        with PeerStore(db) as store:
            assert store.schema_version() == SCHEMA_VERSION
            assert store.get("beta").config == {"host": "b.example"}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT applied_at FROM schema_migrations").fetchall() == applied_at


def test_newer_schema_is_refused_and_left_alone(db):
    PeerStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '2099-01-01T00:00:00+00:00')")
    before = db.read_bytes()
    with pytest.raises(StateError) as info:
        PeerStore(db)
    assert "schema version 99" in info.value.message
    assert info.value.exit_code == 12
    assert _versions(db) == [1, 2, 99]
    assert db.read_bytes() == before


def test_not_a_database_is_a_state_error(tmp_path):
    bad = tmp_path / "peers.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError):
        PeerStore(bad)


def test_put_get_all_delete(db):
    with PeerStore(db) as store:
        assert store.get("beta") is None
        assert store.all() == []
        beta = Peer("beta", config={"host": "b.example", "port": 22, "list": [1, "x"]})
        store.put(beta)
        store.put(Peer("alpha", config={"host": "a.example"}))
        got = store.get("beta")
        assert got == beta
        assert got.kind == KIND_DIRECT and got.status == "new" and got.last_seen is None
        assert [p.name for p in store.all()] == ["alpha", "beta"]
        assert store.delete("beta") is True
        assert store.delete("beta") is False
        assert store.get("beta") is None
        assert [p.name for p in store.all()] == ["alpha"]
    # Persisted across connections.
    with PeerStore(db) as store:
        assert [p.name for p in store.all()] == ["alpha"]


def test_put_replaces_but_keeps_created_at(db):
    with PeerStore(db) as store:
        store.put(Peer("beta", config={"v": 1}, created_at="2020-01-01T00:00:00+00:00"))
        store.put(Peer("beta", config={"v": 2}, status="ok", created_at="2030-01-01T00:00:00+00:00"))
        got = store.get("beta")
        assert (got.config, got.status, got.created_at) == ({"v": 2}, "ok", "2020-01-01T00:00:00+00:00")
        assert len(store.all()) == 1


def test_set_status(db):
    with PeerStore(db) as store:
        store.put(Peer("beta"))
        store.set_status("beta", "unreachable", seen=False)
        got = store.get("beta")
        assert (got.status, got.last_seen) == ("unreachable", None)
        store.set_status("beta", "ok", seen=True)
        got = store.get("beta")
        assert got.status == "ok" and got.last_seen is not None and got.last_seen.startswith("20")
        store.set_status("nobody", "ok", seen=True)  # no row, no error, no new row
        assert [p.name for p in store.all()] == ["beta"]


def test_set_status_records_features_and_keeps_the_rest_of_the_config(db):
    with PeerStore(db) as store:
        store.put(Peer("beta", config={"host": "h", "port": 22, "features": ["old"]}))
        # Another process changes the config meanwhile: one statement, nothing of it lost.
        with PeerStore(db) as other:
            peer = other.get("beta")
            peer.config["host_key"] = "ssh-ed25519 AAAA"
            other.put(peer)
        store.set_status("beta", "ok", seen=True, features=["rsync", "zstd"])
        assert store.get("beta").config == {"host": "h", "port": 22, "host_key": "ssh-ed25519 AAAA",
                                             "features": ["rsync", "zstd"]}
        store.set_status("beta", "ok", seen=True, features=[])
        assert store.get("beta").config["features"] == []
        store.set_status("beta", "unreachable", seen=False)  # no features: left as they were
        assert store.get("beta").config["features"] == []
        store.set_status("nobody", "ok", seen=True, features=["rsync"])
        assert [p.name for p in store.all()] == ["beta"]


def test_set_statuses_records_every_outcome_in_one_transaction(db):
    with PeerStore(db) as store:
        for name in ("a", "b", "c"):
            store.put(Peer(name))
        changes: list[int] = []
        store.db.set_trace_callback(lambda sql: changes.append(1) if sql.startswith("COMMIT") else None)
        store.set_statuses([("a", "ok", True, ["rsync"]), ("b", "unreachable", False, None),
                            ("gone", "ok", True, ["zstd"]), ("c", "refused", False, None)])
        assert len(changes) == 1
        got = {p.name: (p.status, p.last_seen is not None, p.config.get("features")) for p in store.all()}
        assert got == {"a": ("ok", True, ["rsync"]), "b": ("unreachable", False, None),
                       "c": ("refused", False, None)}


def test_to_json_flattens_config():
    peer = Peer("beta", config={"host": "h", "port": 2}, created_at="t")
    assert peer.to_json() == {"name": "beta", "kind": KIND_DIRECT, "host": "h", "port": 2, "status": "new",
                              "last_seen": None, "created_at": "t", "permissions": DEFAULT_PERMISSIONS,
                              "expires_at": None}


def test_a_version_1_database_is_migrated_keeping_its_peers(db):
    # The schema as the first release wrote it, with one peer in it.
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.executescript("""
            CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
            INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00+00:00');
            CREATE TABLE peers (name TEXT PRIMARY KEY, kind TEXT NOT NULL, config_json TEXT NOT NULL,
                                status TEXT NOT NULL DEFAULT 'new', last_seen TEXT, created_at TEXT NOT NULL);
            INSERT INTO peers VALUES ('old', 'direct-ssh-direct', '{"host": "h"}', 'ok', 'x', 'y');
        """)
    with PeerStore(db) as store:
        assert store.schema_version() == 2
        old = store.get("old")
    assert (old.config, old.status, old.last_seen, old.created_at) == ({"host": "h"}, "ok", "x", "y")
    assert old.permissions == DEFAULT_PERMISSIONS and old.expires_at is None
    assert _versions(db) == [1, 2]


def test_permissions_and_expiry_round_trip(db):
    peer = Peer("beta", permissions={**DEFAULT_PERMISSIONS, "apps": ["wiki"], "deny_apps": ["x"], "push": True},
                expires_at="2027-01-31T00:00:00+00:00")
    with PeerStore(db) as store:
        store.put(peer)
        got = store.get("beta")
    assert got.permissions == peer.permissions and got.expires_at == peer.expires_at
    assert got.may_see("wiki") and not got.may_see("blog") and not got.may_see("x") and got.may_push
    assert not got.expired(datetime(2027, 1, 30, 23, 59, tzinfo=timezone.utc))
    assert got.expired(datetime(2027, 1, 31, 0, 0, tzinfo=timezone.utc))


def test_default_permissions_see_everything_and_never_push():
    peer = Peer("beta")
    assert peer.may_see("anything") and not peer.may_push and not peer.expired()
    peer.permissions["deny_apps"] = ["secret"]
    assert not peer.may_see("secret") and peer.may_see("other")


@pytest.mark.parametrize("dirname", ["state", "a#b", "c?d", "e%20f", "sp ace"])
def test_readonly_open_of_missing_db_raises_and_creates_nothing(tmp_path, dirname):
    d = tmp_path / "ro" / dirname
    d.mkdir(parents=True)
    with pytest.raises(StateError):
        PeerStore(d / "peers.db", readonly=True)
    assert os.listdir(tmp_path / "ro") == [dirname]
    assert os.listdir(d) == []


@pytest.mark.parametrize("dirname", ["state", "a#b", "c?d", "e%20f"])
def test_readonly_open_reads_and_cannot_write(tmp_path, dirname):
    path = tmp_path / dirname / "peers.db"
    with PeerStore(path) as store:
        store.put(Peer("beta"))
    before = path.read_bytes()
    with PeerStore(path, readonly=True) as store:
        assert store.get("beta").name == "beta"
        with pytest.raises(StateError, match="readonly database"):
            store.put(Peer("gamma"))
    assert path.read_bytes() == before


def test_readonly_open_does_not_migrate(tmp_path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # an existing, empty database
    with PeerStore(path, readonly=True) as store:
        with pytest.raises(StateError, match="no such table"):
            store.schema_version()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_a_read_that_finds_the_file_locked_raises_busy_after_its_timeout(tmp_path):
    import sqlite3

    from peerkit.errors import Busy

    path = tmp_path / "peers.db"
    PeerStore(path).close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        with PeerStore(path, readonly=True, timeout=0) as store, pytest.raises(Busy):
            store.get("beta")
    finally:
        writer.close()
    with PeerStore(path, readonly=True, timeout=0) as store:
        assert store.get("beta") is None


def test_every_use_of_a_file_another_process_holds_raises_busy_and_damage_raises_state_error(tmp_path):
    """Not SQLite's raw errors: the CLI maps these to `busy` (exit 15) and `bad-state` (exit 12)."""
    from peerkit.errors import Busy

    path = tmp_path / "peers.db"
    with PeerStore(path) as store:
        store.put(Peer("beta"))
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Busy):
            PeerStore(path, timeout=0)  # its migration check takes the write lock
        with PeerStore(path, readonly=True, timeout=0) as store:
            for read in (lambda: store.get("beta"), store.all, store.schema_version):
                with pytest.raises(Busy):
                    read()
            for write in (lambda: store.put(Peer("gamma")), lambda: store.delete("beta"),
                          lambda: store.set_status("beta", "ok", seen=True)):
                with pytest.raises((Busy, StateError)):  # read-only or locked: never raw
                    write()
    finally:
        writer.close()
    # Writes through a writable store that finds the file held: Busy, and nothing half-done.
    with PeerStore(path, timeout=0) as store:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM peers").fetchall()  # a shared lock: writers cannot commit
        try:
            for write in (lambda: store.put(Peer("gamma")), lambda: store.delete("beta"),
                          lambda: store.set_statuses([("beta", "ok", True, ["rsync"])])):
                with pytest.raises(Busy):
                    write()
        finally:
            reader.close()
        assert [p.name for p in store.all()] == ["beta"] and store.get("beta").status == "new"
    path.write_bytes(b"not a database\n" * 512)
    with pytest.raises(StateError, match="not a database"):
        with PeerStore(path, readonly=True) as store:
            store.get("beta")
