"""Transfers beyond the plain pull, through a real OpenSSH sshd: push, incremental rsync, zstd, stream hooks.

This module brings its own world (a module-scoped fixture): three throwaway
users, one private sshd that lets exactly them in, and one peerkit instance
per user, driven through the real CLI as that user.

* A (``site-a``, domain a.example.net) is the source of pulls and the
  receiver of pushes.  Its stop/start hooks log to ``hooks.log`` (with the
  app's VERSION file), and its start hook fails on an app whose VERSION is
  ``broken``.
* B (``site-b``, domain b.example.org) pulls from A and pushes to A; paired
  both ways.
* C (``site-c``) pulls from A through a stand-in forced command that acts
  as an older peer-shell: its ``ping`` reply hides "rsync", "app-info" and
  "with-app-info" from the features and it refuses ``app-info`` and
  ``with-app-info``, to see the fallbacks (a full transfer; ping and
  list-apps).  With ``<log>.rsync`` present it acts as a peer-shell that has
  rsync and app-info but is older than ``with-app-info`` only.

The tests run in file order and build on each other only where they say so
(A grants B push in the first test; the big app made for the incremental
pull is reused by the hostile rsync requests).
"""

from __future__ import annotations

import copy
import io
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from peerkit.client import MAX_PACKET, WINDOW
from tests import tarcraft
from tests.support import sshd as harness
from tests.trees import build_mixed_tree, diff, snapshot
from tests.support import ci

pytestmark = pytest.mark.integration

ROLES = ("a", "b", "c")
DOMAIN = {"a": "a.example.net", "b": "b.example.org"}
MTIME = 1_650_000_000
TIMEOUT = 120
STAGING_PREFIX = ".peerkit-staging-"
ASIDE_PREFIX = ".peerkit-aside-"
EXIT = {"refused": 42, "no-such-app": 50, "bad-slug": 51, "transfer-incomplete": 52, "unsafe-archive": 53,
        "hook-failed": 55}
CAPS = "e.iLsfxCIvu"


def unavailable(reason: str) -> None:
    ci.unavailable("integration tests (root, OpenSSH, rsync and zstd)", reason)


# -- the world -------------------------------------------------------------------------

_HOOK = r'''#!/bin/sh
# stop/start hooks of A: log "<hook> <app> <VERSION>"; start fails on an app marked broken.
version=$(cat "$PEERKIT_APP_DIR/VERSION" 2>/dev/null)
echo "$1 $PEERKIT_APP $version" >> @LOG@
if [ "$1" = start ] && [ "$version" = broken ]; then
    echo "refusing to start a broken app" >&2
    exit 1
fi
exit 0
'''

_STREAM_HOOK = r'''#!/bin/sh
# pre_stream/post_stream hooks of A: log "<hook> <app> <peer>"; "pre-fail" fails.
echo "$1 $PEERKIT_APP $PEERKIT_PEER" >> @LOG@
[ "$1" = pre-fail ] && { echo "cannot quiesce the database" >&2; exit 3; }
exit 0
'''

# A's forced command for C: the real peer-shell, except that the replies to
# "ping" (and app-info) do not list rsync, app-info or with-app-info among
# the features, and app-info and with-app-info are refused as peer-shell
# refuses an unknown verb (like an older peer-shell).  With @LOG@.rsync
# present, only with-app-info is hidden and refused.
_STANDIN = r'''#!/bin/sh
printf '%s\n' "$SSH_ORIGINAL_COMMAND" >> @LOG@
older() { [ ! -e @LOG@.rsync ]; }
refuse() { echo '{"ok": false, "error": "refused"}' >&2; exit 42; }
hide() {
    sed -e 's/, "with-app-info"//' -e 's/"with-app-info", //' |
        if older; then sed -e 's/"app-info", //' -e 's/, "rsync"//' -e 's/"rsync", //'; else cat; fi
}
case "$SSH_ORIGINAL_COMMAND" in
with-app-info*)
    refuse ;;
app-info*)
    older && refuse
    out=$(@PEER_SHELL@ "$@") || exit $?
    printf '%s\n' "$out" | hide
    exit 0 ;;
ping)
    out=$(@PEER_SHELL@ "$@") || exit $?
    printf '%s\n' "$out" | hide
    exit 0 ;;
esac
exec @PEER_SHELL@ "$@"
'''


@dataclass
class World:
    root: Path
    sshd: harness.Sshd
    inst: dict[str, harness.PeerkitInstance]
    baseline: dict[str, dict] = field(default_factory=dict)

    def __getattr__(self, role: str) -> harness.PeerkitInstance:
        try:
            return self.inst[role]
        except KeyError:
            raise AttributeError(role) from None

    @property
    def hook_log(self) -> Path:
        return self.inst["a"].user.home / "hooks.log"

    @property
    def stream_log(self) -> Path:
        return self.inst["a"].user.home / "stream.log"

    @property
    def stream_hook(self) -> Path:
        return self.inst["a"].user.home / "stream-hook.sh"

    @property
    def standin(self) -> Path:
        return self.inst["a"].user.home / "peer-shell-standin"

    @property
    def standin_log(self) -> Path:
        """The commands C sent to the stand-in, one per line."""
        return self.inst["a"].user.home / "standin.log"


def install_standin(world: World) -> None:
    """Make A's key line for C run the stand-in (see _STANDIN); `peerkit allow/deny` rewrites the line."""
    a, c = world.a, world.c
    lines = a.authorized_keys.read_text().splitlines()
    [n] = [k for k, line in enumerate(lines) if line.endswith(f" peerkit:{c.name}")]
    prefix = f'command="{a.peer_shell} '
    if f'command="{world.standin} ' in lines[n]:
        return
    assert lines[n].startswith("restrict,") and prefix in lines[n], lines[n]
    lines[n] = lines[n].replace(prefix, f'command="{world.standin} ', 1)
    a.user.write_file(a.authorized_keys, ("\n".join(lines) + "\n").encode(), mode=0o600)


def write_config(world: World, role: str, **sections: Any) -> None:
    """Write the instance's baseline config with ``sections`` merged in (one level deep)."""
    inst = world.inst[role]
    data = copy.deepcopy(world.baseline[role])
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    text = "# peerkit test configuration (test_transfers)\n" + yaml.safe_dump(data, sort_keys=False)
    inst.user.write_file(inst.config_path, text.encode("utf-8"), mode=0o600)


@pytest.fixture(scope="module")
def world():
    problems = harness.missing_prerequisites()
    for tool in ("rsync", "zstd", "sed"):
        if shutil.which(tool, path="/usr/local/bin:/usr/bin:/bin") is None:
            problems.append(f"{tool} not found")
    if problems:
        unavailable("; ".join(problems))
    bin_dir = harness.venv_bin()
    missing = [n for n in ("peerkit", "peer-shell") if not (bin_dir / n).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found in {bin_dir}: pip install -e . into the test venv",
                    pytrace=False)
    root = harness.make_root("peerkit-transfers-")
    users: dict[str, harness.ThrowawayUser] = {}
    server = None
    try:
        for role in ROLES:
            users[role] = harness.ThrowawayUser.create(root)
        problem = harness.check_runs_as(users["a"], bin_dir / "peer-shell")
        if problem:
            pytest.fail(problem, pytrace=False)
        # DEBUG2: sshd logs each channel's window and packet size (the flow control test).
        server = harness.Sshd(root / "sshd", [u.name for u in users.values()], log_level="DEBUG2")
        server.start()
        inst = {role: harness.PeerkitInstance(users[role], f"site-{role}", server, bin_dir).init()
                for role in ROLES}
        w = World(root, server, inst)
        a, b, c = inst["a"], inst["b"], inst["c"]
        harness.pair_both_ways(a, b)
        a.pair(c.token())
        c.pair(a.token())
        # A's hooks, and every config's baseline.
        hook = a.user.home / "hook.sh"
        a.user.write_file(hook, _HOOK.replace("@LOG@", str(w.hook_log)).encode(), mode=0o755)
        a.user.write_file(w.stream_hook, _STREAM_HOOK.replace("@LOG@", str(w.stream_log)).encode(), mode=0o755)
        for role, i in inst.items():
            w.baseline[role] = copy.deepcopy(i.settings)
            # No docker compose guesses: explicit hooks (or none) everywhere.
            w.baseline[role]["hooks"].update(stop=[], start=[])
        w.baseline["a"]["hooks"].update(stop=[str(hook), "stop"], start=[str(hook), "start"])
        w.baseline["a"]["domain"] = DOMAIN["a"]
        w.baseline["b"]["domain"] = DOMAIN["b"]
        for role in ROLES:
            write_config(w, role)
            assert inst[role].apps_dir.is_dir()  # made by init, owned by the user
        a.user.write_file(w.standin, _STANDIN.replace("@PEER_SHELL@", str(a.peer_shell))
                          .replace("@LOG@", str(w.standin_log)).encode(), mode=0o755)
        install_standin(w)
        yield w
    finally:
        if server is not None:
            server.stop()
        errors = []
        for user in users.values():
            try:
                user.delete()
            except harness.HarnessError as exc:
                errors.append(str(exc))
        shutil.rmtree(root, ignore_errors=True)
        if errors:
            raise harness.HarnessError("; ".join(errors))


