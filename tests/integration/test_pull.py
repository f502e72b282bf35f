"""`peerkit pull` end to end: the real CLI, a real SSH server (sshd or `peerkit serve`), real peer-shells.

Every pull runs ``peerkit pull PEER APP --json`` as the pulling instance's
owner and asserts what a user would notice: the bytes on disk (through
tests/trees.snapshot), the exit status, the machine error code in the last
``--json`` line and the stages it reports.

Three instance pairs:

* ``alpha`` / ``beta`` (shared, paired both ways): the end-to-end pulls.
  The apps are removed again afterwards, because test_sshd_peer_shell.py
  lists both instances' apps exactly.
* ``src`` / ``dst`` (users ``pull-src`` / ``pull-dst``): ``dst`` pulls from
  ``src``.  ``src``'s key line for ``dst`` runs a stand-in forced command
  that serves ``stream-app <slug>`` from a per-slug script when a test left
  one (a crafted, cut or slow archive) and otherwise execs the real
  peer-shell with the original arguments.  ``dst`` has hooks that log.
* ``target`` / ``client`` (users ``ping-src`` / ``ping-dst``): host keys and
  ping statuses; the tests edit ``client``'s peers.db and restore it.

These instances are deliberately not registered with ``make_instance``:
the stand-in writes no audit line, which test_sshd_peer_shell.py's
one-audit-line-per-session check would count against them.

Server kinds (see conftest.py): the tests run through the private OpenSSH
sshd (id ``sshd``) and a representative subset also through each
instance's own `peerkit serve` (id ``serve``): the end-to-end pull both
ways, the size cap, the hooks, the URL rewrite, host-key pinning (v2 and
v1) and the ping statuses.  Left to sshd, each with its reason in its
marker: the crafted, cut, held-back and interrupted streams, which need
the stand-in forced command (serve runs peer-shell in-process and serves
only peer-shell's own command= form, so there is no stand-in to run), and
the restic pre-backup (purely local to the puller).  What the puller does
with a hostile stream does not depend on the server that carried it.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import tarcraft
from tests.support import sshd as harness
from tests.support.agent import AgentProcess, private_dir
from tests.trees import build_mixed_tree, diff, inode_groups, snapshot

pytestmark = pytest.mark.integration

PULL_TIMEOUT = 120
SOURCE_DOMAIN = "old.example.org"
TARGET_DOMAIN = "new.example.net"
MTIME = 1_650_000_000
STAGING_PREFIX = ".peerkit-staging-"
ASIDE_PREFIX = ".peerkit-aside-"
EXIT = {"unsafe-archive": 53, "transfer-incomplete": 52, "hook-failed": 55, "busy": 56,
        "interrupted": 130, "backup-failed": 54, "host-key-mismatch": 41, "refused": 42,
        "peer-unreachable": 40}
_SLUG_OK = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


# -- running pulls -----------------------------------------------------------------

@dataclass
class Run:
    """One finished CLI call: exit status, every stdout JSON line, stderr, wall time."""

    returncode: int
    lines: list[dict]
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def result(self) -> dict:
        assert self.lines, f"no JSON on stdout (exit {self.returncode}); stderr: {self.stderr}"
        return self.lines[-1]

    @property
    def stages(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.result.get("stages", [])}

    def outcomes(self) -> list[tuple[str, str]]:
        return [(s["name"], s["outcome"]) for s in self.result.get("stages", [])]

    def why(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"


def _parse_lines(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
    return out


def _argv(inst: harness.PeerkitInstance, *args: str) -> list[str]:
    return [str(inst.peerkit), *args, "--json"]


def peerkit(inst: harness.PeerkitInstance, *args: str, timeout: float = PULL_TIMEOUT,
            env: dict[str, str] | None = None) -> Run:
    """Run ``peerkit ARGS --json`` as the instance's owner and wait for it."""
    started = time.monotonic()
    proc = inst.user.run(_argv(inst, *args), env=inst.user.env(extra_path=[inst.bin_dir], **(env or {})),
                         text=True, timeout=timeout)
    return Run(proc.returncode, _parse_lines(proc.stdout), proc.stdout, proc.stderr,
               time.monotonic() - started)


class Background:
    """A CLI call left running: stdout lines arrive on a queue as they are printed."""

    def __init__(self, inst: harness.PeerkitInstance, *args: str, env: dict[str, str] | None = None) -> None:
        self.started = time.monotonic()
        self.proc = inst.user.popen(_argv(inst, *args), env=inst.user.env(extra_path=[inst.bin_dir], **(env or {})),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.queue), daemon=True),
                         threading.Thread(target=self._drain, daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, q: queue.Queue) -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.err.append(self.proc.stderr.read())

    def wait_for_line(self, predicate, timeout: float = 30) -> dict:
        """Return the first stdout JSON object for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no matching line within {timeout}s; so far: {self.out}"
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            assert line is not None, f"stdout closed first; so far: {self.out}"
            self.out.append(line)
            obj = _parse_lines(line)
            if obj and predicate(obj[0]):
                return obj[0]

    def finish(self, timeout: float = PULL_TIMEOUT) -> Run:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)
        while True:
            try:
                line = self.queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.out.append(line)
        stdout = "".join(self.out)
        return Run(rc, _parse_lines(stdout), stdout, "".join(self.err), time.monotonic() - self.started)


def assert_failed(run: Run, code: str) -> None:
    """The CLI failed with ``code``: exit status, and the last --json line says so."""
    assert run.returncode == EXIT[code], run.why()
    result = run.result
    assert result.get("ok") is False and result.get("error") == code, run.why()
    assert result.get("message"), run.why()


def assert_pulled(run: Run) -> dict:
    assert run.returncode == 0, run.why()
    result = run.result
    assert result.get("ok") is True and result.get("event") == "result", run.why()
    return result


# -- instances, files, configs ---------------------------------------------------------

def as_owner(path: Path, user: harness.ThrowawayUser) -> None:
    """chown a tree (links themselves, not their targets) to ``user``."""
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(top, name), user.uid, user.gid, follow_symlinks=False)


def make_tree(path: Path, spec: dict[str, Any], user: harness.ThrowawayUser, mtime: int = MTIME) -> None:
    """Create ``path`` from {relpath: bytes (file) | None (dir) | ("link", target) | (bytes, mode)}."""
    if os.path.lexists(path):
        shutil.rmtree(path)
    path.mkdir(parents=True)
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
    for top, dirs, files in os.walk(path, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (mtime, mtime), follow_symlinks=False)
    os.utime(path, (mtime, mtime))
    os.chmod(path, 0o755)


def backups_dir(inst: harness.PeerkitInstance) -> Path:
    return inst._path(inst.settings["backups_dir"])


def leftovers(inst: harness.PeerkitInstance) -> list[str]:
    """Staging and aside directories in the instance's apps_dir."""
    try:
        names = os.listdir(inst.apps_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith((STAGING_PREFIX, ASIDE_PREFIX)))


