"""The trust lifecycle through a real SSH server: verify, deny/allow, revoke, expiry, from=, rotation.

This module brings its own world (a module-scoped fixture): six throwaway
users, one peerkit instance per user, driven through the real CLI as that
user, and the server peers reach them through.  Like the other integration
modules it runs once per server kind (conftest.py): one private OpenSSH
sshd that lets exactly these users in (id ``sshd``), or each instance's own
`peerkit serve` running as its owner (id ``serve``).  Where sshd's log
proves that sshd refused a key before peer-shell ran, the serve run checks
peerkit-serve's auth refusal in the audit log instead, with its reason.

* A <-> B: paired both ways; the pair that pulls, verifies and rotates.
* C: paired on A (A holds a row for C, which the rotation finds unreachable);
  C is also the server for D (revocation), E (expiry) and F (from=).

The tests run in file order and build on each other only where it says so:
the rotations run last because they change A's and B's keys.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from peerkit.errors import BadPermission, NoSuchApp, PeerRefused
from peerkit.token import parse_token
from peerkit.verify import fingerprint_groups
from tests.support import sshd as harness
from tests.support import ci

pytestmark = pytest.mark.integration

ROLES = ("a", "b", "c", "d", "e", "f")
CODE = re.compile(r"[0-9]{5}( [0-9]{5}){5}")
UTC = timezone.utc
# Run as an instance's owner: one SQL statement against its peers.db; prints the row count.
_SQL = ("import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1])\nwith db:\n"
        "    print(db.execute(sys.argv[2], sys.argv[3:]).rowcount)\n")


def unavailable(reason: str) -> None:
    ci.unavailable("integration tests (root and OpenSSH)", reason)


@dataclass
class World:
    root: Path
    kind: str  # "sshd" or "serve"
    inst: dict[str, harness.PeerkitInstance]
    pair_codes: dict[str, str]  # "a": the code `peerkit pair` printed on A (about B), "b": on B

    def __getattr__(self, role: str) -> harness.PeerkitInstance:
        try:
            return self.inst[role]
        except KeyError:
            raise AttributeError(role) from None


@pytest.fixture(scope="module")
def world(server_kind):
    problems = harness.missing_prerequisites()
    if problems:
        unavailable("; ".join(problems))
    bin_dir = harness.venv_bin()
    missing = [n for n in ("peerkit", "peer-shell") if not (bin_dir / n).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found in {bin_dir}: pip install -e . into the test venv",
                    pytrace=False)
    root = harness.make_root("peerkit-lifecycle-")
    users: dict[str, harness.ThrowawayUser] = {}
    server = None
    embedded: list[harness.EmbeddedServer] = []
    try:
        for role in ROLES:
            users[role] = harness.ThrowawayUser.create(root)
        problem = harness.check_runs_as(users["a"], bin_dir / "peer-shell")
        if problem:
            pytest.fail(problem, pytrace=False)
        if server_kind == "sshd":
            server = harness.Sshd(root / "sshd", [u.name for u in users.values()])
            server.start()
            servers = {role: server for role in ROLES}
        else:
            servers = {role: harness.EmbeddedServer(root / "serve", users[role], bin_dir=bin_dir,
                                                    known_hosts_path=root / "serve" / "known_hosts")
                       for role in ROLES}
            embedded = list(servers.values())
        inst = {role: harness.PeerkitInstance(users[role], f"site-{role}", servers[role], bin_dir).init()
                for role in ROLES}
        a, b, c = inst["a"], inst["b"], inst["c"]
        codes = {"a": a.pair(b.token())["verification_code"], "b": b.pair(a.token())["verification_code"]}
        a.pair(c.token())
        for role in ("d", "f"):
            c.pair(inst[role].token())
        # A's apps, made by A's owner.
        a.user.run(["mkdir", "-p", str(a.apps_dir / "wiki"), str(a.apps_dir / "blog")], check=True)
        a.user.write_file(a.apps_dir / "wiki" / "README", b"the wiki\n" * 300, mode=0o644)
        a.user.write_file(a.apps_dir / "blog" / "index.html", b"<h1>blog</h1>\n", mode=0o644)
        yield World(root, server_kind, inst, codes)
    finally:
        if server is not None:
            server.stop()
        for one in embedded:
            one.stop()
        errors = []
        for user in users.values():
            try:
                user.delete()
            except harness.HarnessError as exc:
                errors.append(str(exc))
        shutil.rmtree(root, ignore_errors=True)
        if errors:
            raise harness.HarnessError("; ".join(errors))


# -- helpers ---------------------------------------------------------------------

def ok_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(b"\n") == 1, proc.stdout
    return json.loads(proc.stdout)


def assert_refused(proc: subprocess.CompletedProcess, code: str, exit_code: int) -> None:
    assert proc.stdout == b"", proc.stdout[:200]
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == {"ok": False, "error": code}, proc.stderr
    assert proc.returncode == exit_code, proc.stderr


def assert_denied_by_server(proc: subprocess.CompletedProcess) -> None:
    """The server refused the key: no login at all (sshd, or peerkit-serve)."""
    assert proc.returncode == 255, proc.stderr
    assert proc.stdout == b""
    assert b"Permission denied (publickey)" in proc.stderr


def key_lines(inst: harness.PeerkitInstance, peer: str) -> list[str]:
    return [line for line in inst.authorized_keys.read_text(encoding="utf-8").splitlines()
            if line.endswith(f" peerkit:{peer}")]


def sql(inst: harness.PeerkitInstance, statement: str, *params: str) -> int:
    """Run one SQL statement on ``inst``'s peers.db as its owner (so the file stays theirs)."""
    proc = inst.user.run([sys.executable, "-c", _SQL, str(inst.db_path), statement, *params],
                         check=True, text=True)
    return int(proc.stdout.strip())