# -- running the CLI -------------------------------------------------------------------------

@dataclass
class Run:
    returncode: int
    lines: list[dict]
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        assert self.lines, f"no JSON on stdout (exit {self.returncode}); stderr: {self.stderr}"
        return self.lines[-1]

    def stage_outcomes(self) -> dict[str, str]:
        return {s["name"]: s["outcome"] for s in self.result.get("stages", [])}

    def why(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"


def _parse_lines(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
    return out


def _argv(inst: harness.PeerkitInstance, *args: str) -> list[str]:
    return [str(inst.peerkit), *args, "--json"]


def peerkit(inst: harness.PeerkitInstance, *args: str, timeout: float = TIMEOUT) -> Run:
    """Run ``peerkit ARGS --json`` as the instance's owner."""
    proc = inst.user.run(_argv(inst, *args), env=inst.user.env(extra_path=[inst.bin_dir]), text=True,
                         timeout=timeout)
    return Run(proc.returncode, _parse_lines(proc.stdout), proc.stdout, proc.stderr)


def assert_ok(run: Run) -> dict:
    assert run.returncode == 0, run.why()
    result = run.result
    assert result.get("ok") is True and result.get("event") == "result", run.why()
    return result


def assert_failed(run: Run, code: str) -> dict:
    assert run.returncode == EXIT[code], run.why()
    result = run.result
    assert result.get("ok") is False and result.get("error") == code, run.why()
    return result


def remote_notes(result: dict) -> dict[str, str]:
    """The receiver's stages, from the push result's "peer: lock ok, ..." note."""
    [note] = [n for n in result["notes"] if n.startswith("peer: ")]
    return dict(part.rsplit(" ", 1) for part in note[len("peer: "):].split(", "))


# -- trees -------------------------------------------------------------------------

def as_owner(path: Path, user: harness.ThrowawayUser) -> None:
    """chown a tree (links themselves, not their targets) to ``user``."""
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(top, name), user.uid, user.gid, follow_symlinks=False)


def make_tree(path: Path, spec: dict[str, Any], user: harness.ThrowawayUser, mtime: int = MTIME) -> Path:
    """Create ``path`` from {relpath: bytes | None (dir) | ("link", target) | (bytes, mode)}, owned by user."""
    if os.path.lexists(path):
        shutil.rmtree(path)
    path.mkdir()
    for rel, what in spec.items():
        full = path / rel
        full.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            full.mkdir(exist_ok=True)
        elif isinstance(what, tuple) and what[0] == "link":
            os.symlink(what[1], full)
        else:
            data, mode = what if isinstance(what, tuple) else (what, 0o644)
            full.write_bytes(data)
            os.chmod(full, mode)
    as_owner(path, user)
    set_mtimes(path, mtime)
    os.chmod(path, 0o755)
    return path


def set_mtimes(path: Path, mtime: int) -> None:
    for top, dirs, files in os.walk(path, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (mtime, mtime), follow_symlinks=False)
    os.utime(path, (mtime, mtime))


def owned(snap: dict, user: harness.ThrowawayUser) -> dict:
    """The snapshot with every owner set to ``user``: what a non-root receiver makes of it."""
    return {rel: {**rec, "uid": user.uid, "gid": user.gid} for rel, rec in snap.items()}


def same_tree(source: Path, source_user: harness.ThrowawayUser, copy_: Path,
              copy_user: harness.ThrowawayUser, exclude: tuple[str, ...] = ()) -> list[str]:
    assert {source_user.uid} == {r["uid"] for r in snapshot(source).values()}
    return diff(owned(snapshot(source, exclude=exclude), copy_user), snapshot(copy_, exclude=exclude))


def inodes(path: Path) -> dict[str, int]:
    out = {}
    for top, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(top, name)
            out[os.path.relpath(full, path)] = os.lstat(full).st_ino
    return out


def leftovers(inst: harness.PeerkitInstance) -> list[str]:
    return sorted(n for n in os.listdir(inst.apps_dir) if n.startswith((STAGING_PREFIX, ASIDE_PREFIX)))


def backups(inst: harness.PeerkitInstance, app: str) -> list[str]:
    directory = inst._path(inst.settings["backups_dir"]) / app
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def audit_tail(inst: harness.PeerkitInstance, since: int) -> list[dict]:
    return inst.audit_events()[since:]


def hook_lines(world: World, app: str) -> list[str]:
    try:
        lines = world.hook_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.split()[1] == app]


def stream_lines(world: World, app: str) -> list[str]:
    try:
        lines = world.stream_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if line.split()[1] == app]


def big_app(path: Path, user: harness.ThrowawayUser, seed: int, blobs: int = 7, blob_mib: int = 8) -> Path:
    """``blobs`` random files of ``blob_mib`` MiB, eight 1 MiB chunks and 600 small files."""
    rng = random.Random(seed)
    spec: dict[str, Any] = {"VERSION": b"1\n", "data": None, "small": None}
    for i in range(blobs):
        spec[f"data/blob-{i}.bin"] = rng.randbytes(blob_mib << 20)
    for i in range(8):
        spec[f"data/chunk-{i}.bin"] = rng.randbytes(1 << 20)
    for i in range(600):
        spec[f"small/d{i % 6}/f{i:04d}.txt"] = (b"small file %d\n" % i) * rng.randrange(1, 40)
    spec["current"] = ("link", "data/chunk-0.bin")
    return make_tree(path, spec, user)


def change_app(path: Path, user: harness.ThrowawayUser, seed: int) -> tuple[str, str, str]:
    """Rewrite one 1 MiB file (new mtime), delete one file, add one; return their names."""
    rng = random.Random(seed)
    changed, deleted, added = "data/chunk-3.bin", "small/d1/f0001.txt", "small/d5/new-file.txt"
    (path / changed).write_bytes(rng.randbytes(1 << 20))
    os.utime(path / changed, (MTIME + 777, MTIME + 777))
    (path / deleted).unlink()
    (path / added).write_bytes(b"added after the first copy\n")
    as_owner(path, user)
    return changed, deleted, added


def keep_link(world: World, path: Path, name: str) -> Path:
    """A second hard link to ``path`` outside the apps, to see later whether its content was written."""
    keep = world.root / f"keep-{name}"
    if keep.exists():
        keep.unlink()
    os.link(path, keep)
    return keep


# -- a. push end to end ---------------------------------------------------------------------

def _push_source(b: harness.PeerkitInstance) -> Path:
    path = b.apps_dir / "pushapp"
    if os.path.lexists(path):
        shutil.rmtree(path)
    path.mkdir()
    build_mixed_tree(path, big_size=1 << 20, small_files=120, seed=7, other_owner=None)
    (path / ".env").write_text(f"APP_URL=https://cloud.{DOMAIN['b']}/\nMAIL=admin@{DOMAIN['b']}\n")
    os.utime(path / ".env", (MTIME, MTIME))
    as_owner(path, b.user)
    return path