def write_config(inst: harness.PeerkitInstance, **sections: Any) -> None:
    """Write the instance's baseline config with ``sections`` merged in (one level deep)."""
    data = copy.deepcopy(inst.baseline)  # type: ignore[attr-defined]
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    text = "# peerkit test configuration\n" + yaml.safe_dump(data, sort_keys=False)
    inst.user.write_file(inst.config_path, text.encode("utf-8"), mode=0o600)


def edit_peer(inst: harness.PeerkitInstance, peer: str, **changes: Any) -> dict:
    """As the owner, change keys of a peer's config_json (None deletes); return the old config."""
    script = r'''
import json, sqlite3, sys
db, name, changes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
con = sqlite3.connect(db)
with con:
    (text,) = con.execute("SELECT config_json FROM peers WHERE name = ?", (name,)).fetchone()
    config = json.loads(text)
    print(text)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    con.execute("UPDATE peers SET config_json = ? WHERE name = ?", (json.dumps(config, sort_keys=True), name))
'''
    proc = inst.user.run([sys.executable, "-c", script, str(inst.db_path), peer, json.dumps(changes)],
                         text=True, check=True)
    return json.loads(proc.stdout)


def set_peer_config(inst: harness.PeerkitInstance, peer: str, config: dict) -> None:
    """Put back a whole config_json saved by edit_peer."""
    current = edit_peer(inst, peer)
    edit_peer(inst, peer, **{k: None for k in current if k not in config}, **config)


def peer_row(inst: harness.PeerkitInstance, name: str) -> dict:
    [row] = [p for p in peerkit(inst, "peers").result["peers"] if p["name"] == name]
    return row


def fresh_key_line(tmp_path: Path, kind: str = "ed25519") -> tuple[str, str]:
    """(public key line, SHA256 fingerprint) of a key no sshd here has."""
    key = tmp_path / f"other-host-key-{secrets.token_hex(4)}"
    harness.run_root(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)])
    pub = key.with_name(key.name + ".pub")
    fp = harness.run_root(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)]).stdout.split()[1]
    return " ".join(pub.read_text().split()[:2]), fp


# -- the src / dst pair and its stand-in forced command ------------------------------------

_STANDIN = r'''#!/bin/sh
# Stand-in for peer-shell (integration tests): "stream-app <slug>" is served
# by sourcing streams/<slug> when the test left one; everything else, and
# every slug without a script, goes to the real peer-shell with the forced
# arguments.  Scripts write archive bytes through `send` (zstd-compressed
# when the client asked for "stream-app <slug> --zstd").
dir=@DIR@
send() { if [ -n "$zstd" ]; then zstd -q -c; else cat; fi; }
case "$SSH_ORIGINAL_COMMAND" in
"stream-app "*)
    rest=${SSH_ORIGINAL_COMMAND#stream-app }
    slug=${rest%" --zstd"}
    zstd=; [ "$slug" = "$rest" ] || zstd=1
    case "$slug" in
    *[!a-z0-9-]*|"") ;;
    *) if [ -f "$dir/streams/$slug" ]; then . "$dir/streams/$slug"; exit 99; fi ;;
    esac ;;
esac
exec @PEER_SHELL@ "$@"
'''

_HOOK = r'''#!/bin/sh
# Logs "<hook> $PEERKIT_APP $PEERKIT_APP_DIR $PEERKIT_PEER"; fails when the app
# it runs on carries FAIL_<HOOK>.
echo "$1 $PEERKIT_APP $PEERKIT_APP_DIR $PEERKIT_PEER" >> @LOG@
case "$1" in
stop) [ -e "$PEERKIT_APP_DIR/FAIL_STOP" ] && exit 1 ;;
start) [ -e "$PEERKIT_APP_DIR/FAIL_START" ] && exit 1 ;;
esac
exit 0
'''


class PullPair:
    """``dst`` pulls from ``src`` through the stand-in forced command."""

    def __init__(self, src: harness.PeerkitInstance, dst: harness.PeerkitInstance) -> None:
        self.src, self.dst = src, dst
        self.dir = src.user.home / "standin"
        self.hook_log = dst.user.home / "hooks.log"
        self.hook = dst.user.home / "hook.sh"

    @property
    def peer(self) -> str:
        """The name dst knows src by."""
        return self.src.name

    def setup(self) -> None:
        src, dst = self.src, self.dst
        for sub in ("", "streams", "payloads", "marks"):
            src.user.run(["mkdir", "-p", "-m", "755", str(self.dir / sub)], check=True)
        standin = self.dir / "peer-shell-standin"
        src.user.write_file(standin, _STANDIN.replace("@DIR@", str(self.dir))
                            .replace("@PEER_SHELL@", str(src.peer_shell)).encode(), mode=0o755)
        # Swap the forced command of dst's key line, keeping every option
        # (sshd only: serve would refuse a line whose command is not peer-shell).
        lines = src.authorized_keys.read_text().splitlines()
        marker = f" peerkit:{dst.name}"
        [i] = [n for n, line in enumerate(lines) if line.endswith(marker)]
        prefix = f'command="{src.peer_shell} '
        assert lines[i].startswith("restrict,") and prefix in lines[i], lines[i]
        if src.server.kind == "sshd":
            lines[i] = lines[i].replace(prefix, f'command="{standin} ', 1)
            src.user.write_file(src.authorized_keys, ("\n".join(lines) + "\n").encode(), mode=0o600)
        dst.user.write_file(self.hook, _HOOK.replace("@LOG@", str(self.hook_log)).encode(), mode=0o755)
        src.baseline = copy.deepcopy(src.settings)  # type: ignore[attr-defined]
        src.baseline["domain"] = SOURCE_DOMAIN  # type: ignore[attr-defined]
        write_config(src)
        dst.baseline = copy.deepcopy(dst.settings)  # type: ignore[attr-defined]
        dst.baseline["hooks"].update(  # type: ignore[attr-defined]
            stop=[str(self.hook), "stop"], start=[str(self.hook), "start"],
            post_restore=[str(self.hook), "post_restore"])
        write_config(dst)

    # -- apps on either side -------------------------------------------------------

    def source_app(self, slug: str, spec: dict[str, Any]) -> Path:
        path = self.src.apps_dir / slug
        make_tree(path, spec, self.src.user)
        return path

    def local_app(self, slug: str, spec: dict[str, Any]) -> Path:
        path = self.dst.apps_dir / slug
        make_tree(path, spec, self.dst.user, mtime=MTIME + 1000)
        return path

    # -- what stream-app <slug> does -------------------------------------------------

    def payload(self, name: str, data: bytes) -> Path:
        path = self.dir / "payloads" / f"{name}.tar"
        self.src.user.write_file(path, data, mode=0o644)
        return path

    def stream_script(self, slug: str, body: str) -> None:
        assert _SLUG_OK.fullmatch(slug)
        self.src.user.write_file(self.dir / "streams" / slug, body.encode(), mode=0o644)

    def mark(self, name: str) -> Path:
        return self.dir / "marks" / name

    def real_archive(self, slug: str) -> bytes:
        """What the real peer-shell streams for src's app ``slug`` (tar run as src's owner)."""
        from peerkit.apps import tar_command

        return self.src.user.run(tar_command(self.src.apps_dir / slug), check=True).stdout

    def hook_lines(self, app: str | None = None) -> list[str]:
        try:
            lines = self.hook_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if app is None or line.split()[1] == app]

    def pull(self, slug: str, *flags: str, env: dict[str, str] | None = None) -> Run:
        return peerkit(self.dst, "pull", self.peer, slug, *flags, env=env)

    def start_pull(self, slug: str, *flags: str, env: dict[str, str] | None = None) -> Background:
        return Background(self.dst, "pull", self.peer, slug, *flags, env=env)