def ssh_with_key(user_of: harness.PeerkitInstance, key: Path, target: harness.PeerkitInstance,
                 *command: str) -> subprocess.CompletedProcess:
    """`ssh` as ``user_of``'s owner, but with private key ``key`` (e.g. a retired identity)."""
    argv = ["ssh", *harness.ssh_options(key, target.sshd.known_hosts_path), "-p", str(target.sshd.port),
            f"{target.user.name}@{target.sshd.host}", *command]
    return user_of.user.run(argv, timeout=30)


def new_events(inst: harness.PeerkitInstance, before: int) -> list[dict]:
    """peer-shell's audit lines after the first ``before`` lines (not peerkit-serve's own)."""
    return [e for e in inst.audit_events()[before:] if "server" not in e]


def serve_refusals(inst: harness.PeerkitInstance, before: int) -> set[tuple[str, str, str]]:
    """(verb, outcome, reason) of peerkit-serve's own audit lines after the first ``before`` lines."""
    return {(e["verb"], e["outcome"], e["reason"]) for e in inst.audit_events()[before:]
            if e.get("server") == "peerkit-serve"}


def refused_by_serve(inst: harness.PeerkitInstance, before: int, reason: str) -> None:
    """Under serve: the only thing peerkit-serve logged since ``before`` is an auth refusal for ``reason``."""
    assert serve_refusals(inst, before) == {("auth", "refused", reason)}, inst.audit_events()[before:]


def render_line(inst: harness.PeerkitInstance, peer_name: str, monkeypatch, *, as_written: bool = True,
                **changes) -> str:
    """Return ``peer_name``'s key line as peerkit.pairing.peer_line renders it, with ``changes`` to the row."""
    from peerkit.config import read_config
    from peerkit.pairing import peer_line
    from peerkit.state import PeerStore

    with monkeypatch.context() as m:
        m.setenv("HOME", str(inst.user.home))  # the config's ~ paths are the owner's
        cfg = read_config(inst.config_path)
    with PeerStore(inst.db_path, readonly=True) as store:
        row = store.get(peer_name)
    if as_written:
        # The rendering reproduces the line pairing wrote, so an edited one differs only by the change.
        [current] = key_lines(inst, peer_name)
        assert peer_line(cfg, row) == current
    return peer_line(cfg, row.replace(**changes))