def test_push_needs_permission_then_installs_by_the_receivers_rules(world):
    a, b = world.a, world.b
    source = _push_source(b)
    target = make_tree(a.apps_dir / "pushapp", {"old.txt": b"A's own copy\n", "VERSION": b"old\n"}, a.user)
    before_a, before_b = snapshot(target), snapshot(source)
    mark = len(a.audit_events())

    # Not granted: refused before anything is read or written.
    run = peerkit(b, "push", a.name, "pushapp")
    assert_failed(run, "refused")
    assert snapshot(target) == before_a and leftovers(a) == [] and backups(a, "pushapp") == []
    [event] = [e for e in audit_tail(a, mark) if e.get("verb") != "ping"]  # push pings first
    assert (event["peer"], event["verb"], event["slug"], event["outcome"]) == \
        ("site-b", "receive-app", "pushapp", "refused"), event
    assert "push" in event["reason"]

    peerkit(a, "allow", b.name, "--push")
    # Granted: B asks to skip the backup; A's config does not let it.
    mark = len(a.audit_events())
    run = peerkit(b, "push", a.name, "pushapp", "--no-pre-backup")
    result = assert_ok(run)
    # Everything but .env as B has it (the rewrite's atomic replace of .env touches the root's mtime).
    expected, got = owned(snapshot(source, exclude=(".env",)), a.user), snapshot(target, exclude=(".env",))
    assert expected.pop(".")["mtime"] <= got.pop(".")["mtime"]
    assert diff(expected, got) == []
    # The receiver rewrote B's domain to its own in .env.
    assert (target / ".env").read_text() == f"APP_URL=https://cloud.{DOMAIN['a']}/\nMAIL=admin@{DOMAIN['a']}\n"
    assert result["rewritten"] == [".env"]
    made = backups(a, "pushapp")
    assert len(made) == 1 and "-pre-push.tar." in made[0], made
    stages = remote_notes(result)
    assert stages["backup"] == "ok" and stages["swap"] == "ok" and stages["rewrite"] == "ok", stages
    assert leftovers(a) == [] and snapshot(source) == before_b  # the sender's app is only read
    [event] = [e for e in audit_tail(a, mark) if e["verb"] == "receive-app"]
    assert event["outcome"] == "ok" and event["bytes"] > 0
    assert hook_lines(world, "pushapp") == ["stop pushapp old", "start pushapp"]

    # With receive.sender_may_skip_backup, B's request is honoured; --keep-urls keeps B's domain.
    write_config(world, "a", receive={"sender_may_skip_backup": True})
    try:
        (source / "added.txt").write_bytes(b"second push\n")
        as_owner(source, b.user)
        result = assert_ok(peerkit(b, "push", a.name, "pushapp", "--no-pre-backup", "--keep-urls"))
    finally:
        write_config(world, "a")
    assert same_tree(source, b.user, target, a.user) == []
    assert DOMAIN["b"] in (target / ".env").read_text()
    assert backups(a, "pushapp") == made
    stages = remote_notes(result)
    assert stages["backup"] == "skipped" and stages["rewrite"] == "skipped", stages
    assert result["rewritten"] == [] and leftovers(a) == []


# -- b. push rollback -----------------------------------------------------------------------

def test_push_rolls_back_when_the_receivers_start_hook_fails(world):
    a, b = world.a, world.b
    peerkit(a, "allow", b.name, "--push")
    target = make_tree(a.apps_dir / "rollapp", {"VERSION": b"old\n", "data": None,
                                                "data/db.sqlite": os.urandom(50_000), ".env": b"X=1\n"}, a.user)
    make_tree(b.apps_dir / "rollapp", {"VERSION": b"broken\n", "data": None,
                                       "data/db.sqlite": os.urandom(70_000), "new.txt": b"new\n"}, b.user)
    before, before_inodes = snapshot(target), inodes(target)

    run = peerkit(b, "push", a.name, "rollapp")
    assert_failed(run, "hook-failed")
    # Byte for byte (and inode for inode) the app A had.
    assert diff(before, snapshot(target)) == []
    assert inodes(target) == before_inodes
    assert leftovers(a) == []
    # stop on the old app, start on the new one (fails), start again on the old one.
    assert hook_lines(world, "rollapp") == ["stop rollapp old", "start rollapp broken", "start rollapp old"]
    log = [json.loads(line) for line in (a.state_dir / "transfers.log").read_text().splitlines()]
    record = [r for r in log if r.get("kind") == "receive" and r.get("app") == "rollapp"][-1]
    assert record["ok"] is False and record["error"] == "hook-failed"
    assert [s["name"] for s in record["stages"]][-2:] == ["start", "rollback"]


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_push_of_an_app_we_cannot_read_whole_changes_nothing(world, compress):
    """tar skips an unreadable file, exits 2 and still ends the archive properly: that must not land."""
    a, b = world.a, world.b
    peerkit(a, "allow", b.name, "--push")
    slug = f"unreadable-{compress}"
    target = make_tree(a.apps_dir / slug, {"VERSION": b"old\n", "db.sqlite": b"A's database, keep me\n"}, a.user)
    source = make_tree(b.apps_dir / slug, {"VERSION": b"new!\n", "db.sqlite": b"B's database\n",
                                           "big.bin": os.urandom(300_000)}, b.user)
    os.chmod(source / "db.sqlite", 0)  # B's own user cannot read it
    before, mark = snapshot(target), len(a.audit_events())
    run = peerkit(b, "push", a.name, slug, "--compress", compress)
    assert run.returncode != 0 and run.result["ok"] is False, run.why()
    assert "reading our app failed" in run.result["message"], run.why()
    assert snapshot(target) == before and leftovers(a) == []
    assert hook_lines(world, slug) == []  # never stopped: nothing to swap in
    # A's peer-shell writes its audit line once the channel is gone.
    harness.wait_until(lambda: any(e["verb"] == "receive-app" for e in audit_tail(a, mark)), 10)
    [event] = [e for e in audit_tail(a, mark) if e["verb"] == "receive-app"]
    assert event["outcome"] == "transfer-incomplete", event


# -- c. hostile bytes straight into receive-app ------------------------------------------------

HOSTILE_PUSHES = ["dotdot_escape", "symlink_escape_write_through", "absolute_path", "hardlink_outside",
                  "char_device"]


def _raw_receive(world: World, data: bytes, *flags: str) -> subprocess.CompletedProcess:
    b, a = world.b, world.a
    return b.user.run(b.ssh_argv(a, "receive-app", "hostapp", *flags), input=data, timeout=60)


def _error_line(proc: subprocess.CompletedProcess) -> dict:
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert lines, proc
    return json.loads(lines[-1])