@pytest.fixture(scope="module")
def pp(users, servers, venv_bin) -> PullPair:
    src = harness.PeerkitInstance(users["pull-src"], "site-pull-src", servers.for_role("pull-src"), venv_bin).init()
    dst = harness.PeerkitInstance(users["pull-dst"], "site-pull-dst", servers.for_role("pull-dst"), venv_bin).init()
    harness.pair_both_ways(src, dst)
    pair = PullPair(src, dst)
    pair.setup()
    return pair


@pytest.fixture
def dst_config(pp):
    """Let a test change dst's config; the baseline comes back afterwards."""
    yield lambda **sections: write_config(pp.dst, **sections)
    write_config(pp.dst)


def _small_app(tag: str) -> dict[str, Any]:
    return {"index.html": f"<h1>{tag}</h1>\n".encode(), "conf": None,
            "conf/app.ini": (f"name={tag}\n".encode(), 0o600), "data": None,
            "data/blob.bin": os.urandom(3000), "current": ("link", "data/blob.bin")}


# -- 1. end to end, both ways ------------------------------------------------------------

def _mixed_app(path: Path, owner: harness.ThrowawayUser, seed: int, big_size: int = 20 << 20,
               small_files: int = 2000) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)
    path.mkdir(parents=True)
    build_mixed_tree(path, big_size=big_size, small_files=small_files, seed=seed, other_owner=None)
    # build_mixed_tree gives "empty" 0o750 and "secret" 0o600; fixed mtimes survive the chown.
    as_owner(path, owner)


def _as_pulled_by(snap: dict, user: harness.ThrowawayUser) -> dict:
    """The snapshot with owners as a non-root puller gets them: all its own."""
    return {rel: {**rec, "uid": user.uid, "gid": user.gid} for rel, rec in snap.items()}


@pytest.fixture
def e2e_apps(paired):
    """Remove what the end-to-end test leaves on alpha and beta (the other module lists their apps)."""
    alpha, beta = paired
    yield
    for inst in (alpha, beta):
        for slug in ("e2e-from-alpha", "e2e-from-beta"):
            for path in (inst.apps_dir / slug, backups_dir(inst) / slug):
                shutil.rmtree(path, ignore_errors=True)


def _check_progress_then_result(run: Run, big: int, files: int) -> dict:
    result = assert_pulled(run)
    progress = [line for line in run.lines[:-1] if line.get("event") == "progress"]
    assert progress, run.why()
    assert all(line == {"event": "progress", "stage": "transfer", "bytes": line["bytes"],
                        "total": line["total"]} for line in progress), progress
    done = [line["bytes"] for line in progress]
    assert done == sorted(done) and done[0] > 0 and done[-1] <= result["bytes"]
    # The total is null until the listing gives the app's size (a transfer
    # started alongside the ping can report before that), then one number.
    totals = [line["total"] for line in progress]
    known = [t for t in totals if t is not None]
    assert totals == [None] * (len(totals) - len(known)) + known, totals
    assert known and len(set(known)) == 1 and known[0] > big
    # Nothing but progress events before the result line.
    assert len(progress) == len(run.lines) - 1, run.lines
    assert result["bytes"] > big and result["files"] > files
    return result


