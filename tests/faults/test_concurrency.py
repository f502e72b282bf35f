"""Concurrency: pairing under contention, and two pulls of one app at once.

Pairing: 20 processes pair and unpair at the same moment (a barrier releases
them together), 10 rounds, each round a seeded mix over one instance whose
authorized_keys also holds other tools' lines (at the top and between
peerkit's): new pairings, revocations, idempotent re-pairings, two processes
revoking the same peer, two pairing one name with different keys.  After
every round: every line parses, each paired peer has exactly one line (none
lost, none doubled) and it is exactly the line its record implies, every
other line is byte-identical and in place, the file is 0600, no temporary
file is left, the database agrees, and each process's outcome is the one
its operation called for.  One more round runs 20 real `peerkit` commands.

Pulls: two `peerkit pull` of the same app started together, three times:
exactly one pulls, the other is refused at once (``busy``, 56), the app is
one complete version, the hooks ran once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import stat
import struct
import subprocess
import sys
import time
from collections import Counter

import pytest

from peerkit import pairing
from peerkit.authkeys import parse_line, render_line
from peerkit.config import read_config
from peerkit.errors import PeerkitError
from peerkit.keys import PublicKey
from peerkit.state import PeerStore
from peerkit.token import Token, emit_token
from tests.faults.common import SEED, Scenario, check, new_records, prepare
from tests.hostile.counts import COUNTS, scale
from tests.hostile.shellharness import PEER_SHELL, make_instance

PROCESSES = 20
ROUNDS = scale(10, 30)
HEAD = ("# keys managed by hand\n"
        'command="/usr/bin/rrsync -ro /srv/",no-pty ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@nas\n'
        "\n")
MIDDLE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF9hbGljZV9sYXB0b3Bfa2V5X2Zvcl90ZXN0cw admin@laptop"


def random_key(rng: random.Random) -> PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    seed = rng.randbytes(32)
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (b"ssh-ed25519", raw))
    return PublicKey("ssh-ed25519", blob, "")


def token(name: str, key: PublicKey) -> str:
    return emit_token(Token("v2", name, "peer", f"{name}.example.test", 22, key))


# -- the worker processes ----------------------------------------------------------------------

_BARRIER = None


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _worker(task: tuple[str, str, str]) -> str:
    op, cfg_path, arg = task
    cfg = read_config(cfg_path)
    _BARRIER.wait(timeout=120)  # every process starts its edit at the same moment
    try:
        if op == "pair":
            return pairing.pair(cfg, arg).outcome
        return "removed" if pairing.unpair(cfg, arg).key_removed else "row-only"
    except PeerkitError as exc:
        return exc.code


# -- one round ------------------------------------------------------------------------------------

class Ledger:
    """What authorized_keys and the database must say: the peers paired and with which key."""

    def __init__(self, cfg, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self.keys: dict[str, PublicKey] = {}
        self.serial = 0
        self.pending: dict[str, PublicKey] = {}
        self.contested: tuple[str, list[PublicKey]] = ("", [])

    def fresh_name(self) -> str:
        self.serial += 1
        return f"peer-{self.serial:03d}"

    def plan_round(self) -> list[tuple[str, str, str, set[str], str]]:
        """(op, arg, name, acceptable outcomes, group) for 20 processes."""
        paired = sorted(self.keys)
        rng = self.rng
        tasks = []
        for _ in range(8):
            name = self.fresh_name()
            key = random_key(rng)
            tasks.append(("pair", token(name, key), name, {"added"}, f"new:{name}"))
            self.pending[name] = key
        gone = rng.sample(paired, 7)
        for name in gone[:6]:
            tasks.append(("unpair", name, name, {"removed"}, f"unpair:{name}"))
        for _ in range(2):
            tasks.append(("unpair", gone[6], gone[6], {"removed", "no-such-peer"}, f"race-unpair:{gone[6]}"))
        for name in rng.sample([n for n in paired if n not in gone], 2):
            tasks.append(("pair", token(name, self.keys[name]), name, {"unchanged"}, f"again:{name}"))
        name = self.fresh_name()
        keys = [random_key(rng), random_key(rng)]
        for key in keys:
            tasks.append(("pair", token(name, key), name, {"added", "peer-exists"}, f"race-pair:{name}"))
        self.contested = (name, keys)
        rng.shuffle(tasks)
        return tasks

    def apply(self, tasks, outcomes: list[str]) -> None:
        groups: dict[str, list[str]] = {}
        for (op, arg, name, ok, group), outcome in zip(tasks, outcomes):
            assert outcome in ok, (op, name, outcome)
            groups.setdefault(group.split(":")[0] + ":" + name, []).append(outcome)
        for group, got in groups.items():
            kind = group.split(":")[0]
            if kind in ("race-unpair", "race-pair"):
                # Exactly one of the two wins.
                assert sorted(got) in (["no-such-peer", "removed"], ["added", "peer-exists"]), (group, got)
        for (op, arg, name, ok, group), outcome in zip(tasks, outcomes):
            if op == "pair" and outcome == "added":
                if name == self.contested[0]:
                    self.keys[name] = next(k for k in self.contested[1] if token(name, k) == arg)
                else:
                    self.keys[name] = self.pending.pop(name)
            elif op == "unpair" and outcome == "removed":
                del self.keys[name]
        self.pending = {}

    def expected_lines(self) -> dict[str, str]:
        return {name: render_line(name, key, PEER_SHELL, self.cfg.path) for name, key in self.keys.items()}

    def verify(self, where: str) -> None:
        cfg = self.cfg
        ak = cfg.ssh.authorized_keys
        text = ak.read_bytes().decode()
        lines = text.split("\n")
        assert text.endswith("\n"), where
        assert text.startswith(HEAD), f"{where}: the lines of other tools at the top changed"
        assert lines.count(MIDDLE) == 1, f"{where}: the other tool's line between peerkit's was lost or doubled"
        foreign = [line for line in lines if (entry := parse_line(line)) is None or entry.peer is None]
        assert foreign == HEAD.split("\n")[:-1] + [MIDDLE, ""], f"{where}: foreign lines {foreign}"
        ours = [line for line in lines if (entry := parse_line(line)) is not None and entry.peer is not None]
        counted = Counter(ours)
        assert all(n == 1 for n in counted.values()), f"{where}: doubled {[l for l, n in counted.items() if n > 1]}"
        assert set(ours) == set(self.expected_lines().values()), \
            f"{where}: lost {set(self.expected_lines().values()) - set(ours)}, extra {set(ours) - set(self.expected_lines().values())}"
        assert stat.S_IMODE(os.stat(ak).st_mode) == 0o600, where
        assert [p.name for p in ak.parent.iterdir() if p.name not in ("authorized_keys", "authorized_keys.lock")] == [], \
            f"{where}: {list(ak.parent.iterdir())}"
        with PeerStore(cfg.db_path) as store:
            rows = {p.name: p.config["fingerprint"] for p in store.all()}
        assert rows == {name: key.fingerprint for name, key in self.keys.items()}, where


@pytest.fixture(scope="module")
def contended(tmp_path_factory):
    cfg = make_instance(tmp_path_factory.mktemp("contended"), "alpha")
    rng = random.Random(f"{SEED}-pairing")
    ledger = Ledger(cfg, rng)
    ak = cfg.ssh.authorized_keys
    ak.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ak.write_text(HEAD)
    os.chmod(ak, 0o600)
    for _ in range(12):
        name = ledger.fresh_name()
        key = random_key(rng)
        assert pairing.pair(cfg, token(name, key)).outcome == "added"
        ledger.keys[name] = key
    with open(ak, "a") as fh:
        fh.write(MIDDLE + "\n")
    ledger.verify("setup")
    return ledger


def test_twenty_processes_pair_and_unpair_at_once(contended):
    ledger = contended
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    with ctx.Pool(PROCESSES, initializer=_init_worker, initargs=(barrier,)) as pool:
        for round_no in range(ROUNDS):
            tasks = ledger.plan_round()
            assert len(tasks) == PROCESSES
            outcomes = pool.map(_worker, [(op, str(ledger.cfg.path), arg) for op, arg, *_ in tasks], chunksize=1)
            ledger.apply(tasks, outcomes)
            ledger.verify(f"seed {SEED}, round {round_no}")
            COUNTS.rounds += 1
        pool.close()
        pool.join()


def test_twenty_peerkit_commands_at_once(contended):
    """The same, one round, with the real command line (20 `peerkit pair`/`unpair` processes)."""
    ledger = contended
    tasks = ledger.plan_round()
    env = {**os.environ, "PEERKIT_CONFIG": str(ledger.cfg.path)}
    procs = []
    for op, arg, *_ in tasks:
        argv = [sys.executable, "-m", "peerkit.cli", "--json", op, arg]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outcomes = []
    for (op, *_rest), proc in zip(tasks, procs):
        out, err = proc.communicate(timeout=120)
        result = json.loads(out.strip().splitlines()[-1])
        if result.get("ok"):
            outcomes.append(result.get("outcome") if op == "pair" else
                            ("removed" if result.get("key_removed") else "row-only"))
        else:
            outcomes.append(result["error"])
    ledger.apply(tasks, outcomes)
    ledger.verify(f"seed {SEED}, CLI round")
    COUNTS.rounds += 1


# -- two pulls of the same app ---------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("attempt", range(3))
def test_two_pulls_of_the_same_app_at_once(world, attempt):
    dst = world.puller("dst")
    sc = Scenario(700 + attempt, "two-pulls")
    rng = sc.rng()
    case = prepare(dst, sc, local=True)
    data = dst.source.archive(case.slug)
    # The source holds the stream back for a moment, so the first pull still holds the lock.
    dst.source.plan(case.slug, data, hold_before=2)
    first = dst.start_pull(case.slug, "--compress", "none")
    time.sleep(rng.uniform(0.0, 0.8))
    second = dst.start_pull(case.slug, "--compress", "none")
    runs = [first.finish(timeout=60), second.finish(timeout=60)]
    codes = sorted(run.code for run in runs)
    assert codes == ["busy", "ok"], case.fail(f"{codes}\n" + "\n".join(run.why() for run in runs))
    winner = next(run for run in runs if run.code == "ok")
    loser = next(run for run in runs if run.code == "busy")
    assert loser.returncode == 56 and loser.outcomes() == [("lock", "failed")], case.fail(loser.why())
    # Both are on record: the refusal first (it never waited), then the pull.
    assert [r["error"] for r in new_records(case)] == ["busy", None], case.fail(str(new_records(case)))
    case.records_before += 1
    check(case, winner, {"ok"}, expect="ok")
    hooks = dst.hook_lines(case.slug)[case.hooks_before:]
    assert [h for h in hooks if h[2] == "ok"] == [("stop", "old", "ok"), ("start", "new", "ok"),
                                                  ("post_restore", "new", "ok")], case.fail(str(hooks))
    COUNTS.rounds += 1
