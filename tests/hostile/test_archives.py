"""Crafted tar streams against the whole pull pipeline: refused, and nothing else changes.

The corpus is tests/tarcraft.py's hostile cases plus tests/hostile/archives.py
(68 streams).  Invariant for each: the pull ends with ``unsafe-archive`` or
``transfer-incomplete`` (the one the case names), the live app is
byte-identical, no staging directory is left, and nothing was written
outside staging (the escape targets beside it, absolute victims, and every
other file of the instance are as they were).

Two layers:

* in-process, every stream: ``pull.pull_app`` (lock, inventory, backup,
  staging, extraction, verification, swap...) with only the SSH transport
  replaced by one that feeds the crafted bytes in seeded random chunks;
* over a real sshd with the real CLI, a spread over every category (every
  stream with --peerkit-long): the source's forced command (the stand-in,
  tests/hostile/standin.py) sends the crafted bytes.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import types
import zlib

import pytest

from peerkit import pull as pull_module
from peerkit.client import StreamResult
from peerkit.errors import PeerkitError
from tests import tarcraft
from tests.hostile import archives, rig
from tests.hostile.counts import COUNTS, long_run
from tests.hostile.shellharness import make_instance
from tests.trees import diff, snapshot

SENTINEL = b"the sentinel beside the staging directory\n"
VICTIM = b"a file outside the app\n"
APP = "victim-app"
REAL_SPREAD = ("dotdot_escape", "absolute_path", "symlink_escape_write_through", "symlink_chain",
               "hardlink_outside", "char_device", "fifo", "setuid_file", "huge_size", "truncated_header",
               "bad_checksum", "gnu_longname_traversal", "deep_nesting_10000", "dot_symlink",
               "pax_size_desync", "symlink_to_root_then_write")


def test_corpus_covers_the_brief():
    assert len(archives.CASES) >= 30
    for category, cases in archives.BRIEF.items():
        assert cases and all(case in archives.CASES for case in cases), category
    assert set(archives.EXPECTED.values()) == {"unsafe-archive", "transfer-incomplete"}


# -- in-process: the real pipeline, a fake transport ---------------------------------------------

class FakeConnection:
    """What pull_app needs of a PeerConnection, serving one byte string."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data = data
        self.rng = random.Random(seed)
        self.peer = types.SimpleNamespace(name="src", config={"host": "127.0.0.1"})
        self.features = frozenset()
        self.commands: list[str] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def stream(self, command, on_data, idle_timeout=None, *, gate=None):
        self.commands.append(command)
        pos = 0
        while pos < len(self.data):
            n = self.rng.choice([1, 7, 512, 513, 4096, 65536, self.rng.randint(1, 200_000)])
            on_data(self.data[pos:pos + n])
            pos += n
            await asyncio.sleep(0)
        return StreamResult(0, len(self.data), b"", None)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("archives")
    cfg = make_instance(root / "puller", "puller")
    return cfg


def _prepare(cfg) -> dict:
    apps = cfg.apps_dir
    if apps.exists():
        shutil.rmtree(apps)
    (apps / APP / "conf").mkdir(parents=True)
    (apps / APP / "conf" / "app.ini").write_bytes(b"name=old\n")
    (apps / APP / "data.bin").write_bytes(os.urandom(5000))
    os.symlink("data.bin", apps / APP / "current")
    (apps / tarcraft.SENTINEL).write_bytes(SENTINEL)
    (apps / tarcraft.OUTSIDE).mkdir()
    (apps / tarcraft.OUTSIDE / "victim").write_bytes(VICTIM)
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        if os.path.lexists(victim):
            os.unlink(victim)
    return _everything(cfg)


def _everything(cfg) -> dict:
    """Every file of the instance, except what a failed pull may write (its log, its lock file)."""
    snap = snapshot(cfg.path.parent)
    return {rel: rec for rel, rec in snap.items()
            if not rel.startswith(("state/transfers.log", "state/locks"))
            and not (rel in (".", "apps", "state") and rec["type"] == "dir")}