def test_pull_end_to_end_both_ways(paired, e2e_apps):
    alpha, beta = paired
    from_alpha = alpha.apps_dir / "e2e-from-alpha"
    from_beta = beta.apps_dir / "e2e-from-beta"
    _mixed_app(from_alpha, alpha.user, seed=1)
    # The way back proves symmetry; the full-size tree goes one way (time).
    _mixed_app(from_beta, beta.user, seed=2, big_size=2 << 20, small_files=300)
    source_a, source_b = snapshot(from_alpha), snapshot(from_beta)
    # The tree has what the test claims to cover.
    assert source_a["empty"]["mode"] == 0o750 and source_a["secret"]["mode"] == 0o600
    assert source_a["big.bin"]["size"] == 20 << 20 and source_a["links/up"]["type"] == "symlink"
    assert sum(1 for rel in source_a if rel.startswith("many/")) > 2000
    assert "ünïcödé/日本語/ファイル 名.txt" in source_a and "dir with space/file with space.txt" in source_a

    # beta pulls from alpha while alpha pulls from beta.
    with ThreadPoolExecutor(2) as pool:
        fut_b = pool.submit(peerkit, beta, "pull", alpha.name, "e2e-from-alpha")
        fut_a = pool.submit(peerkit, alpha, "pull", beta.name, "e2e-from-beta")
        run_b, run_a = fut_b.result(), fut_a.result()

    for run, puller, slug, source, big, files in (
            (run_b, beta, "e2e-from-alpha", source_a, 20 << 20, 2000),
            (run_a, alpha, "e2e-from-beta", source_b, 2 << 20, 300)):
        result = _check_progress_then_result(run, big, files)
        assert result["app"] == slug and result["backup"] is None and result["rewritten"] == []
        assert run.outcomes() == [
            ("lock", "ok"), ("ping", "ok"), ("inventory", "ok"), ("backup", "skipped"),
            ("transfer", "ok"), ("verify", "ok"), ("flush", "ok"), ("stop", "skipped"), ("swap", "ok"),
            ("rewrite", "skipped"), ("start", "ok"), ("post_restore", "ok")], run.why()
        pulled = snapshot(puller.apps_dir / slug)
        assert diff(_as_pulled_by(source, puller.user), pulled) == []
        assert inode_groups(puller.apps_dir / slug) == [["a/hard.txt", "top.txt"]]
        assert leftovers(puller) == []

    # A second pull over the existing copy: pre-backup, then the old tree is gone.
    local = beta.apps_dir / "e2e-from-alpha"
    (local / "local-only.txt").write_bytes(b"made on beta\n")
    os.chown(local / "local-only.txt", beta.user.uid, beta.user.gid)
    run = peerkit(beta, "pull", alpha.name, "e2e-from-alpha")
    result = _check_progress_then_result(run, 20 << 20, 2000)
    stages = run.stages
    assert [n for n, _ in run.outcomes()] == [
        "lock", "ping", "inventory", "backup", "transfer", "verify", "flush", "stop", "swap", "rewrite",
        "start", "post_restore", "cleanup"]
    assert all(stages[n]["outcome"] == "ok" for n in ("backup", "stop", "swap", "cleanup"))
    [archive] = sorted((backups_dir(beta) / "e2e-from-alpha").iterdir())
    assert result["backup"] == str(archive)
    assert re.fullmatch(r"\d{8}T\d{6}Z-pre-pull\.tar\.zst", archive.name), archive.name
    listing = harness.run_root(["tar", "--zstd", "-tf", str(archive)]).stdout.splitlines()
    assert "e2e-from-alpha/local-only.txt" in listing and "e2e-from-alpha/big.bin" in listing
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600 and archive.stat().st_uid == beta.user.uid
    assert not (local / "local-only.txt").exists()
    assert diff(_as_pulled_by(source_a, beta.user), snapshot(local)) == []
    assert leftovers(beta) == [] and leftovers(alpha) == []


# -- 2. hostile archives ---------------------------------------------------------------------

# Each crafted archive costs a whole pull (CLI, SSH, two peer-shells): a
# spread over every kind of attack by default, every case of tarcraft.py
# with PEERKIT_IT_ALL_HOSTILE=1 (about twice the time).
HOSTILE_SPREAD = (
    "dotdot_escape", "dotdot_inner", "absolute_path",
    "symlink_write_through", "symlink_escape_write_through", "symlink_chain", "symlink_absolute",
    "symlink_relative_escape", "hardlink_outside", "hardlink_absolute", "hardlink_to_symlink",
    "char_device", "block_device", "fifo", "setuid_file", "huge_size", "bad_checksum",
    "pax_path_dotdot", "pax_linkpath_escape", "gnu_longname_traversal", "dot_symlink",
    "duplicate_file_over_symlink", "member_after_lone_zero_block", "truncated_data", "missing_eoa",
)
HOSTILE = sorted(tarcraft.HOSTILE_CASES) if os.environ.get("PEERKIT_IT_ALL_HOSTILE") == "1" \
    else list(HOSTILE_SPREAD)
_SENTINEL = b"the sentinel beside the staging directory\n"
_VICTIM = b"a file outside the app\n"


def _hostile_slug(case: str) -> str:
    return "h-" + case.replace("_", "-")


@dataclass
class HostileOutcome:
    run: Run
    before: dict
    after: dict


@pytest.fixture(scope="module")
def hostile_outcomes(pp) -> dict[str, HostileOutcome]:
    """Pull every crafted archive of tests/tarcraft.py (a few at a time) over a known local app.

    The crafted archives aim at ``../sentinel`` and ``../outside`` relative to
    the staging directory, i.e. dst's apps_dir, and at tarcraft.ABSOLUTE_VICTIMS.
    """
    dst = pp.dst
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        if os.path.lexists(victim):  # a leftover of an earlier broken run
            os.unlink(victim)
    dst.apps_dir.mkdir(parents=True, exist_ok=True)
    (dst.apps_dir / tarcraft.SENTINEL).write_bytes(_SENTINEL)
    (dst.apps_dir / tarcraft.OUTSIDE).mkdir(exist_ok=True)
    (dst.apps_dir / tarcraft.OUTSIDE / "victim").write_bytes(_VICTIM)
    as_owner(dst.apps_dir / tarcraft.SENTINEL, dst.user)
    as_owner(dst.apps_dir / tarcraft.OUTSIDE, dst.user)

    befores = {}
    for case in HOSTILE:
        slug = _hostile_slug(case)
        pp.source_app(slug, {"README": b"the real app, never sent\n"})
        befores[case] = snapshot(pp.local_app(slug, _small_app(case)))
        payload = pp.payload(slug, tarcraft.HOSTILE_CASES[case]())
        pp.stream_script(slug, f"send < {payload}\nexit 0\n")

    def one(case: str) -> HostileOutcome:
        run = pp.pull(_hostile_slug(case), "--no-pre-backup")
        return HostileOutcome(run, befores[case], snapshot(dst.apps_dir / _hostile_slug(case)))

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(HOSTILE, pool.map(one, HOSTILE)))


@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archive_changes_nothing(pp, hostile_outcomes, case):
    outcome = hostile_outcomes[case]
    slug = _hostile_slug(case)
    assert_failed(outcome.run, tarcraft.EXPECTED_ERROR[case])
    # The local app is byte-identical and nothing is left beside it.
    assert diff(outcome.before, outcome.after) == []
    assert leftovers(pp.dst) == []  # every pull of the batch is over
    # The escape targets are untouched, the absolute ones were never created.
    assert (pp.dst.apps_dir / tarcraft.SENTINEL).read_bytes() == _SENTINEL
    assert sorted(os.listdir(pp.dst.apps_dir / tarcraft.OUTSIDE)) == ["victim"]
    assert (pp.dst.apps_dir / tarcraft.OUTSIDE / "victim").read_bytes() == _VICTIM
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        assert not os.path.lexists(victim), victim
    # It failed in the transfer, before any hook: the stop hook never ran.
    stages = outcome.run.stages
    failed = [name for name, st in stages.items() if st["outcome"] == "failed"]
    assert failed and failed[0] in ("transfer", "verify"), outcome.run.outcomes()
    assert not {"stop", "swap", "start"} & set(stages), outcome.run.outcomes()
    assert pp.hook_lines(slug) == []