def replace_key_line(inst: harness.PeerkitInstance, peer_name: str, line: str) -> None:
    [old] = key_lines(inst, peer_name)
    data = inst.authorized_keys.read_bytes()
    assert data.count(old.encode()) == 1
    inst.user.write_file(inst.authorized_keys, data.replace(old.encode(), line.encode()), mode=0o600)


# -- g. verification code ------------------------------------------------------------

def test_verification_code_is_the_same_on_both_sides(world):
    a, b = world.a, world.b
    on_a = a.cli("verify", "site-b")[1]
    on_b = b.cli("verify", "site-a")[1]
    assert CODE.fullmatch(on_a["verification_code"])
    assert on_a["verification_code"] == on_b["verification_code"] == world.pair_codes["a"] == world.pair_codes["b"]
    assert on_a["our_fingerprint"] == on_b["peer_fingerprint"]
    assert on_b["our_fingerprint"] == on_a["peer_fingerprint"]
    # A third party shares a different code with A.
    assert a.cli("verify", "site-c")[1]["verification_code"] != on_a["verification_code"]
    # Human output: the code first; `peerkit token` shows our half on stderr.
    proc = a.user.run([str(a.peerkit), "verify", "site-b"], env=a.user.env(extra_path=[a.bin_dir]), text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == on_a["verification_code"]
    proc, result = a.cli("token")
    assert fingerprint_groups(on_a["our_fingerprint"]) in proc.stderr
    assert fingerprint_groups(on_a["our_fingerprint"]) not in proc.stdout


# -- a. deny / allow an app ------------------------------------------------------------

def test_denied_app_is_invisible_and_cannot_be_pulled(world):
    a, b = world.a, world.b
    assert [x["slug"] for x in b.cli("apps", "site-a")[1]["apps"]] == ["blog", "wiki"]

    a.cli("deny", "site-b", "--app", "wiki")
    [row] = [p for p in a.peers() if p["name"] == "site-b"]
    assert row["permissions"]["deny_apps"] == ["wiki"]
    assert [x["slug"] for x in b.cli("apps", "site-a")[1]["apps"]] == ["blog"]
    assert [x["slug"] for x in ok_json(b.ssh(a, "list-apps"))["apps"]] == ["blog"]

    before = len(a.audit_events())
    denied = b.ssh(a, "stream-app wiki")
    assert_refused(denied, "no-such-app", NoSuchApp.exit_code)
    # Exactly what a missing app looks like: the denial leaks no existence.
    missing = b.ssh(a, "stream-app nothing-here")
    assert (denied.returncode, denied.stdout, denied.stderr) == (missing.returncode, missing.stdout, missing.stderr)
    event, missing_event = new_events(a, before)
    assert (event["peer"], event["verb"], event["slug"], event["outcome"]) == ("site-b", "stream-app", "wiki",
                                                                            "no-such-app")
    # Only the local audit log tells the two apart.
    assert missing_event["outcome"] == "no-such-app" and event["reason"] != missing_event["reason"]

    proc, result = b.cli("pull", "site-a", "wiki", "--no-pre-backup", check=False)
    assert proc.returncode == NoSuchApp.exit_code, proc.stderr
    assert result["error"] == "no-such-app"
    assert not (b.apps_dir / "wiki").exists()
    # Other apps still work.
    b.cli("pull", "site-a", "blog", "--no-pre-backup")
    assert (b.apps_dir / "blog" / "index.html").read_bytes() == b"<h1>blog</h1>\n"

    a.cli("allow", "site-b", "--app", "wiki")
    assert [x["slug"] for x in b.cli("apps", "site-a")[1]["apps"]] == ["blog", "wiki"]
    b.cli("pull", "site-a", "wiki", "--no-pre-backup")
    assert (b.apps_dir / "wiki" / "README").read_bytes() == b"the wiki\n" * 300


# -- f. push permission ----------------------------------------------------------------

def test_receive_app_is_refused_without_push_permission(world):
    # The push test proper arrives with the receive-app verb (a later issue):
    # it must then show that a peer with `peerkit allow PEER --push` can push
    # and one without cannot.  Until then this only pins the refusal: without
    # push permission (the default) `receive-app` is refused, whether as an
    # unknown verb (before receive-app exists) or for lack of permission.
    a, b = world.a, world.b
    [row] = [p for p in a.peers() if p["name"] == "site-b"]
    assert row["permissions"]["push"] is False
    before = len(a.audit_events())
    proc = b.ssh(a, "receive-app x")
    assert proc.returncode != 0 and proc.stdout == b""
    assert json.loads(proc.stderr.decode().splitlines()[-1]) == {"ok": False, "error": "refused"}
    [event] = new_events(a, before)
    assert event["peer"] == "site-b" and event["outcome"] == "refused"


# -- b. revocation -------------------------------------------------------------------

def test_revoked_peer_is_refused_even_on_an_open_connection(world):
    import asyncssh

    c, d = world.c, world.d
    server = c.server
    key = asyncssh.read_private_key(str(d.identity))
    options = dict(port=server.port, username=c.user.name, client_keys=[key],
                   known_hosts=str(server.known_hosts_path), agent_path=None, config=[], connect_timeout=10)
    before = len(c.audit_events())

    async def scenario() -> None:
        async with asyncssh.connect(server.host, **options) as conn:
            result = await conn.run("ping", check=False)
            assert result.exit_status == 0 and json.loads(result.stdout)["peer"] == "site-c"
            unpaired = await asyncio.to_thread(c.unpair, "site-d")
            assert (unpaired["key_removed"], unpaired["row_removed"]) == (True, True)
            # Same connection, already authenticated: peer-shell says no.
            result = await conn.run("ping", check=False)
            assert (result.exit_status, result.stdout) == (PeerRefused.exit_code, "")
            assert json.loads(result.stderr) == {"ok": False, "error": "refused"}
            result = await conn.run("list-apps", check=False)
            assert result.exit_status == PeerRefused.exit_code and result.stdout == ""
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(server.host, **options)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    events = new_events(c, before)
    assert [(e["peer"], e["verb"], e["outcome"]) for e in events] == [
        ("site-d", "ping", "ok"), ("site-d", "ping", "refused"), ("site-d", "list-apps", "refused")]
    assert "not paired" in events[1]["reason"]
    assert_denied_by_server(d.ssh(c, "ping"))
    assert len(new_events(c, before)) == 3
    if world.kind == "sshd":
        assert len(c.audit_events()) == before + 3
    else:
        # Both new connections were refused by serve itself: the key has no line.
        refused_by_serve(c, before, "key not authorized")


# -- c. expiry ----------------------------------------------------------------------

def test_expiry_is_enforced_by_the_server_and_by_peer_shell(world, monkeypatch):
    c, e = world.c, world.e
    server = c.server
    started = datetime.now(UTC)
    result = c.pair(e.token(), "--ttl", "1h")
    expires = datetime.fromisoformat(result["peer"]["expires_at"])
    assert timedelta(minutes=59) < expires - started <= timedelta(hours=1, seconds=5)
    [line] = key_lines(c, "site-e")
    assert f',expiry-time="{expires.astimezone(UTC).strftime("%Y%m%d%H%M%S")}Z",' in line
    [row] = [p for p in c.peers() if p["name"] == "site-e"]
    assert row["expires_at"] == result["peer"]["expires_at"]
    assert ok_json(e.ssh(c, "ping"))["peer"] == "site-c"

    # 1. The server (sshd or serve): the key line says it expired an hour ago.
    past = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    expired_line = render_line(c, "site-e", monkeypatch, expires_at=past.isoformat())
    assert f'expiry-time="{past.strftime("%Y%m%d%H%M%S")}Z"' in expired_line
    replace_key_line(c, "site-e", expired_line)
    before, offset = len(c.audit_events()), server.log_offset()
    assert_denied_by_server(e.ssh(c, "ping"))
    assert new_events(c, before) == []  # peer-shell never ran
    if world.kind == "sshd":
        assert f"Accepted publickey for {c.user.name}" not in server.log_since(offset)
        assert len(c.audit_events()) == before
    else:
        refused_by_serve(c, before, "key expired (expiry-time=)")
    before = len(c.audit_events())

    # 2. peer-shell: no expiry-time in the line, but the record has expired.
    replace_key_line(c, "site-e", render_line(c, "site-e", monkeypatch, as_written=False, expires_at=None))
    assert "expiry-time" not in key_lines(c, "site-e")[0]
    assert sql(c, "UPDATE peers SET expires_at = ? WHERE name = ?", past.isoformat(), "site-e") == 1
    offset = server.log_offset()
    assert_refused(e.ssh(c, "ping"), "refused", PeerRefused.exit_code)
    if world.kind == "sshd":
        assert f"Accepted publickey for {c.user.name}" in server.log_since(offset)
    else:
        assert serve_refusals(c, before) == set()  # serve let the key in
    [event] = new_events(c, before)
    assert (event["peer"], event["verb"], event["outcome"]) == ("site-e", "ping", "refused")
    assert "expired" in event["reason"]


# -- e. from= ---------------------------------------------------------------------

def test_from_restricts_the_source_address(world):
    import asyncssh

    c, f = world.c, world.f
    server = c.server
    assert ok_json(f.ssh(c, "ping"))["peer"] == "site-c"

    c.cli("allow", "site-f", "--from", "127.0.0.2")
    [line] = key_lines(c, "site-f")
    assert line.startswith('restrict,from="127.0.0.2",command="')
    before = len(c.audit_events())
    assert_denied_by_server(f.ssh(c, "ping"))  # from 127.0.0.1
    assert new_events(c, before) == []
    if world.kind == "serve":
        refused_by_serve(c, before, "source address not allowed by from=")
        assert {e["client"] for e in c.audit_events()[before:]} == {"127.0.0.1"}
    else:
        assert len(c.audit_events()) == before
    before = len(c.audit_events())
    assert ok_json(f.ssh(c, "ping", options=["-b", "127.0.0.2"]))["peer"] == "site-c"
    [event] = new_events(c, before)
    assert (event["peer"], event["client"], event["outcome"]) == ("site-f", "127.0.0.2", "ok")

    # The library client from an allowed address too.
    async def from_allowed() -> str:
        async with asyncssh.connect(server.host, port=server.port, username=c.user.name,
                                    client_keys=[asyncssh.read_private_key(str(f.identity))],
                                    known_hosts=str(server.known_hosts_path), agent_path=None, config=[],
                                    local_addr=("127.0.0.2", 0), connect_timeout=10) as conn:
            return (await conn.run("ping", check=True)).stdout

    assert json.loads(asyncio.run(asyncio.wait_for(from_allowed(), 30)))["peer"] == "site-c"

    # Withdrawing the only address would allow every source: refused, line unchanged.
    proc, result = c.cli("deny", "site-f", "--from", "127.0.0.2", check=False)
    assert proc.returncode == BadPermission.exit_code and result["error"] == "bad-permission"
    assert key_lines(c, "site-f") == [line]

    c.cli("allow", "site-f", "--from", "any")
    [lifted] = key_lines(c, "site-f")
    assert "from=" not in lifted and lifted == line.replace('from="127.0.0.2",', "")
    assert ok_json(f.ssh(c, "ping"))["peer"] == "site-c"


@pytest.mark.parametrize(("patterns", "allowed"), [
    ("127.0.0.0/8", True),
    ("127.0.0.1/32", True),
    # A block with host bits set voids the whole list (sshd: "inconsistent mask length").
    ("127.0.0.1/8", False),
    ("127.0.0.0/8,10.1.2.3/8", False),
])
def test_from_written_by_hand_is_read_as_sshd_reads_it(world, patterns, allowed):
    """A from= an operator wrote by hand: serve must decide exactly as sshd, whatever the list holds."""
    c, f = world.c, world.f
    [line] = key_lines(c, "site-f")
    assert "from=" not in line
    hand_made = line.replace("restrict,", f'restrict,from="{patterns}",', 1)
    original = c.authorized_keys.read_bytes()
    c.user.write_file(c.authorized_keys, original.replace(line.encode(), hand_made.encode()), mode=0o600)
    try:
        proc = f.ssh(c, "ping")
        if allowed:
            assert ok_json(proc)["peer"] == "site-c"
        else:
            assert_denied_by_server(proc)
    finally:
        c.user.write_file(c.authorized_keys, original, mode=0o600)


# -- d. key rotation (last: it changes A's and B's keys) -------------------------------------

def _codes(a: harness.PeerkitInstance, b: harness.PeerkitInstance) -> tuple[str, str]:
    return a.cli("verify", b.name)[1]["verification_code"], b.cli("verify", a.name)[1]["verification_code"]


def test_rotate_key(world):
    a, b = world.a, world.b
    code_before, code_b = _codes(a, b)
    assert code_before == code_b

    # C cannot be reached from A: its row points at a closed port.
    closed = harness.free_port()
    assert sql(a, "UPDATE peers SET config_json = json_set(config_json, '$.port', CAST(? AS INTEGER)) "
                  "WHERE name = ?", str(closed), "site-c") == 1
    # B's file holds other tools' lines around A's.
    other = world.root / "other-tool-key"
    harness.run_root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "admin@laptop", "-f", str(other)])
    other_line = other.with_name(other.name + ".pub").read_bytes().strip()
    original = b.authorized_keys.read_bytes()
    b.user.write_file(b.authorized_keys, b"# hand-made\r\n" + original + b"no-pty " + other_line, mode=0o600)
    b_before = b.authorized_keys.read_bytes().split(b"\n")

    def retire(x: harness.PeerkitInstance) -> Path:
        """Keep a copy of x's current private key, owned by x's owner."""
        retired = x.user.home / "retired-identity"
        x.user.run(["cp", "-p", str(x.identity), str(retired)], check=True)
        return retired

    def check_rotated(x: harness.PeerkitInstance, y: harness.PeerkitInstance, old_fp: str, new_fp: str,
                      token: str) -> None:
        assert old_fp != new_fp
        assert x.cli("verify", y.name)[1]["our_fingerprint"] == new_fp
        assert parse_token(token).fingerprint == new_fp and parse_token(token).name == x.name
        assert token == x.token()
        assert not x.identity.with_name(x.identity.name + ".next").exists()

    # A rotates (as an operator would, human output): B takes the new key,
    # C (unreachable) keeps the old one and is shown A's new token to re-pair.
    a_retired = retire(a)
    a_old_fp = a.cli("verify", "site-b")[1]["our_fingerprint"]
    proc = a.user.run([str(a.peerkit), "rotate-key"], env=a.user.env(extra_path=[a.bin_dir]), text=True)
    assert proc.returncode == 17, proc.stderr  # peers-behind: C still trusts the retired key
    lines = proc.stdout.splitlines()
    found = re.fullmatch(r"new key (SHA256:\S+) \(was (SHA256:\S+)\)", lines[0])
    assert found and found.group(2) == a_old_fp
    assert [line.split() for line in lines[1:3]] == [["site-b", "rotated"],
                                                     ["site-c", "kept-old-key", "(peer-unreachable)"]]
    assert lines[3].startswith("These peers still trust the retired key")
    found_token = re.fullmatch(r"  peerkit pair --replace '(lp-peer\|[^']+)' site-a", lines[4])
    assert found_token and len(lines) == 5
    assert "site-c: kept-old-key" in proc.stderr
    check_rotated(a, b, a_old_fp, found.group(1), found_token.group(1))

    a_new = a.identity.with_name(a.identity.name + ".pub").read_text().split()[1]
    b_after = b.authorized_keys.read_bytes().split(b"\n")
    [i] = [n for n, l in enumerate(b_after) if l.endswith(b" peerkit:site-a")]
    assert len(b_after) == len(b_before) and b_before[i].endswith(b" peerkit:site-a")
    assert [l for n, l in enumerate(b_after) if n != i] == [l for n, l in enumerate(b_before) if n != i]
    old_b64 = b_before[i].split(b" ")[-2]
    assert b_after[i] == b_before[i].replace(old_b64, a_new.encode())
    assert b.authorized_keys.stat().st_uid == b.user.uid

    assert a.cli("ping", "site-b")[1]["remote_name"] == "site-b"
    assert ok_json(a.ssh(b, "ping"))["peer"] == "site-b"
    assert_denied_by_server(ssh_with_key(a, a_retired, b, "ping"))
    assert ok_json(ssh_with_key(a, a.identity, b, "ping"))["peer"] == "site-b"
    code_mid, code_b = _codes(a, b)
    assert code_mid == code_b and code_mid != code_before and CODE.fullmatch(code_mid)

    # B rotates: A takes B's new key and refuses the old one.
    a_lines_before = a.authorized_keys.read_bytes().split(b"\n")
    b_retired = retire(b)
    b_old_fp = b.cli("verify", "site-a")[1]["our_fingerprint"]
    result = b.cli("rotate-key")[1]
    assert result["old_fingerprint"] == b_old_fp
    assert result["peers"] == [{"peer": "site-a", "outcome": "rotated"}]
    check_rotated(b, a, b_old_fp, result["new_fingerprint"], result["token"])
    a_lines_after = a.authorized_keys.read_bytes().split(b"\n")
    assert len([l for l in a_lines_after if l.endswith(b" peerkit:site-b")]) == 1
    assert [l for l in a_lines_after if not l.endswith(b" peerkit:site-b")] == \
        [l for l in a_lines_before if not l.endswith(b" peerkit:site-b")]
    assert b.cli("ping", "site-a")[1]["remote_name"] == "site-a"
    assert ok_json(b.ssh(a, "ping"))["peer"] == "site-a"
    assert_denied_by_server(ssh_with_key(b, b_retired, a, "ping"))
    code_end, code_a_side = _codes(a, b)
    assert code_end == code_a_side and code_end not in (code_before, code_mid)
    # What A granted B survives both rotations.
    assert [x["slug"] for x in b.cli("apps", "site-a")[1]["apps"]] == ["blog", "wiki"]