@pytest.mark.parametrize("case", sorted(archives.CASES))
def test_crafted_stream_in_process(site, monkeypatch, case):
    cfg = site
    before = _prepare(cfg)
    data = archives.CASES[case]()
    conn = FakeConnection(data, seed=zlib.crc32(case.encode()))

    async def open_peer_with(_cfg, _store, _name, calls, *_a, **_k):
        return conn, {"ok": True}, [asyncio.ensure_future(call(conn)) for call in calls]

    async def list_apps(_conn):
        return {"peer": "src", "apps": [{"slug": APP, "size_kb": max(1, len(data) // 1024)}], "domain": None}

    monkeypatch.setattr(pull_module, "open_peer_with", open_peer_with)
    monkeypatch.setattr(pull_module, "list_apps", list_apps)
    COUNTS.archives += 1
    with pytest.raises(PeerkitError) as info:
        asyncio.run(pull_module.pull_app(cfg, "src", APP, pre_backup=False, compress="none"))
    assert info.value.code == archives.EXPECTED[case], info.value.message
    assert conn.commands == [f"stream-app {APP}"]
    report = info.value.report  # type: ignore[attr-defined]
    failed = [s.name for s in report.stages if s.outcome == "failed"]
    assert failed and failed[0] in ("transfer", "verify"), report.stages
    assert not {"stop", "swap", "start"} & {s.name for s in report.stages}
    after = _everything(cfg)
    assert diff(before, after) == []
    assert sorted(os.listdir(cfg.apps_dir)) == sorted([APP, tarcraft.SENTINEL, tarcraft.OUTSIDE])
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        assert not os.path.lexists(victim), victim
    COUNTS.archives_refused += 1


# -- over a real sshd, with the real CLI -------------------------------------------------------

def _real_cases() -> list[str]:
    return sorted(archives.CASES) if long_run() else list(REAL_SPREAD)


@pytest.fixture(scope="module")
def dst(world) -> rig.Puller:
    puller = world.puller("dst")
    apps = puller.apps_dir
    apps.mkdir(parents=True, exist_ok=True)
    (apps / tarcraft.SENTINEL).write_bytes(SENTINEL)
    (apps / tarcraft.OUTSIDE).mkdir(exist_ok=True)
    (apps / tarcraft.OUTSIDE / "victim").write_bytes(VICTIM)
    rig.as_owner(apps / tarcraft.SENTINEL, puller.inst.user)
    rig.as_owner(apps / tarcraft.OUTSIDE, puller.inst.user)
    return puller


@pytest.mark.integration
@pytest.mark.parametrize("case", _real_cases())
def test_crafted_stream_over_sshd(dst, case):
    source = dst.source
    slug = "h-" + case.replace("_", "-")[:60]
    source.app(slug, {"README": b"the real app, never sent\n"})
    before = dst.local_app(slug, rig.app_spec("old"))
    source.plan(slug, archives.CASES[case]())
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        if os.path.lexists(victim):
            os.unlink(victim)
    COUNTS.archives += 1
    try:
        run = dst.pull(slug, "--no-pre-backup", "--compress", "none")
    finally:
        source.clear_plan(slug)
    code = archives.EXPECTED[case]
    assert run.returncode == rig.EXIT[code] and run.code == code, run.why()
    assert diff(before, dst.live(slug)) == []
    assert dst.leftovers() == []
    assert (dst.apps_dir / tarcraft.SENTINEL).read_bytes() == SENTINEL
    assert sorted(os.listdir(dst.apps_dir / tarcraft.OUTSIDE)) == ["victim"]
    assert (dst.apps_dir / tarcraft.OUTSIDE / "victim").read_bytes() == VICTIM
    for victim in tarcraft.ABSOLUTE_VICTIMS:
        assert not os.path.lexists(victim), victim
    failed = [name for name, st in run.stages.items() if st["outcome"] == "failed"]
    assert failed and failed[0] in ("transfer", "verify"), run.outcomes()
    assert not {"stop", "swap", "start"} & set(run.stages), run.outcomes()
    assert dst.hook_lines(slug) == []
    shutil.rmtree(dst.apps_dir / slug)
    COUNTS.archives_refused += 1