def test_archive_over_the_size_cap_is_refused(pp, dst_config):
    # The real peer-shell streams a real app, just larger than the puller's hard cap.
    pp.source_app("big-app", {"data.bin": os.urandom(300 << 10), "readme": b"big\n"})
    before = snapshot(pp.local_app("big-app", _small_app("big")))
    dst_config(limits={"max_app_bytes": 128 << 10})
    run = pp.pull("big-app")
    assert_failed(run, "unsafe-archive")
    assert "limit" in run.result["message"]
    assert diff(before, snapshot(pp.dst.apps_dir / "big-app")) == []
    assert leftovers(pp.dst) == []
    assert pp.hook_lines("big-app") == []
    # With the default cap the same app arrives.
    dst_config()
    assert_pulled(pp.pull("big-app", "--no-pre-backup"))
    assert diff(_as_pulled_by(snapshot(pp.src.apps_dir / "big-app"), pp.dst.user),
                snapshot(pp.dst.apps_dir / "big-app")) == []


@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
def test_a_stream_larger_than_advertised_is_refused_when_it_started_before_the_listing(pp):
    # The transfer starts with the ping, held only to max_app_bytes until
    # list-apps gives the size; then to that size plus the 64 MiB margin.
    slug = "liar-app"
    pp.source_app(slug, {"small.txt": b"what list-apps measures\n"})
    big = 80 << 20

    class Zeros:
        def __init__(self) -> None:
            self.left = big

        def read(self, n: int = -1) -> bytes:
            n = self.left if n < 0 else min(n, self.left)
            self.left -= n
            return bytes(n)

    buf = pp.dir / "liar.tar"
    with tarfile.open(buf, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size, info.mode = big, 0o644
        tf.addfile(info, Zeros())
    os.chmod(buf, 0o644)
    pp.stream_script(slug, f"cat {buf} | send\n")
    before = snapshot(pp.local_app(slug, _small_app("old")))
    assert peerkit(pp.dst, "ping", pp.peer).returncode == 0
    run = pp.pull(slug, "--no-pre-backup")
    assert_failed(run, "unsafe-archive")
    assert "limit" in run.result["message"], run.result
    assert any("alongside the ping" in n for n in run.result["notes"]), run.result["notes"]
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    buf.unlink()


# -- 3. cut transfers --------------------------------------------------------------------------

def _valid_archive(pp: PullPair, slug: str, size: int = 256 << 10) -> bytes:
    pp.source_app(slug, {"a.bin": os.urandom(size), "b.txt": b"b\n" * 1000, "dir": None,
                         "dir/c.txt": b"c\n"})
    return pp.real_archive(slug)


@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
@pytest.mark.parametrize("how", ["half-then-exit-0", "all-then-exit-3", "half-then-killed"])
def test_cut_transfer_changes_nothing(pp, how):
    slug = f"cut-{how}"
    data = _valid_archive(pp, slug)
    payload = pp.payload(slug, data)
    half = len(data) // 2
    pidfile = pp.mark(f"{slug}.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    pp.stream_script(slug, {
        "half-then-exit-0": f"head -c {half} {payload} | send\nexit 0\n",
        "all-then-exit-3": f"send < {payload}\nexit 3\n",
        # Half, then hang (until stdin closes) until the test kills it.
        "half-then-killed": f"echo $$ > {pidfile}\nhead -c {half} {payload} | send\nexec cat >/dev/null\n",
    }[how])
    before = snapshot(pp.local_app(slug, _small_app(slug)))

    if how == "half-then-killed":
        bg = pp.start_pull(slug, "--no-pre-backup")
        bg.wait_for_line(lambda obj: obj.get("event") == "progress" and obj["bytes"] > 0)
        assert harness.wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10)
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        run = bg.finish()
    else:
        run = pp.pull(slug, "--no-pre-backup")

    assert_failed(run, "transfer-incomplete")
    # Every byte that came was accepted; the end of the stream gave it away.
    assert run.outcomes()[-2:] == [("transfer", "ok"), ("verify", "failed")], run.why()
    if how != "all-then-exit-3":
        assert 0 < run.result["bytes"] < len(data), run.why()
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    assert pp.hook_lines(slug) == []


# -- 6. hooks --------------------------------------------------------------------------------------

def _hook_line(pp: PullPair, hook: str, slug: str) -> str:
    return f"{hook} {slug} {pp.dst.apps_dir / slug} {pp.peer}"


def test_hooks_run_in_order_with_the_app_environment(pp):
    slug = "hooked"
    source = snapshot(pp.source_app(slug, _small_app("new")))
    pp.local_app(slug, _small_app("old"))
    run = pp.pull(slug)
    result = assert_pulled(run)
    assert pp.hook_lines(slug) == [_hook_line(pp, h, slug) for h in ("stop", "start", "post_restore")]
    assert [(h["hook"], h["exit_status"]) for h in result["hooks"]] == [
        ("stop", 0), ("start", 0), ("post_restore", 0)]
    assert all(run.stages[s]["outcome"] == "ok" for s in ("stop", "swap", "start", "post_restore", "cleanup"))
    assert diff(_as_pulled_by(source, pp.dst.user), snapshot(pp.dst.apps_dir / slug)) == []


def test_failing_start_hook_rolls_back_to_the_previous_app(pp):
    slug = "bad-start"
    pp.source_app(slug, {**_small_app("new"), "FAIL_START": b""})
    before = snapshot(pp.local_app(slug, _small_app("old")))
    run = pp.pull(slug)
    assert_failed(run, "hook-failed")
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    # stop (old), start (new: fails), start again (old, the rollback).
    assert pp.hook_lines(slug) == [_hook_line(pp, h, slug) for h in ("stop", "start", "start")]
    assert [(n, o) for n, o in run.outcomes() if n in ("stop", "swap", "start", "rollback")] == [
        ("stop", "ok"), ("swap", "ok"), ("start", "failed"), ("rollback", "ok")]
    assert "post_restore" not in run.stages
    assert [(h["hook"], h["exit_status"]) for h in run.result["hooks"]] == [
        ("stop", 0), ("start", 1), ("start", 0)]


def test_failing_stop_hook_changes_nothing(pp):
    slug = "bad-stop"
    pp.source_app(slug, _small_app("new"))
    before = snapshot(pp.local_app(slug, {**_small_app("old"), "FAIL_STOP": b""}))
    run = pp.pull(slug)
    assert_failed(run, "hook-failed")
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    assert run.stages["stop"]["outcome"] == "failed" and "swap" not in run.stages
    # The app the stop hook tried to stop is started again.
    assert pp.hook_lines(slug) == [_hook_line(pp, h, slug) for h in ("stop", "start")]