def test_hostile_archives_pushed_by_hand_change_nothing(world):
    a = world.a
    peerkit(a, "allow", world.b.name, "--push")
    target = make_tree(a.apps_dir / "hostapp", {"VERSION": b"kept\n", "conf": None, "conf/a.ini": b"a=1\n"},
                       a.user)
    before = snapshot(target)
    victims = [a.apps_dir / tarcraft.SENTINEL, a.apps_dir.parent / tarcraft.SENTINEL,
               a.apps_dir.parent / tarcraft.OUTSIDE, *map(Path, tarcraft.ABSOLUTE_VICTIMS)]
    for case in HOSTILE_PUSHES:
        assert tarcraft.EXPECTED_ERROR[case] == "unsafe-archive"
        mark = len(a.audit_events())
        proc = _raw_receive(world, tarcraft.HOSTILE_CASES[case]())
        assert proc.returncode == EXIT["unsafe-archive"], (case, proc)
        assert proc.stdout == b"" and _error_line(proc) == {"ok": False, "error": "unsafe-archive"}, (case, proc)
        assert snapshot(target) == before, case
        assert leftovers(a) == [], case
        assert not any(os.path.lexists(v) for v in victims), case
        [event] = audit_tail(a, mark)
        assert (event["verb"], event["slug"], event["outcome"]) == ("receive-app", "hostapp", "unsafe-archive")

    # A valid archive cut short: transfer-incomplete, plain and zstd-compressed.
    valid = subprocess.run(["tar", "--create", "--file=-", "--format=posix", "--numeric-owner",
                            f"--directory={target}", "--", "."], stdout=subprocess.PIPE, check=True).stdout
    # GNU tar pads the archive with zeros to 10 KiB: cut inside the members, not in the padding.
    with tarfile.open(fileobj=io.BytesIO(valid)) as tf:
        end = max(m.offset_data + m.size for m in tf.getmembers())
    for data, flags in ((valid[: end // 2], ()),
                        (subprocess.run(["zstd", "-q", "-c"], input=valid, stdout=subprocess.PIPE,
                                        check=True).stdout[:-20], ("--zstd",))):
        proc = _raw_receive(world, data, *flags)
        assert proc.returncode == EXIT["transfer-incomplete"], proc
        assert _error_line(proc) == {"ok": False, "error": "transfer-incomplete"}
        assert snapshot(target) == before and leftovers(a) == []

    # The same path with a whole archive works: the refusals above were the archive's doing.
    whole = subprocess.run(["zstd", "-q", "-c"], input=valid, stdout=subprocess.PIPE, check=True).stdout
    proc = _raw_receive(world, whole, "--zstd", "--no-pre-backup")
    assert proc.returncode == 0, proc
    answer = json.loads(proc.stdout)
    assert answer["ok"] is True and answer["app"] == "hostapp" and answer["backup"] is True
    assert diff(before, snapshot(target)) == [] and leftovers(a) == []


# -- d. incremental pull --------------------------------------------------------------------

def test_incremental_pull_moves_only_what_changed(world):
    a, b = world.a, world.b
    source = big_app(a.apps_dir / "bigapp", a.user, seed=21)
    size = sum(r.get("size", 0) for r in snapshot(source).values())
    assert size > 64 << 20
    full = assert_ok(peerkit(b, "pull", a.name, "bigapp", "--compress", "none"))
    live = b.apps_dir / "bigapp"
    assert full["bytes"] > size and same_tree(source, a.user, live, b.user) == []

    old_inodes = inodes(live)
    changed, deleted, added = change_app(source, a.user, seed=22)
    kept = keep_link(world, live / changed, "pull-changed")
    old_content = kept.read_bytes()

    run = peerkit(b, "pull", a.name, "bigapp", "--incremental")
    result = assert_ok(run)
    assert not any("falling back" in n for n in result["notes"]), result["notes"]
    assert "falling back" not in run.stderr
    # The full pull's ping recorded that A offers rsync, but a pre-backup of
    # the live app was due: the rsync (whose hard links change the live
    # files' ctime under the backup's tar) waited for it.
    assert "rsync" in recorded_features(b, a.name)
    assert not any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert 512 << 10 < result["bytes"] < 5 << 20, result["bytes"]
    assert same_tree(source, a.user, live, b.user) == []
    assert not (live / deleted).exists() and (live / added).is_file()
    assert leftovers(b) == []
    assert result["backup"] and os.path.isfile(result["backup"]) and "-pre-pull.tar." in result["backup"]
    stages = run.stage_outcomes()
    assert stages["backup"] == "ok" and stages["transfer"] == "ok" and stages["verify"] == "ok"
    # Unchanged files are hard links of the previous live files (link-dest seeding);
    # the changed one is a new file, and the old live file was never written.
    # Symlinks are made anew: the link farm rsync reads holds none.
    new_inodes = inodes(live)
    unchanged = {rel for rel in set(new_inodes) - {changed, added} if not (live / rel).is_symlink()}
    assert unchanged and {rel: new_inodes[rel] for rel in unchanged} == {rel: old_inodes[rel] for rel in unchanged}
    assert new_inodes[changed] != old_inodes[changed]
    assert kept.read_bytes() == old_content and os.stat(kept).st_ino == old_inodes[changed]
    kept.unlink()

    # Without a pre-backup, the rsync starts with the ping.
    (source / "small" / "d2" / "later.txt").write_bytes(b"added later still\n")
    as_owner(source, a.user)
    result = assert_ok(peerkit(b, "pull", a.name, "bigapp", "--incremental", "--no-pre-backup"))
    assert any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert same_tree(source, a.user, live, b.user) == [] and leftovers(b) == []


# -- e. incremental push --------------------------------------------------------------------

def test_an_incremental_pull_of_a_missing_app_stops_the_rsync_started_with_the_ping(world):
    a, b = world.a, world.b
    ping = peerkit(b, "ping", a.name)
    assert ping.returncode == 0, ping.why()
    assert "rsync" in recorded_features(b, a.name)
    mark = len(a.audit_events())
    run = peerkit(b, "pull", a.name, "noapp", "--incremental")
    assert_failed(run, "no-such-app")
    assert any("alongside the ping" in n for n in run.result["notes"]), run.result
    assert leftovers(b) == [] and not (b.apps_dir / "noapp").exists()
    assert harness.wait_until(lambda: not _processes_of(b.user, "rsync"), 10, 0.05), _processes_of(b.user, "rsync")
    # If the rsync reached A before it was stopped, A refused it: it has no such app.
    events = [e for e in audit_tail(a, mark) if e.get("verb") == "rsync"]
    assert all(e["outcome"] == "no-such-app" for e in events), [(e["outcome"], e.get("reason")) for e in events]


def recorded_features(inst: harness.PeerkitInstance, peer: str) -> list[str]:
    """The features ``inst`` recorded from ``peer``'s last ping (as `peerkit peers` shows them)."""
    _, result = inst.cli("peers")
    [entry] = [p for p in result["peers"] if p["name"] == peer]
    return entry.get("features", [])


def test_incremental_push_moves_only_what_changed(world):
    a, b = world.a, world.b
    peerkit(a, "allow", b.name, "--push")
    source = big_app(b.apps_dir / "pushbig", b.user, seed=31, blobs=3)
    size = sum(r.get("size", 0) for r in snapshot(source).values())
    full = assert_ok(peerkit(b, "push", a.name, "pushbig", "--compress", "none"))
    target = a.apps_dir / "pushbig"
    assert full["bytes"] > size and same_tree(source, b.user, target, a.user) == []
    made = backups(a, "pushbig")

    old_inodes = inodes(target)
    changed, deleted, added = change_app(source, b.user, seed=32)
    kept = keep_link(world, target / changed, "push-changed")
    old_content = kept.read_bytes()

    run = peerkit(b, "push", a.name, "pushbig", "--incremental")
    result = assert_ok(run)
    assert not any("falling back" in n for n in result["notes"]), result["notes"]
    assert 512 << 10 < result["bytes"] < 5 << 20, result["bytes"]
    assert same_tree(source, b.user, target, a.user) == []
    assert not (target / deleted).exists() and (target / added).is_file()
    assert leftovers(a) == []
    # A made its own pre-backup of the copy it replaced.
    new_backups = sorted(set(backups(a, "pushbig")) - set(made))
    assert len(new_backups) == 1 and "-pre-push.tar." in new_backups[0], new_backups
    new_inodes = inodes(target)
    # Symlinks are made anew: the link farm rsync reads holds none.
    unchanged = {rel for rel in set(new_inodes) - {changed, added} if not (target / rel).is_symlink()}
    assert {rel: new_inodes[rel] for rel in unchanged} == {rel: old_inodes[rel] for rel in unchanged}
    assert new_inodes[changed] != old_inodes[changed]
    assert kept.read_bytes() == old_content
    kept.unlink()
    records = [json.loads(line) for line in (a.state_dir / "transfers.log").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "receive" and r.get("app") == "pushbig"][-1]
    assert last["ok"] is True and [s["name"] for s in last["stages"]][:3] == ["lock", "backup", "transfer"]


def test_incremental_transfers_check_what_rsync_wrote(world):
    """rsync applies its own rules; the receiver then applies the archive rules to the tree it wrote."""
    a, b = world.a, world.b
    # A first incremental pull (no local copy to link against) works...
    source = make_tree(a.apps_dir / "linkapp", {"VERSION": b"1\n", "conf": None, "conf/app.ini": b"x=1\n",
                                                "current": ("link", "conf/app.ini")}, a.user)
    run = peerkit(b, "pull", a.name, "linkapp", "--incremental")
    assert_ok(run)
    live = b.apps_dir / "linkapp"
    assert same_tree(source, a.user, live, b.user) == [] and run.stage_outcomes()["backup"] == "skipped"
    before = snapshot(live)
    # ...and a symlink that leaves the app is refused before the swap.
    os.symlink("/etc", source / "etc")
    os.chown(source / "etc", a.user.uid, a.user.gid, follow_symlinks=False)
    run = peerkit(b, "pull", a.name, "linkapp", "--incremental")
    assert_failed(run, "unsafe-archive")
    assert run.stage_outcomes()["verify"] == "failed"
    assert snapshot(live) == before and leftovers(b) == []

    # The same for a push: A checks what B's rsync wrote into its staging copy.
    peerkit(a, "allow", b.name, "--push")
    target = make_tree(a.apps_dir / "linkpush", {"VERSION": b"old\n"}, a.user)
    make_tree(b.apps_dir / "linkpush", {"VERSION": b"new\n", "up": ("link", "../../..")}, b.user)
    before = snapshot(target)
    run = peerkit(b, "push", a.name, "linkpush", "--incremental")
    assert_failed(run, "unsafe-archive")
    assert snapshot(target) == before and leftovers(a) == []
    assert hook_lines(world, "linkpush") == []  # never stopped: refused before the swap


def test_an_incremental_pull_never_links_through_a_symlink_planted_in_the_live_app(world):
    """rsync's --link-dest reads a farm of our own hard links, never the live tree.

    The app's container swaps ``data/x`` for a symlink to a directory
    outside the app holding a file of the same size, mtime and mode as the
    peer's ``data/x/secret.txt``.  A lookup through the live tree would
    hard-link that outside file into the new copy: with rsync 3.5 when the
    symlink is root's (a container running as root), with older rsync
    whoever owns it.
    """
    a, b = world.a, world.b
    source = make_tree(a.apps_dir / "plant", {"top.txt": b"t\n", "data/x": None,
                                              "data/x/secret.txt": b"peer version 1\n"}, a.user)
    assert_ok(peerkit(b, "pull", a.name, "plant"))
    live = b.apps_dir / "plant"
    outside = make_tree(world.root / "outside-plant", {"secret.txt": b"HOST SECRET!!!\n"}, b.user)
    assert os.path.getsize(outside / "secret.txt") == os.path.getsize(source / "data/x/secret.txt")

    # rsync started with the ping, and after the backup; the symlink root's, then another user's
    for flags, owner in ((["--no-pre-backup"], 0), ([], 0), (["--no-pre-backup"], 65534)):
        if (live / "data" / "x").is_dir() and not (live / "data" / "x").is_symlink():
            shutil.rmtree(live / "data" / "x")
        os.symlink(outside, live / "data" / "x")
        os.chown(live / "data" / "x", owner, owner, follow_symlinks=False)
        result = assert_ok(peerkit(b, "pull", a.name, "plant", "--incremental", *flags))
        assert any("alongside the ping" in n for n in result["notes"]) == bool(flags), result["notes"]
        assert not (live / "data" / "x").is_symlink()
        assert (live / "data/x/secret.txt").read_bytes() == b"peer version 1\n"
        assert os.stat(outside / "secret.txt").st_nlink == 1
        assert (outside / "secret.txt").read_bytes() == b"HOST SECRET!!!\n"
        assert same_tree(source, a.user, live, b.user) == [] and leftovers(b) == []


def test_an_incremental_push_never_links_through_a_symlink_planted_in_the_receivers_app(world):
    """The receiving side's rsync reads a link farm too (peer-shell's rsync receive)."""
    a, b = world.a, world.b
    peerkit(a, "allow", b.name, "--push")
    source = make_tree(b.apps_dir / "plantpush", {"top.txt": b"t\n", "data/x": None,
                                                  "data/x/secret.txt": b"peer version 1\n"}, b.user)
    assert_ok(peerkit(b, "push", a.name, "plantpush"))
    target = a.apps_dir / "plantpush"
    outside = make_tree(world.root / "outside-plantpush", {"secret.txt": b"HOST SECRET!!!\n"}, a.user)
    shutil.rmtree(target / "data" / "x")
    os.symlink(outside, target / "data" / "x")
    os.chown(target / "data" / "x", 0, 0, follow_symlinks=False)  # a container running as root
    assert_ok(peerkit(b, "push", a.name, "plantpush", "--incremental"))
    assert (target / "data/x/secret.txt").read_bytes() == b"peer version 1\n"
    assert os.stat(outside / "secret.txt").st_nlink == 1
    assert same_tree(source, b.user, target, a.user) == [] and leftovers(a) == []


# -- f. hostile rsync requests through the real sshd -------------------------------------------------

RSYNC_VECTORS = [
    (f"rsync --server --sender -Lr{CAPS} . bigapp/", "refused"),
    (f"rsync --server --sender -lHr{CAPS} -e ssh . bigapp/", "refused"),
    ("rsync --server -e.iLsfxCIvu -lr . bigapp/", "refused"),
    (f"rsync --server --sender -lr{CAPS} --rsh=/bin/sh . bigapp/", "refused"),
    (f"rsync --server --sender -lr{CAPS} --files-from=/etc/passwd . bigapp/", "refused"),
    (f"rsync --server --sender -lr{CAPS} --delete . bigapp/", "refused"),
    (f"rsync --server -lr{CAPS} --log-file=/tmp/pk-owned . bigapp/", "refused"),
    (f"rsync --server --sender -lsr{CAPS} . bigapp/", "refused"),
    (f"rsync --server --sender -lr{CAPS} --numeric-ids . ../bigapp/", "bad-slug"),
    (f"rsync --server --sender -lr{CAPS} --numeric-ids . bigapp/../../", "bad-slug"),
    (f"rsync --server --sender -lr{CAPS} --numeric-ids . /etc/", "bad-slug"),
    (f"rsync --server -lr{CAPS} --delete . /etc/", "bad-slug"),
    (f"rsync --server --sender -lr{CAPS} --numeric-ids . bigapp/data/", "bad-slug"),
]


def test_hostile_rsync_requests_are_refused(world):
    a, b = world.a, world.b
    assert (a.apps_dir / "bigapp").is_dir()  # made by the incremental pull test
    for command, code in RSYNC_VECTORS:
        mark = len(a.audit_events())
        proc = b.ssh(a, command)
        assert proc.returncode == EXIT[code], (command, proc)
        assert proc.stdout == b"", (command, proc.stdout[:200])
        assert _error_line(proc) == {"ok": False, "error": code}, (command, proc)
        events = audit_tail(a, mark)
        assert len(events) == 1 and events[0]["outcome"] == code and events[0]["bytes"] == 0, (command, events)
    assert not os.path.lexists("/tmp/pk-owned")


def test_rsync_of_a_denied_app_looks_like_a_missing_one(world):
    a, b = world.a, world.b
    make_tree(a.apps_dir / "secretapp", {"secret.txt": b"top secret\n"}, a.user)
    peerkit(a, "deny", b.name, "--app", "secretapp")
    try:
        answers = []
        for slug in ("secretapp", "nosuchapp"):
            mark = len(a.audit_events())
            proc = b.ssh(a, f"rsync --server --sender -lHtpr{CAPS} --numeric-ids . {slug}/")
            assert proc.returncode == EXIT["no-such-app"] and proc.stdout == b"", proc
            answers.append((proc.returncode, proc.stdout, proc.stderr))
            [event] = audit_tail(a, mark)
            assert (event["verb"], event["slug"], event["outcome"], event["bytes"]) == \
                ("rsync", slug, "no-such-app", 0), event
        assert answers[0] == answers[1]
        # And through the client: an incremental pull of the denied app fails the same way.
        run = peerkit(b, "pull", a.name, "secretapp", "--incremental")
        assert_failed(run, "no-such-app")
        assert not (b.apps_dir / "secretapp").exists()
    finally:
        peerkit(a, "allow", b.name, "--app", "secretapp")


# -- g. compression -------------------------------------------------------------------------

def _text_app(path: Path, user: harness.ThrowawayUser, seed: int) -> Path:
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"config", b"value", b"user", b"session", b"true"]
    spec: dict[str, Any] = {"logs": None, "VERSION": b"1\n"}
    for i in range(4):
        spec[f"logs/app-{i}.log"] = b"".join(
            b"2024-01-%02d %s=%s %d\n" % (n % 28 + 1, rng.choice(words), rng.choice(words), n)
            for n in range(25_000))
    return make_tree(path, spec, user)


def test_zstd_and_plain_give_the_same_tree(world):
    a, b = world.a, world.b
    source = _text_app(a.apps_dir / "textapp", a.user, seed=41)
    live = b.apps_dir / "textapp"
    zstd = assert_ok(peerkit(b, "pull", a.name, "textapp", "--compress", "zstd"))
    assert "zstd compression: --compress zstd" in zstd["notes"]
    with_zstd = snapshot(live)
    plain = assert_ok(peerkit(b, "pull", a.name, "textapp", "--compress", "none", "--no-pre-backup"))
    assert "no compression: --compress none" in plain["notes"]
    assert diff(with_zstd, snapshot(live)) == []
    assert same_tree(source, a.user, live, b.user) == []
    assert zstd["bytes"] * 4 < plain["bytes"], (zstd["bytes"], plain["bytes"])

    # Pushing compressed works too, and sends far fewer bytes than the app holds.
    peerkit(a, "allow", b.name, "--push")
    pushed = _text_app(b.apps_dir / "textpush", b.user, seed=42)
    size = sum(r.get("size", 0) for r in snapshot(pushed).values())
    result = assert_ok(peerkit(b, "push", a.name, "textpush", "--compress", "zstd"))
    assert "zstd compression: --compress zstd" in result["notes"]
    assert result["bytes"] * 4 < size
    assert same_tree(pushed, b.user, a.apps_dir / "textpush", a.user) == []
    assert leftovers(a) == [] and leftovers(b) == []


# -- h. fallback to a full transfer --------------------------------------------------------------

def test_incremental_falls_back_when_the_peer_has_no_rsync(world):
    a, c = world.a, world.c
    source = make_tree(a.apps_dir / "fbapp", {"VERSION": b"1\n", "data": None, "data/x.bin": os.urandom(200_000),
                                              "link": ("link", "data/x.bin")}, a.user)
    ping = peerkit(c, "ping", a.name)
    assert ping.returncode == 0, ping.why()
    assert "rsync" not in recorded_features(c, a.name)
    run = peerkit(c, "pull", a.name, "fbapp", "--incremental")
    result = assert_ok(run)
    text = f"rsync is not available on {a.name}: falling back to a full transfer"
    assert f"note: {text}" in run.stderr, run.stderr
    assert text in result["notes"]
    assert not any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert same_tree(source, a.user, c.apps_dir / "fbapp", c.user) == []
    assert leftovers(c) == []

    # A peer that offered rsync last time and no longer does: the rsync
    # started with the ping is dropped, with what it wrote, for a tar transfer.
    c.set_recorded_features(a.name, ["rsync"])
    assert recorded_features(c, a.name) == ["rsync"]
    (a.apps_dir / "fbapp" / "VERSION").write_bytes(b"2\n")
    run = peerkit(c, "pull", a.name, "fbapp", "--incremental", "--no-pre-backup")
    result = assert_ok(run)
    assert any("alongside the ping" in n for n in result["notes"]) and text in result["notes"], result["notes"]
    assert [s["name"] for s in result["stages"]].count("transfer") == 1, result["stages"]
    assert same_tree(source, a.user, c.apps_dir / "fbapp", c.user) == []
    assert leftovers(c) == [] and not _processes_of(c.user, "rsync")
    assert "rsync" not in recorded_features(c, a.name)

    # A peer that offered app-info last time and now refuses it (an older
    # peer-shell since): the pull asks ping and list-apps instead, and what
    # it records sends the next pull straight to them.
    c.set_recorded_features(a.name, ["app-info"])
    (a.apps_dir / "fbapp" / "VERSION").write_bytes(b"3\n")
    mark = len(world.standin_log.read_text().splitlines())
    result = assert_ok(peerkit(c, "pull", a.name, "fbapp", "--no-pre-backup"))
    asked = world.standin_log.read_text().splitlines()[mark:]
    # (The transfer started alongside: its place among them varies.)
    assert sorted(asked) == ["app-info fbapp", "list-apps", "ping", "stream-app fbapp"], asked
    assert asked.index("app-info fbapp") < asked.index("ping") < asked.index("list-apps"), asked
    assert same_tree(source, a.user, c.apps_dir / "fbapp", c.user) == [] and leftovers(c) == []
    assert recorded_features(c, a.name) == ["receive-app", "replace-key", "zstd"]

    # A peer that offered with-app-info last time and now refuses it (a
    # peer-shell with rsync and app-info, older than with-app-info): app-info
    # is asked instead, and the rsync goes again without it.
    flag = Path(f"{world.standin_log}.rsync")
    flag.write_bytes(b"")
    flag.chmod(0o644)
    try:
        c.set_recorded_features(a.name, ["app-info", "rsync", "with-app-info"])
        # (Another size: rsync's quick check would miss a change within the same second.)
        (a.apps_dir / "fbapp" / "VERSION").write_bytes(b"four\n")
        mark = len(world.standin_log.read_text().splitlines())
        result = assert_ok(peerkit(c, "pull", a.name, "fbapp", "--incremental", "--no-pre-backup"))
        asked = world.standin_log.read_text().splitlines()[mark:]
        assert [w.split(" ")[0] for w in asked] == ["with-app-info", "app-info", "rsync"], asked
        assert asked[0] == "with-app-info " + asked[2] and asked[1] == "app-info fbapp", asked
        assert any("refused with-app-info" in n for n in result["notes"]), result["notes"]
        assert same_tree(source, a.user, c.apps_dir / "fbapp", c.user) == [] and leftovers(c) == []
        assert not _processes_of(c.user, "rsync")
        assert recorded_features(c, a.name) == ["app-info", "receive-app", "replace-key", "rsync", "zstd"]
    finally:
        flag.unlink()

    # Pushing incrementally falls back the same way.
    peerkit(a, "allow", c.name, "--push")
    install_standin(world)  # allow rewrote C's key line with the real peer-shell
    try:
        pushed = make_tree(c.apps_dir / "fbpush", {"VERSION": b"2\n", "f.txt": b"from c\n" * 100}, c.user)
        run = peerkit(c, "push", a.name, "fbpush", "--incremental")
        result = assert_ok(run)
        assert any("falling back to a full transfer" in n for n in result["notes"]), result["notes"]
        assert "falling back to a full transfer" in run.stderr
        assert same_tree(pushed, c.user, a.apps_dir / "fbpush", a.user) == []
    finally:
        peerkit(a, "deny", c.name, "--push")
        install_standin(world)


# -- h2. a full pull starts its transfer with the ping ------------------------------------------

EARLY = "transfer started alongside the ping (the peer was reachable last time)"
CHANGED = "the early transfer was stopped: the peer's features changed"


def test_a_full_pull_starts_its_transfer_with_the_ping(world):
    a, b = world.a, world.b
    source = make_tree(a.apps_dir / "earlyapp", {"VERSION": b"1\n", "data": None,
                                                 "data/x.bin": os.urandom(300_000)}, a.user)
    assert peerkit(b, "ping", a.name).returncode == 0
    assert "zstd" in recorded_features(b, a.name)
    result = assert_ok(peerkit(b, "pull", a.name, "earlyapp", "--no-pre-backup"))
    assert EARLY in result["notes"] and CHANGED not in result["notes"], result["notes"]
    assert same_tree(source, a.user, b.apps_dir / "earlyapp", b.user) == [] and leftovers(b) == []

    # Features never recorded (a peer not pinged since): the transfer waits for the ping.
    b.set_recorded_features(a.name, None)
    assert recorded_features(b, a.name) == []
    result = assert_ok(peerkit(b, "pull", a.name, "earlyapp", "--no-pre-backup"))
    assert not any("alongside" in n for n in result["notes"]), result["notes"]
    assert "zstd" in recorded_features(b, a.name)  # this pull's ping recorded them again

    # The last ping offered no zstd and this one does: the plain stream
    # started early goes, with what it wrote, for the compressed one asked for.
    b.set_recorded_features(a.name, [])
    (a.apps_dir / "earlyapp" / "VERSION").write_bytes(b"2\n")
    result = assert_ok(peerkit(b, "pull", a.name, "earlyapp", "--compress", "zstd", "--no-pre-backup"))
    for text in (EARLY, CHANGED, "zstd compression: --compress zstd"):
        assert text in result["notes"], result["notes"]
    assert [s["name"] for s in result["stages"]].count("transfer") == 1, result["stages"]
    assert same_tree(source, a.user, b.apps_dir / "earlyapp", b.user) == [] and leftovers(b) == []
    assert "zstd" in recorded_features(b, a.name)


def test_a_pull_asks_app_info_instead_of_ping_and_list_apps_when_the_peer_offered_it(world):
    a, b = world.a, world.b
    source = make_tree(a.apps_dir / "infoapp", {"VERSION": b"1\n", "f.bin": os.urandom(50_000)}, a.user)
    assert peerkit(b, "ping", a.name).returncode == 0
    assert "app-info" in recorded_features(b, a.name)
    mark = len(a.audit_events())
    assert_ok(peerkit(b, "pull", a.name, "infoapp", "--no-pre-backup"))
    asked = audit_tail(a, mark)
    assert sorted((e["verb"], e.get("slug")) for e in asked) == [("app-info", "infoapp"), ("stream-app", "infoapp")]
    assert same_tree(source, a.user, b.apps_dir / "infoapp", b.user) == [] and leftovers(b) == []

    # Features recorded before peers offered app-info: ping and list-apps, which record it for the next pull.
    b.set_recorded_features(a.name, ["rsync", "zstd"])
    mark = len(a.audit_events())
    assert_ok(peerkit(b, "pull", a.name, "infoapp", "--no-pre-backup"))
    assert sorted(e["verb"] for e in audit_tail(a, mark)) == ["list-apps", "ping", "stream-app"]
    assert "app-info" in recorded_features(b, a.name)

    # A missing app: the peer answered, so it is recorded as reachable, and the pull says no such app.
    mark = len(a.audit_events())
    run = peerkit(b, "pull", a.name, "noinfoapp")
    assert_failed(run, "no-such-app")
    assert [e["outcome"] for e in audit_tail(a, mark) if e["verb"] == "app-info"] == ["ok"]
    assert "app-info" in recorded_features(b, a.name) and leftovers(b) == []


def test_an_incremental_pull_asks_app_info_with_its_rsync_when_the_peer_offered_it(world):
    """One session: the rsync's request asks app-info's answer first (with-app-info), and that answer is the ping."""
    a, b = world.a, world.b
    source = make_tree(a.apps_dir / "oneapp", {"VERSION": b"1\n", "f.bin": os.urandom(50_000)}, a.user)
    assert_ok(peerkit(b, "pull", a.name, "oneapp", "--no-pre-backup", "--compress", "none"))
    assert "with-app-info" in recorded_features(b, a.name)
    (source / "VERSION").write_bytes(b"two\n")  # another size: rsync's quick check sees it within the second
    as_owner(source, a.user)
    mark = len(a.audit_events())
    result = assert_ok(peerkit(b, "pull", a.name, "oneapp", "--incremental", "--no-pre-backup"))
    assert [(e["verb"], e.get("slug"), e.get("with_app_info")) for e in audit_tail(a, mark)] == [
        ("rsync", "oneapp", True)]
    assert any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert same_tree(source, a.user, b.apps_dir / "oneapp", b.user) == [] and leftovers(b) == []
    assert "with-app-info" in recorded_features(b, a.name)

    # A missing app: app-info's answer says so, nothing is started, and the peer is recorded as reachable.
    mark = len(a.audit_events())
    run = peerkit(b, "pull", a.name, "nooneapp", "--incremental", "--no-pre-backup")
    assert_failed(run, "no-such-app")
    assert [(e["verb"], e.get("with_app_info"), e["outcome"]) for e in audit_tail(a, mark)] == [
        ("rsync", True, "no-such-app")]
    assert leftovers(b) == [] and not _processes_of(b.user, "rsync")
    _, peers = b.cli("peers")
    [entry] = [p for p in peers["peers"] if p["name"] == a.name]
    assert entry["status"] == "ok" and "with-app-info" in entry["features"], entry


def test_a_connection_authenticates_with_one_signed_request(world):
    """peerkit's key goes out signed, as the only request: no "none" first, no question whether it would do.

    OpenSSH's sshd takes at least 5-9 ms over every authentication request
    (against user enumeration by timing): the two extra requests asyncssh
    makes on its own cost each connection about 20 ms (README, Benchmarks).
    sshd logs each request's method (LogLevel DEBUG2).
    """
    a, b = world.a, world.b
    offset = world.sshd.log_offset()
    assert peerkit(b, "ping", a.name).returncode == 0
    log = world.sshd.wait_for_log(offset, "Accepted publickey")
    methods = re.findall(rf"userauth-request for user {a.user.name} service ssh-connection method (\S+)", log)
    assert methods == ["publickey"], log[-3000:]
    assert "Postponed publickey" not in log  # sshd's word for a key asked about, not yet signed


def test_a_key_the_peer_no_longer_accepts_is_still_refused_in_one_request(world):
    """Signed first and refused: the command fails as `refused`, and no other method is tried."""
    a, b = world.a, world.b
    stranger = b.user.home / "stranger-key"
    if not stranger.exists():
        b.user.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    write_config(world, "b", ssh={"identity": str(stranger)})
    offset = world.sshd.log_offset()
    try:
        run = peerkit(b, "ping", a.name)
    finally:
        write_config(world, "b")
    assert_failed(run, "refused")
    log = world.sshd.log_since(offset)
    methods = re.findall(rf"userauth-request for user {a.user.name} service ssh-connection method (\S+)", log)
    assert methods == ["publickey"], log[-3000:]


def test_every_channel_of_a_pull_asks_for_our_window_and_packet_size(world):
    """Each channel a pull opens (app-info or ping and list-apps, stream-app, rsync) carries WINDOW and MAX_PACKET.

    One opened without them gets asyncssh's defaults (2 MiB, 32 KiB): a
    slower transfer; a larger window made the sending sshd buffer the excess
    and burn CPU on it (README, Benchmarks).  sshd logs both values of every
    session channel it is asked to open (LogLevel DEBUG2).
    """
    a, b = world.a, world.b
    source = make_tree(a.apps_dir / "flowapp", {"VERSION": b"1\n"}, a.user)
    # The first pull asks ping and list-apps, the second app-info, the third rsync with-app-info.
    b.set_recorded_features(a.name, None)
    offset = world.sshd.log_offset()
    assert_ok(peerkit(b, "pull", a.name, "flowapp", "--no-pre-backup", "--compress", "none"))
    for version, extra in ((b"2\n", ()), (b"3\n", ("--incremental",))):
        (source / "VERSION").write_bytes(version)
        as_owner(source, a.user)
        result = assert_ok(peerkit(b, "pull", a.name, "flowapp", "--no-pre-backup", "--compress", "none", *extra))
        assert [s["name"] for s in result["stages"]].count("transfer") == 1
    assert "with-app-info" in recorded_features(b, a.name)
    opened = re.findall(r"ctype session rchan \d+ win (\d+) max (\d+)", world.sshd.log_since(offset))
    assert len(opened) == 6, opened  # ping, list-apps and the transfer; app-info and the transfer; rsync
    assert set(opened) == {(str(WINDOW), str(MAX_PACKET))}, opened


def test_a_pull_of_a_missing_app_stops_the_stream_started_with_the_ping(world):
    a, b = world.a, world.b
    assert peerkit(b, "ping", a.name).returncode == 0
    mark = len(a.audit_events())
    run = peerkit(b, "pull", a.name, "noapp")
    assert_failed(run, "no-such-app")
    assert EARLY in run.result["notes"], run.result
    assert leftovers(b) == [] and not (b.apps_dir / "noapp").exists()
    # If the early stream-app reached A before it was stopped, A refused it: it has no such app.
    events = [e for e in audit_tail(a, mark) if e.get("verb") == "stream-app"]
    assert all(e["outcome"] == "no-such-app" for e in events), events


# -- i. pre_stream / post_stream on the source ---------------------------------------------------

def _stream_hooks(world: World, pre: str = "pre") -> None:
    write_config(world, "a", hooks={"pre_stream": [str(world.stream_hook), pre],
                                    "post_stream": [str(world.stream_hook), "post"]})


def _slow_app(world: World) -> Path:
    """An app whose stream takes seconds: one sparse 3 GiB file (zeros on the wire)."""
    a = world.a
    path = make_tree(a.apps_dir / "slowapp", {"VERSION": b"1\n"}, a.user)
    with open(path / "sparse.img", "wb") as f:
        f.truncate(3 << 30)
    os.chown(path / "sparse.img", a.user.uid, a.user.gid)
    return path


def test_stream_hooks_run_around_every_send(world):
    a, b = world.a, world.b
    make_tree(a.apps_dir / "hookapp", {"VERSION": b"1\n", "f.txt": b"hook app\n"}, a.user)
    _stream_hooks(world)
    try:
        assert_ok(peerkit(b, "pull", a.name, "hookapp"))
        assert stream_lines(world, "hookapp") == ["pre hookapp site-b", "post hookapp site-b"]
        # rsync sends are wrapped the same way.
        (a.apps_dir / "hookapp" / "f.txt").write_bytes(b"changed\n")
        result = assert_ok(peerkit(b, "pull", a.name, "hookapp", "--incremental", "--no-pre-backup"))
        assert not any("falling back" in n for n in result["notes"])
        assert stream_lines(world, "hookapp") == ["pre hookapp site-b", "post hookapp site-b"] * 2
        assert (b.apps_dir / "hookapp" / "f.txt").read_bytes() == b"changed\n"
        # Refused requests run no hook at all.
        b.ssh(a, f"rsync --server --sender -Lr{CAPS} . hookapp/")
        b.ssh(a, "stream-app nosuchapp")
        assert stream_lines(world, "hookapp") == ["pre hookapp site-b", "post hookapp site-b"] * 2
        assert stream_lines(world, "nosuchapp") == []
    finally:
        write_config(world, "a")


def _wait_for_post(world: World, app: str, after: int, timeout: float = 10) -> list[str]:
    """Wait until a post_stream line for ``app`` follows the first ``after`` lines; return those new lines."""
    harness.wait_until(lambda: f"post {app} site-b" in stream_lines(world, app)[after:], timeout, 0.05)
    return stream_lines(world, app)[after:]


def test_post_stream_runs_when_the_ssh_client_is_killed(world):
    a, b = world.a, world.b
    _slow_app(world)
    _stream_hooks(world)
    mark = len(a.audit_events())
    try:
        proc = b.user.popen(b.ssh_argv(a, "stream-app", "slowapp"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
        try:
            first = proc.stdout.read(1 << 16)
            assert len(first) == 1 << 16  # the stream is flowing
            # We stopped reading: the stream cannot end by itself; post_stream has not run.
            time.sleep(0.3)
            assert stream_lines(world, "slowapp") == ["pre slowapp site-b"]
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        lines = _wait_for_post(world, "slowapp", 0)
        assert lines == ["pre slowapp site-b", "post slowapp site-b"], lines
        harness.wait_until(lambda: len(audit_tail(a, mark)) >= 1, 10)
        [event] = audit_tail(a, mark)
        assert event["verb"] == "stream-app" and event["outcome"] in ("disconnected", "failed"), event
        assert 0 < event["bytes"] < 3 << 30, event
    finally:
        write_config(world, "a")


def test_post_stream_runs_when_the_puller_is_killed(world):
    a, b = world.a, world.b
    _slow_app(world)  # its own, not the one the test before left
    _stream_hooks(world)
    before = len(stream_lines(world, "slowapp"))
    mark = len(a.audit_events())
    # --compress none: zeros compress to nothing, and B measured the link in the
    # incremental pull test, so "auto" may pick zstd and the stream would end at once.
    argv = [str(b.peerkit), "pull", a.name, "slowapp", "--no-pre-backup", "--compress", "none", "--json"]
    proc = b.user.popen(argv, env=b.user.env(extra_path=[b.bin_dir]), stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            event = json.loads(line)
            assert event.get("event") == "progress", event
            if event["bytes"] > 0:
                break
        # Mid-transfer: A is still streaming (no post_stream yet).
        assert stream_lines(world, "slowapp")[before:] == ["pre slowapp site-b"]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        got = _wait_for_post(world, "slowapp", before)
        assert got == ["pre slowapp site-b", "post slowapp site-b"], got
        harness.wait_until(lambda: any(e.get("verb") == "stream-app" for e in audit_tail(a, mark)), 10)
        [event] = [e for e in audit_tail(a, mark) if e.get("verb") == "stream-app"]
        assert event["outcome"] in ("disconnected", "failed") and event["bytes"] < 3 << 30, json.dumps(event)
        assert not (b.apps_dir / "slowapp").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        write_config(world, "a")
        for name in leftovers(b):  # the killed puller could not clean its staging copy
            shutil.rmtree(b.apps_dir / name)


def _processes_of(user: harness.ThrowawayUser, word: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid != user.uid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if word in cmdline:
            found.append(cmdline)
    return found


def test_sigterm_during_an_incremental_pull_stops_rsync_and_the_remote(world):
    """rsync runs over the puller's own connection: a SIGTERM ends rsync, its relay and the remote send."""
    a, b = world.a, world.b
    _slow_app(world)
    _stream_hooks(world)
    before = len(stream_lines(world, "slowapp"))
    argv = [str(b.peerkit), "pull", a.name, "slowapp", "--incremental", "--no-pre-backup", "--json"]
    proc = b.user.popen(argv, env=b.user.env(extra_path=[b.bin_dir]), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        assert harness.wait_until(lambda: stream_lines(world, "slowapp")[before:] == ["pre slowapp site-b"], 30, 0.05)
        assert harness.wait_until(lambda: _processes_of(b.user, "rsyncrelay"), 10, 0.05)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["error"] == "interrupted", (out, err)
        assert [s["name"] for s in result["stages"] if s["outcome"] == "failed"] == ["transfer"], result
        # The remote send ended (its post_stream hook ran), and nothing of ours is left.
        assert _wait_for_post(world, "slowapp", before) == ["pre slowapp site-b", "post slowapp site-b"]
        assert harness.wait_until(lambda: not _processes_of(b.user, "rsync"), 10, 0.05), \
            _processes_of(b.user, "rsync")
        assert leftovers(b) == [] and not (b.apps_dir / "slowapp").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        write_config(world, "a")


def test_failing_pre_stream_refuses_the_stream(world):
    a, b = world.a, world.b
    live = b.apps_dir / "hookapp"
    before = snapshot(live)
    start = len(stream_lines(world, "hookapp"))
    _stream_hooks(world, pre="pre-fail")
    try:
        # The peer answers "failed" in both modes, which the client reports as an
        # incomplete transfer.
        for flags, code in (((), "transfer-incomplete"), (("--incremental",), "transfer-incomplete")):
            mark = len(a.audit_events())
            run = peerkit(b, "pull", a.name, "hookapp", *flags)
            assert_failed(run, code)
            assert snapshot(live) == before and leftovers(b) == []
            event = [e for e in audit_tail(a, mark) if e.get("verb") in ("stream-app", "rsync")][-1]
            assert event["outcome"] == "failed" and event["bytes"] == 0, event
            assert "pre_stream" in event["reason"] and "pre_stream failed" in event["hook"], event
        # post_stream runs even after a failed pre_stream: what it paused resumes.
        assert stream_lines(world, "hookapp")[start:] == ["pre-fail hookapp site-b",
                                                          "post hookapp site-b"] * 2
    finally:
        write_config(world, "a")
