"""What every fault run shares: the scenario, the app it pulls, and the invariants checked after it.

See tests/faults/test_fault_runs.py for the invariants in words.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

from tests.hostile import rig
from tests.hostile.counts import fault_seed
from tests.support import sshd as harness
from tests.trees import diff, snapshot

SEED = fault_seed()


@dataclass
class Scenario:
    """One seeded run: ``index`` and ``kind`` name it, and with the seed fix every random choice."""

    index: int
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        extra = "-".join(str(v) for v in self.params.values() if isinstance(v, str))
        return f"{self.index:03d}-{self.kind}" + (f"-{extra}" if extra else "")

    @property
    def slug(self) -> str:
        return f"f{self.index:03d}-{self.kind}"[:63]

    def rng(self) -> random.Random:
        return random.Random(f"{SEED}-{self.index}")


# -- runs and their invariants ---------------------------------------------------------------

def end_of_archive(data: bytes) -> int:
    """Offset just after the two zero blocks that end a tar archive."""
    stripped = data.rstrip(b"\0")
    return -(-len(stripped) // 512) * 512 + 1024


def pick_offset(rng: random.Random, data: bytes) -> int:
    """A random byte offset, with weight on the edges: 0, block boundaries, the end marker, the end."""
    eoa = end_of_archive(data)
    return rng.choice([0, 1, 511, 512, 513, eoa - 513, eoa - 512, eoa - 1, eoa, len(data),
                       *(rng.randint(0, len(data)) for _ in range(6))])


@dataclass
class Case:
    sc: Scenario
    puller: rig.Puller
    old: dict | None
    new: dict
    slug: str
    hooks_before: int
    records_before: int = 0
    exclude: tuple[str, ...] = ()

    def mark(self) -> None:
        """Start counting hook runs and transfers.log records from now (a second run of the same case)."""
        self.hooks_before = len(self.puller.hook_lines(self.slug))
        self.records_before = len(transfer_records(self))

    def fail(self, text: str) -> str:
        return f"PEERKIT_FAULT_SEED={SEED} run {self.sc.id}: {text}"


def prepare(puller: rig.Puller, sc: Scenario, *, size: int | None = None, local: bool | None = None,
            source_spec: dict | None = None) -> Case:
    rng = sc.rng()
    slug = sc.slug
    source = puller.source
    source.clear_plan(slug)
    puller.clear_hooks(slug)
    spec = source_spec or rig.app_spec("new", size=size or rng.randint(16 << 10, 400 << 10), seed=sc.index)
    new = rig.as_pulled_by(source.app(slug, spec), puller.inst.user)
    if local is None:
        local = rng.random() < 0.85
    live = puller.apps_dir / slug
    if os.path.lexists(live):
        shutil.rmtree(live)
    old = puller.local_app(slug, rig.app_spec("old", size=8 << 10, seed=sc.index)) if local else None
    case = Case(sc, puller, old, new, slug, 0)
    case.mark()
    return case


def flags(rng: random.Random, *extra: str) -> list[str]:
    out = ["--compress", "none", *extra]
    if rng.random() < 0.6 and "--no-pre-backup" not in extra:
        out.append("--no-pre-backup")
    return out


def live_state(case: Case) -> str:
    path = case.puller.apps_dir / case.slug
    live = snapshot(path, exclude=case.exclude) if os.path.lexists(path) else None
    old = {k: v for k, v in case.old.items() if k.split("/")[0] not in case.exclude} if case.old else None
    if live == old:
        return "old"
    if live == case.new:
        return "new"
    raise AssertionError(case.fail(f"the app is neither the old nor the new tree:\n"
                                   f"vs old: {diff(old or {}, live or {})[:8]}\nvs new: {diff(case.new, live or {})[:8]}"))


def transfer_records(case: Case) -> list[dict]:
    """Every transfers.log record of this case's app, oldest first."""
    path = case.puller.inst.state_dir / "transfers.log"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [event for event in map(json.loads, lines) if event.get("app") == case.slug]


def new_records(case: Case) -> list[dict]:
    return transfer_records(case)[case.records_before:]


def check(case: Case, run: rig.Run, allowed: set[str], *, leftovers_ok: bool = False,
          expect: str | None = None) -> str:
    """The invariants after one run; return the app's state ("old" or "new")."""
    state = live_state(case)
    code = run.code if run.lines else None
    assert code is not None, case.fail(f"no JSON result\n{run.why()}")
    assert code in allowed, case.fail(f"code {code!r}, expected one of {sorted(allowed)}\n{run.why()}")
    assert run.returncode == rig.EXIT[code], case.fail(f"exit {run.returncode} for {code}\n{run.why()}")
    assert (code == "ok") == (state == "new"), case.fail(f"code {code} but the {state} tree is live\n{run.why()}")
    if expect is not None:
        assert code == expect, case.fail(f"code {code}, expected {expect}\n{run.why()}")
    if not leftovers_ok:
        assert case.puller.leftovers(case.slug) == [], case.fail(f"left {case.puller.leftovers(case.slug)}")
    records = new_records(case)
    assert [r["error"] for r in records] == [None if code == "ok" else code], \
        case.fail(f"transfers.log says {[r['error'] for r in records]}, the CLI {code}")
    check_restarted(case, state)
    return state


def check_restarted(case: Case, state: str) -> None:
    """If a stop hook ran in this run, a start hook completed afterwards, on the tree that is live."""
    lines = case.puller.hook_lines(case.slug)[case.hooks_before:]
    stops = [i for i, (hook, _v, _w) in enumerate(lines) if hook == "stop"]
    live_version = {"old": "old", "new": "new"}[state] if (case.old or state == "new") else None
    if stops:
        after = lines[stops[-1]:]
        assert ("start", live_version, "ok") in after, case.fail(f"stopped and not started again: {lines}")
        last_start = [line for line in after if line[0] == "start"][-1]
        assert last_start == ("start", live_version, "ok"), case.fail(f"the last start was {last_start}: {lines}")
    if state == "new":
        assert ("start", "new", "ok") in lines, case.fail(f"the new app was never started: {lines}")


def wait_for(predicate, timeout: float, what: str, case: Case) -> None:
    assert harness.wait_until(predicate, timeout, 0.02), case.fail(f"timed out waiting for {what}")