def test_failing_start_hook_on_a_first_pull_leaves_no_app(pp):
    slug = "first-bad-start"
    pp.source_app(slug, {**_small_app("new"), "FAIL_START": b""})
    assert not os.path.lexists(pp.dst.apps_dir / slug)
    run = pp.pull(slug)
    assert_failed(run, "hook-failed")
    assert not os.path.lexists(pp.dst.apps_dir / slug)
    assert leftovers(pp.dst) == []
    assert run.stages["stop"]["outcome"] == "skipped" and run.stages["rollback"]["outcome"] == "ok"
    assert pp.hook_lines(slug) == [_hook_line(pp, "start", slug)]


# -- 7. URL rewrite ----------------------------------------------------------------------------

def test_url_rewrite_repoints_config_files_only(pp, dst_config):
    slug = "web"
    binary = b"\x00\x01ELF" + SOURCE_DOMAIN.encode() + b"\x00" * 64
    pp.source_app(slug, {
        ".env": (f"URL=https://{SOURCE_DOMAIN}/\nMAIL=admin@{SOURCE_DOMAIN}\nOTHER=my{SOURCE_DOMAIN}\n".encode(), 0o600),
        "docker-compose.yml": (f"services:\n  web:\n    environment:\n      HOST: cloud.{SOURCE_DOMAIN}\n".encode(), 0o640),
        "config": None,
        "config/app.env": (f"BASE=http://{SOURCE_DOMAIN}\n".encode(), 0o644),
        "blob.bin": (binary, 0o644),
        "binary.env": (binary, 0o644),
        "notes.txt": (f"see {SOURCE_DOMAIN}\n".encode(), 0o644),
    })
    source = _as_pulled_by(snapshot(pp.src.apps_dir / slug), pp.dst.user)
    dst_config(domain=TARGET_DOMAIN)
    run = pp.pull(slug)
    result = assert_pulled(run)
    assert run.stages["rewrite"]["outcome"] == "ok"
    assert result["rewritten"] == [".env", "config/app.env", "docker-compose.yml"]
    app = pp.dst.apps_dir / slug
    assert (app / ".env").read_text() == (f"URL=https://{TARGET_DOMAIN}/\nMAIL=admin@{TARGET_DOMAIN}\n"
                                         f"OTHER=my{SOURCE_DOMAIN}\n")
    assert f"HOST: cloud.{TARGET_DOMAIN}\n" in (app / "docker-compose.yml").read_text()
    assert (app / "config/app.env").read_text() == f"BASE=http://{TARGET_DOMAIN}\n"
    got = snapshot(app)
    for rel in (".env", "docker-compose.yml", "config/app.env"):
        assert (got[rel]["mode"], got[rel]["uid"]) == (source[rel]["mode"], pp.dst.user.uid), rel
    # Binary files and files outside the globs keep every byte.
    for rel in ("blob.bin", "binary.env", "notes.txt"):
        assert got[rel] == source[rel], rel

    # --keep-urls: the app arrives exactly as sent.
    run = pp.pull(slug, "--keep-urls")
    result = assert_pulled(run)
    assert result["rewritten"] == []
    assert run.stages["rewrite"] == {**run.stages["rewrite"], "outcome": "skipped", "detail": "--keep-urls"}
    assert diff(source, snapshot(app)) == []


# -- 8. one transfer per app -----------------------------------------------------------------