def test_rotation_resumes_after_an_interruption(world):
    """A rotation cut short after B took the new key: the rerun must keep that key, not lock B out."""
    a, b = world.a, world.b
    next_key = a.identity.with_name(a.identity.name + ".next")
    a.user.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "peerkit:site-a", "-f", str(next_key)],
               check=True)
    next_b64 = next_key.with_name(next_key.name + ".pub").read_text().split()[1]
    # What the interrupted run had done: B swapped A's key for the next one.
    reply = ok_json(a.ssh(b, f"replace-key {next_b64}"))
    assert reply["ok"] is True
    assert_denied_by_server(a.ssh(b, "ping"))  # A's current key is no longer B's

    proc, result = a.cli("rotate-key", check=False)
    assert proc.returncode == 17 and result["ok"] is False and result["error"] == "peers-behind"
    outcomes = {p["peer"]: p["outcome"] for p in result["peers"]}
    assert outcomes == {"site-b": "rotated", "site-c": "kept-old-key"}
    assert a.identity.with_name(a.identity.name + ".pub").read_text().split()[1] == next_b64
    assert a.cli("ping", "site-b")[1]["remote_name"] == "site-b"
    [line] = key_lines(b, "site-a")
    assert next_b64 in line
    code_a, code_b = _codes(a, b)
    assert code_a == code_b