@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
def test_second_pull_of_the_same_app_is_busy(pp):
    slug = "busy-app"
    source = snapshot(pp.source_app(slug, _small_app("new")))
    pp.local_app(slug, _small_app("old"))
    started, release = pp.mark(f"{slug}.started"), pp.mark(f"{slug}.release")
    for path in (started, release):
        if path.exists():
            path.unlink()
    # The source holds back (at most 30 s) until the test releases it, then
    # the real peer-shell streams the app.
    pp.stream_script(slug, f"touch {started}\nn=0\nwhile [ ! -e {release} ] && [ $n -lt 600 ]; do "
                           f"sleep 0.05; n=$((n + 1)); done\nexec {pp.src.peer_shell} \"$@\"\n")
    first = pp.start_pull(slug)
    try:
        assert harness.wait_until(started.exists, 20), "the first pull never reached stream-app"
        second = pp.pull(slug)
        assert first.proc.poll() is None, "the first pull should still be waiting for data"
        assert_failed(second, "busy")
        assert second.outcomes() == [("lock", "failed")]
        assert second.seconds < 5, second.seconds
    finally:
        release.touch()
        run = first.finish()
    assert_pulled(run)
    assert diff(_as_pulled_by(source, pp.dst.user), snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []


# -- 9. SIGTERM during the transfer ------------------------------------------------------------

@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
def test_sigterm_during_the_transfer_leaves_the_app_unchanged(pp):
    slug = "slow-app"
    data = _valid_archive(pp, slug, size=1 << 20)
    payload = pp.payload(slug, data)
    # Half the archive, then nothing until the client hangs up.
    pp.stream_script(slug, f"head -c {len(data) // 2} {payload} | send\nexec cat >/dev/null\n")
    before = snapshot(pp.local_app(slug, _small_app("old")))
    bg = pp.start_pull(slug)
    bg.wait_for_line(lambda obj: obj.get("event") == "progress" and obj["bytes"] > 0)
    assert [n for n in leftovers(pp.dst) if slug in n], "the pull should be writing its staging copy"
    bg.proc.send_signal(signal.SIGTERM)
    run = bg.finish(timeout=20)
    assert_failed(run, "interrupted")
    # The transfer starts alongside the ping (the pair pinged before), so the
    # signal lands in whichever stage waits meanwhile: always before the swap.
    failed = [name for name, stage in run.stages.items() if stage["outcome"] == "failed"]
    assert len(failed) == 1 and failed[0] in ("ping", "inventory", "backup", "transfer"), run.stages
    assert "swap" not in run.stages
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    assert pp.hook_lines(slug) == []


# -- 9b. through `peerkit agent` -----------------------------------------------------------------

@pytest.fixture
def dst_agent(pp):
    """`peerkit agent` as dst's owner; PEERKIT_AGENT in a pull's env hands the pull to it."""
    user = pp.dst.user
    run_dir = private_dir(user.home / "agent-run", user.uid, user.gid)
    with AgentProcess(run_dir / "agent.sock", argv=[str(pp.dst.peerkit), "agent"], popen=user.popen,
                      env=user.env(extra_path=[pp.dst.bin_dir])) as agent:
        agent.env = {"PEERKIT_AGENT": str(agent.socket)}  # type: ignore[attr-defined]
        yield agent


@pytest.mark.servers("sshd", reason="the agent is local to the puller; once is enough (time)")
def test_pulls_through_the_agent_run_hooks_and_land_as_direct_pulls_do(pp, dst_agent):
    slug = "via-agent"
    source = snapshot(pp.source_app(slug, _small_app("new")))
    pp.local_app(slug, _small_app("old"))
    run = pp.pull(slug, env=dst_agent.env)
    result = assert_pulled(run)
    assert pp.hook_lines(slug) == [_hook_line(pp, h, slug) for h in ("stop", "start", "post_restore")]
    assert [(h["hook"], h["exit_status"]) for h in result["hooks"]] == [
        ("stop", 0), ("start", 0), ("post_restore", 0)]
    assert diff(_as_pulled_by(source, pp.dst.user), snapshot(pp.dst.apps_dir / slug)) == []
    # Then an incremental pull of a change, through the agent too.
    (pp.src.apps_dir / slug / "index.html").write_bytes(b"<h1>changed</h1>\n")
    changed = snapshot(pp.src.apps_dir / slug)
    assert_pulled(pp.pull(slug, "--incremental", "--no-pre-backup", env=dst_agent.env))
    assert diff(_as_pulled_by(changed, pp.dst.user), snapshot(pp.dst.apps_dir / slug)) == []
    assert [(command, outcome) for _pid, command, outcome in dst_agent.wait_workers(2)] == [
        ("pull", "exit 0"), ("pull", "exit 0")]
    assert leftovers(pp.dst) == []


@pytest.mark.servers("sshd", reason="the stream comes from the stand-in forced command, which only sshd runs")
@pytest.mark.parametrize("how", ["SIGTERM to the caller", "the caller killed"])
def test_stopping_a_pull_run_by_the_agent_leaves_the_app_unchanged(pp, dst_agent, how):
    slug = "slow-agent-app"
    data = _valid_archive(pp, slug, size=1 << 20)
    payload = pp.payload(slug, data)
    pp.stream_script(slug, f"head -c {len(data) // 2} {payload} | send\nexec cat >/dev/null\n")
    before = snapshot(pp.local_app(slug, _small_app("old")))
    bg = pp.start_pull(slug, env=dst_agent.env)
    bg.wait_for_line(lambda obj: obj.get("event") == "progress" and obj["bytes"] > 0)
    if how == "SIGTERM to the caller":
        bg.proc.send_signal(signal.SIGTERM)  # passed on to the worker
        assert_failed(bg.finish(timeout=20), "interrupted")
    else:
        bg.proc.kill()  # the agent sees the connection close and sends the worker SIGTERM
        bg.finish(timeout=20)
    [(_pid, command, outcome)] = dst_agent.wait_workers(1)
    assert (command, outcome) == ("pull", "exit 130")
    assert diff(before, snapshot(pp.dst.apps_dir / slug)) == []
    assert leftovers(pp.dst) == []
    assert pp.hook_lines(slug) == []


# -- 10. restic pre-backup ---------------------------------------------------------------------

@pytest.mark.servers("sshd", reason="the pre-backup is local to the puller; once is enough (time)")
def test_restic_pre_backup(pp, dst_config):
    dst = pp.dst
    repo, password = dst.user.home / "restic-repo", dst.user.home / "restic-password"
    dst.user.write_file(password, b"correct horse battery staple\n", mode=0o600)
    env = dst.user.env(RESTIC_REPOSITORY=str(repo), RESTIC_PASSWORD_FILE=str(password))
    if not repo.exists():
        dst.user.run(["restic", "init"], env=env, check=True, timeout=60)
    slug = "restic-app"
    source = snapshot(pp.source_app(slug, _small_app("new")))
    live = pp.local_app(slug, _small_app("old"))

    dst_config(hooks={"pre_backup": "restic"},
               restic={"repository": str(repo), "password_file": str(password)})
    run = pp.pull(slug)
    result = assert_pulled(run)
    assert run.stages["backup"]["outcome"] == "ok"
    # restic 0.14 reports the short id in its summary, later versions the full one.
    assert re.fullmatch(r"restic:[0-9a-f]{8,64}", result["backup"]), result["backup"]
    snapshots = json.loads(dst.user.run(["restic", "snapshots", "--json"], env=env, check=True,
                                        text=True).stdout)
    [snap] = [s for s in snapshots if s["id"].startswith(result["backup"].split(":", 1)[1])]
    assert {"peerkit", "pre-pull"} <= set(snap["tags"]) and snap["paths"] == [str(live)]
    assert diff(_as_pulled_by(source, dst.user), snapshot(live)) == []

    # A repository that does not exist: the backup fails and nothing changes.
    before = snapshot(live)
    dst_config(hooks={"pre_backup": "restic"},
               restic={"repository": str(dst.user.home / "no-such-repo"), "password_file": str(password)})
    run = pp.pull(slug)
    assert_failed(run, "backup-failed")
    assert run.outcomes()[-1] == ("backup", "failed") and "transfer" not in run.stages
    assert diff(before, snapshot(live)) == []
    assert leftovers(dst) == []
    assert not (dst.user.home / "no-such-repo").exists()


# -- 4 and 5. host keys and ping statuses (client -> target) -------------------------------------

@dataclass
class PingPair:
    target: harness.PeerkitInstance
    client: harness.PeerkitInstance

    def audit_lines(self) -> int:
        return len(self.target.audit_events())

    def ping(self) -> Run:
        return peerkit(self.client, "ping", self.target.name)

    def status(self) -> dict:
        return peer_row(self.client, self.target.name)


@pytest.fixture(scope="module")
def ping_pair(users, servers, venv_bin) -> PingPair:
    target = harness.PeerkitInstance(users["ping-src"], "site-ping-src", servers.for_role("ping-src"), venv_bin).init()
    client = harness.PeerkitInstance(users["ping-dst"], "site-ping-dst", servers.for_role("ping-dst"), venv_bin).init()
    harness.pair_both_ways(target, client)
    pair = PingPair(target, client)
    run = pair.ping()  # records the host key the v2 token pinned
    assert run.returncode == 0, run.why()
    pair.client_token = client.token()  # type: ignore[attr-defined]
    pair.saved = edit_peer(client, target.name)  # type: ignore[attr-defined]
    assert pair.saved.get("host_key")  # type: ignore[attr-defined]
    return pair


@pytest.fixture
def restore_pairing(ping_pair):
    """Give a test the v2 pairing (host key on record) and put it back afterwards."""
    pair = ping_pair
    yield pair
    if not any(p["name"] == pair.client.name for p in pair.target.peers()):
        pair.target.pair(pair.client_token)
    if not any(p["name"] == pair.target.name for p in pair.client.peers()):
        pair.client.pair(pair.target.token())
    set_peer_config(pair.client, pair.target.name, pair.saved)


def copy_peer(inst: harness.PeerkitInstance, peer: str, new_name: str, **changes: Any) -> None:
    """As the owner, add a copy of ``peer``'s row named ``new_name``, with config ``changes``."""
    inst.owner_sql(r'''
cols = [r[1] for r in con.execute("PRAGMA table_info(peers)")]
row = dict(zip(cols, con.execute("SELECT * FROM peers WHERE name = ?", (args[0],)).fetchone()))
row["name"] = args[1]
row["config_json"] = json.dumps({**json.loads(row["config_json"]), **json.loads(args[2])}, sort_keys=True)
con.execute(f"INSERT INTO peers ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", [row[c] for c in cols])
''', peer, new_name, json.dumps(changes))


def remove_peer_row(inst: harness.PeerkitInstance, name: str) -> None:
    """As the owner, delete a peer's row (only the row: what copy_peer added)."""
    inst.owner_sql('con.execute("DELETE FROM peers WHERE name = ?", (args[0],))', name)


def _no_new_audit_line(pair: PingPair, before: int) -> None:
    time.sleep(0.2)  # a session that did start would have logged by now
    assert pair.audit_lines() == before, pair.target.audit_events()[before:]


def test_host_key_mismatch_pinned_by_a_v2_token(restore_pairing, tmp_path):
    pair = restore_pairing
    peer = pair.target.name
    recorded = pair.status()
    assert recorded["host_key_fingerprints"] and recorded.get("host_key")
    other_key, other_fp = fresh_key_line(tmp_path)
    ecdsa_key, _ = fresh_key_line(tmp_path, "ecdsa")
    pins = recorded["host_key_fingerprints"]

    # (a) The token pinned other fingerprints (and nothing is recorded yet).
    edit_peer(pair.client, peer, host_key_fingerprints=[other_fp], host_key=None)
    # (b) The recorded host key is another key; (c) of a type this server has
    # none of (a mismatch too, not a failed key exchange).
    for changes in ({}, {"host_key_fingerprints": pins, "host_key": other_key},
                    {"host_key_fingerprints": pins, "host_key": ecdsa_key}):
        if changes:
            edit_peer(pair.client, peer, **changes)
        before = pair.audit_lines()
        run = pair.ping()
        assert_failed(run, "host-key-mismatch")
        assert pair.status()["status"] == "host-key-mismatch"
        run = peerkit(pair.client, "pull", peer, "some-app")
        assert_failed(run, "host-key-mismatch")
        assert run.outcomes() == [("lock", "ok"), ("ping", "failed")]
        _no_new_audit_line(pair, before)
        # Nothing was recorded from the impostor's side.
        assert pair.status().get("host_key") == changes.get("host_key")


def test_v1_token_records_the_host_key_on_first_use(restore_pairing, tmp_path):
    pair = restore_pairing
    peer = pair.target.name
    v1 = peerkit(pair.target, "token", "--format", "v1").result["token"]
    assert v1.startswith("lp-peer|v1|")
    pair.client.unpair(peer)
    pair.client.pair(v1)
    row = pair.status()
    assert row["host_key_fingerprints"] == [] and not row.get("host_key")

    first = pair.ping()
    assert first.returncode == 0, first.why()
    row = pair.status()
    assert row["host_key"] and row["status"] == "ok"
    fp = harness.run_root(["ssh-keygen", "-l", "-E", "sha256", "-f", "/dev/stdin"],
                          input=row["host_key"] + "\n").stdout.split()[1]
    assert fp in pair.target.server.host_key_fingerprints()
    assert "recorded" in first.stderr and fp in first.stderr, first.stderr
    assert first.stdout.count("\n") == 1  # the note is on stderr only

    second = pair.ping()
    assert second.returncode == 0 and "recorded" not in second.stderr, second.why()
    assert pair.status()["host_key"] == row["host_key"]

    other_key, _ = fresh_key_line(tmp_path)
    edit_peer(pair.client, peer, host_key=other_key)
    before = pair.audit_lines()
    run = pair.ping()
    assert_failed(run, "host-key-mismatch")
    assert pair.status()["status"] == "host-key-mismatch"
    _no_new_audit_line(pair, before)


def test_ping_all_answers_for_every_peer_and_records_each_status(restore_pairing):
    pair = restore_pairing
    peer = pair.target.name
    # A second peer: the same row, on a port where nothing listens.
    copy_peer(pair.client, peer, "nobody-home", port=harness.free_port())
    try:
        run = peerkit(pair.client, "ping", "--all")
        assert run.returncode == 1, run.why()  # not every peer answered
        results = {r["peer"]: r for r in run.result["peers"]}
        assert sorted(results) == sorted([peer, "nobody-home"]), run.why()
        assert results[peer]["ok"] is True and results[peer]["version"], run.why()
        assert results["nobody-home"]["ok"] is False and results["nobody-home"]["error"] == "peer-unreachable"
        assert pair.status()["status"] == "ok"
        assert peer_row(pair.client, "nobody-home")["status"] == "unreachable"
    finally:
        remove_peer_row(pair.client, "nobody-home")
    run = peerkit(pair.client, "ping", "--all")
    assert run.returncode == 0 and [r["peer"] for r in run.result["peers"]] == [peer], run.why()


def test_ping_statuses_ok_unreachable_refused(restore_pairing):
    pair = restore_pairing
    peer = pair.target.name
    run = pair.ping()
    assert run.returncode == 0 and run.result["ok"] is True, run.why()
    row = pair.status()
    assert row["status"] == "ok" and row["last_seen"]

    # Unreachable: nothing listens on the recorded port; fails fast.
    port = row["port"]
    edit_peer(pair.client, peer, port=harness.free_port())
    run = pair.ping()
    assert_failed(run, "peer-unreachable")
    assert run.seconds < 5, run.seconds
    assert pair.status()["status"] == "unreachable" and pair.status()["last_seen"] == row["last_seen"]
    edit_peer(pair.client, peer, port=port)

    # Refused: the target unpaired us.
    pair.target.unpair(pair.client.name)
    run = pair.ping()
    assert_failed(run, "refused")
    assert pair.status()["status"] == "refused"
    run = peerkit(pair.client, "pull", peer, "some-app")
    assert_failed(run, "refused")
