"""Randomized, seeded fault runs against real pulls: no failure loses data.

Every run is a real `peerkit pull --json` as the puller's owner, over the
private sshd, from the source whose forced command is the stand-in
(tests/hostile/standin.py), with hooks that log which version of the app
they ran on.  The faults:

* the remote sends the first N bytes of a real archive and exits 0, kills
  itself, or kills its sshd session (the connection drops); N is random;
* the remote sends everything and exits non-zero;
* a zstd stream cut at a random byte;
* the client is killed (SIGKILL) at a random byte, then a second pull recovers;
* the disk fills during extraction (8 MiB tmpfs under apps_dir, random ballast),
  and an app that cannot fit from the start;
* a hook fails or hangs past hooks.timeout, before the swap (stop) and after (start, post_restore);
* SIGINT and SIGTERM while the pull is held in each stage (ping, inventory,
  backup, transfer, stop, start, post_restore), and at random times.

Invariant after each run: the app directory holds exactly the old tree or
exactly the new one (or still no app); the exit status and the machine
error code say which (0 and "ok" if and only if the new tree is in place),
and transfers.log records the same code; an app whose stop hook ran was
started again, on the tree that is live; no staging or aside directory is
left (after a SIGKILL of the client, the next pull removes it).

Seeded by PEERKIT_FAULT_SEED (default tests/hostile/counts.py); every
failure message starts with the seed and the run number, so
``PEERKIT_FAULT_SEED=<seed> pytest tests/faults -k <run id>`` replays it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from tests import tarcraft
from tests.faults.common import (SEED, Scenario, check, end_of_archive, flags, live_state, pick_offset,
                                 new_records, prepare, wait_for)
from tests.hostile import rig
from tests.hostile.counts import COUNTS, long_run
from tests.support.sshd import wait_until as harness_wait
from tests.trees import snapshot

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}
HOLD_STAGES = ("ping", "inventory", "backup", "transfer", "stop", "start", "post_restore")
SPARSE = "zz-sparse.img"
SPARSE_SIZE = 600 << 20  # read by the pre-backup's tar: holds the pull in "backup" for a second or two

BASE_MIX = ([("cut-exit0", {})] * 6 + [("cut-kill-remote", {})] * 5 + [("cut-kill-session", {})] * 5
            + [("all-then-exit-nonzero", {})] * 3 + [("zstd-cut", {})] * 3 + [("kill-client", {})] * 4
            + [("disk-full", {})] * 3 + [("no-space", {})]
            + [("hook", {"hook": h, "how": how}) for h in ("stop", "start", "post_restore") for how in ("fail", "hang")]
            + [("signal", {"stage": st, "sig": sig}) for st in HOLD_STAGES for sig in SIGNALS]
            + [("signal-then-start-fails", {"sig": "TERM"})] + [("signal-random", {})] * 4)

pytestmark = pytest.mark.integration  # real sshd, throwaway users, root


def scenarios() -> list[Scenario]:
    rng = random.Random(SEED)
    mix = BASE_MIX * (4 if long_run() else 1)
    out = []
    for i, (kind, params) in enumerate(mix):
        p = dict(params)
        if kind == "signal-random":
            p["sig"] = rng.choice(list(SIGNALS))
        out.append(Scenario(i, kind, p))
    return out


SCENARIOS = scenarios()


@pytest.fixture(scope="module")
def dst(world) -> rig.Puller:
    return world.puller("dst")


@pytest.fixture(scope="module")
def disk(world) -> rig.Puller:
    return world.puller("disk")


# -- the runs ---------------------------------------------------------------------------------------

def run_cut(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    case = prepare(dst, sc)
    data = dst.source.archive(case.slug)
    cut = pick_offset(rng, data)
    after = {"cut-exit0": "exit:0", "cut-kill-remote": "kill-self", "cut-kill-session": "kill-session",
             "all-then-exit-nonzero": f"exit:{rng.randint(1, 255)}"}[sc.kind]
    if sc.kind == "all-then-exit-nonzero":
        cut = len(data)
    dst.source.plan(case.slug, data, cut=cut, after=after)
    run = dst.pull(case.slug, *flags(rng))
    if sc.kind == "cut-exit0":
        expect = "ok" if cut >= end_of_archive(data) else "transfer-incomplete"
    elif sc.kind == "cut-kill-session" and run.lines and run.outcomes()[-1] in (("ping", "failed"),
                                                                                  ("inventory", "failed")):
        # The stream starts with the ping: killing the session (the whole
        # connection) can come before the ping or list-apps was answered.
        expect = "peer-unreachable"
    else:
        expect = "transfer-incomplete"
    check(case, run, {expect}, expect=expect)
    if expect != "ok":
        assert case.puller.hook_lines(case.slug)[case.hooks_before:] == [], case.fail("a hook ran")


def run_zstd_cut(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    case = prepare(dst, sc)
    data = dst.source.archive(case.slug)
    compressed = subprocess.run(["zstd", "-q", "-c", "-1"], input=data, capture_output=True, check=True).stdout
    cut = rng.choice([0, 1, 4, len(compressed) - 1, len(compressed), rng.randint(0, len(compressed))])
    dst.source.plan(case.slug, data, cut=cut, after="exit:0")
    run = dst.pull(case.slug, "--compress", "zstd", "--no-pre-backup")
    expect = "ok" if cut == len(compressed) else "transfer-incomplete"
    check(case, run, {expect}, expect=expect)


def run_kill_client(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    case = prepare(dst, sc, size=rng.randint(200 << 10, 600 << 10))
    data = dst.source.archive(case.slug)
    at = rng.randint(1, len(data) - 1)
    mark = dst.source.mark(f"{case.slug}.stalled")
    dst.source.plan(case.slug, data, stall_at=at, stall_for=8, stall_mark=str(mark), after="exit:0")
    bg = dst.start_pull(case.slug, *flags(rng))
    wait_for(mark.exists, 30, "the stream to reach the offset", case)
    time.sleep(0.3)  # the bytes before the offset reach the client
    os.kill(bg.proc.pid, signal.SIGKILL)
    run = bg.finish(timeout=30)
    assert run.returncode == -signal.SIGKILL, case.fail(run.why())
    assert live_state(case) == "old", case.fail("a killed client changed the app")
    left = case.puller.leftovers(case.slug)
    # The next pull (the stream now whole) recovers and cleans up.
    assert new_records(case) == [], case.fail("a killed client wrote a transfer record")
    dst.source.clear_plan(case.slug)
    case.mark()
    run = dst.pull(case.slug, "--compress", "none", "--no-pre-backup")
    check(case, run, {"ok"}, expect="ok")
    if left:
        assert any("left by an interrupted run" in note for note in run.result.get("notes", [])), \
            case.fail(f"{left} were not reported as removed: {run.result}")


def _big_payload(rng: random.Random, size: int) -> bytes:
    return tarcraft.tarfile_archive([("VERSION", "file", b"new", 0o644),
                                     ("data", "dir", None, 0o755),
                                     ("data/big.bin", "file", rng.randbytes(size), 0o644)])


def run_disk_full(disk: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    case = prepare(disk, sc, size=16 << 10, local=True)
    mount = disk.apps_dir.parent
    ballast = mount / "ballast"
    try:
        with open(ballast, "wb") as fh:
            fh.write(bytes(rng.randint(0, 4 << 20)))
        disk.source.plan(case.slug, _big_payload(rng, 12 << 20), after="exit:0")
        run = disk.pull(case.slug, *flags(rng))
        # The brief allows no-space or transfer-incomplete; peerkit says exactly no-space.
        check(case, run, {"no-space", "transfer-incomplete"}, expect="no-space")
    finally:
        ballast.unlink(missing_ok=True)
        shutil.rmtree(disk.apps_dir / case.slug, ignore_errors=True)


def run_no_space(disk: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    spec = {**rig.app_spec("new", size=8 << 10, seed=sc.index), "huge.bin": rng.randbytes(10 << 20)}
    case = prepare(disk, sc, local=True, source_spec=spec)
    try:
        run = disk.pull(case.slug, "--compress", "none")
        check(case, run, {"no-space"}, expect="no-space")
        assert run.outcomes()[-1] == ("inventory", "failed"), case.fail(run.why())
    finally:
        shutil.rmtree(disk.apps_dir / case.slug, ignore_errors=True)


def run_hook(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    hook, how = sc.params["hook"], sc.params["how"]
    case = prepare(dst, sc, local=True)
    version = "old" if hook == "stop" else "new"
    action = "exit 1" if how == "fail" else "sleep 30"
    dst.set_hook(case.slug, hook, f'[ "$ver" = {version} ] && {{ {action}; }}\n')
    run = dst.pull(case.slug, *flags(rng))
    check(case, run, {"hook-failed"}, expect="hook-failed")
    lines = dst.hook_lines(case.slug)[case.hooks_before:]
    assert (hook, version, "begin") in lines and (hook, version, "ok") not in lines, case.fail(str(lines))
    if how == "hang":
        assert rig.HOOK_TIMEOUT <= run.seconds < rig.HOOK_TIMEOUT + 30, case.fail(f"took {run.seconds:.1f}s")


def recorded_app_info(dst: rig.Puller, on: bool) -> None:
    """Record the source as offering app-info (the pull asks it) or not (the pull asks ping and list-apps)."""
    features = ["receive-app", "replace-key", "rsync", "zstd"]
    dst.inst.set_recorded_features(dst.source.inst.name, ["app-info", *features] if on else features)


def run_signal(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    stage, sig = sc.params["stage"], SIGNALS[sc.params["sig"]]
    source = dst.source
    backup = stage == "backup"
    case = prepare(dst, sc, local=True)
    if backup:
        sparse = dst.apps_dir / case.slug / SPARSE
        with open(sparse, "wb") as fh:
            fh.truncate(SPARSE_SIZE)
        os.chown(sparse, dst.inst.user.uid, dst.inst.user.gid)
        case.exclude = (SPARSE,)
        case.old = snapshot(dst.apps_dir / case.slug, exclude=case.exclude)
        sparse_stat = os.stat(sparse)
    data = source.archive(case.slug)
    mark = source.mark(f"{case.slug}.stalled")
    hook_mark = dst.ctl / f"{case.slug}.{stage}.started"
    hook_mark.unlink(missing_ok=True)
    held = None
    pings = len(source.inst.audit_events())
    # The pull is in "ping" while app-info is held; in "inventory" only while
    # list-apps is (app-info answers for it at once), so that pull asks
    # ping and list-apps.
    recorded_app_info(dst, stage != "inventory")
    held_verb = {"ping": "app-info", "inventory": "list-apps"}.get(stage)
    if held_verb is not None:
        held = source.hold(dst, held_verb, 6)
        source.plan(case.slug, data)
    elif stage == "transfer":
        source.plan(case.slug, data, stall_at=rng.randint(1, len(data) - 1), stall_for=6, stall_mark=str(mark))
    else:
        source.plan(case.slug, data)
    if stage in ("stop", "start", "post_restore"):
        version = "old" if stage == "stop" else "new"
        dst.set_hook(case.slug, stage, f'[ "$ver" = {version} ] && {{ touch {hook_mark}; sleep 1.5; }}\n')
    extra = () if backup else ("--no-pre-backup",)
    bg = dst.start_pull(case.slug, "--compress", "none", *extra)
    try:
        if held is not None:
            wait_for(held.exists, 30, f"the pull to reach {stage}", case)
            if stage == "inventory":
                # list-apps goes out with the ping: the pull is in "inventory"
                # once the ping was answered (and its reply read).
                answered = lambda: any(e.get("verb") == "ping" and e.get("peer") == dst.inst.name  # noqa: E731
                                       for e in source.inst.audit_events()[pings:])
                wait_for(answered, 30, "the ping to be answered", case)
                time.sleep(0.5)
        elif stage == "transfer":
            wait_for(mark.exists, 30, "the stream to stall", case)
            # The stream starts with the ping: the pull is in "transfer" once
            # app-info was answered too (then nothing else is awaited).
            listed = lambda: any(e.get("verb") == "app-info" and e.get("peer") == dst.inst.name  # noqa: E731
                                 for e in source.inst.audit_events()[pings:])
            wait_for(listed, 30, "app-info to be answered", case)
            time.sleep(0.5)
        elif backup:
            partial = lambda: any(p.name.endswith(".partial") for p in (dst.backups_dir / case.slug).glob(".*"))  # noqa: E731
            wait_for(lambda: (dst.backups_dir / case.slug).is_dir() and partial(), 30, "the pre-backup", case)
        else:
            wait_for(hook_mark.exists, 30, f"the {stage} hook", case)
        os.kill(bg.proc.pid, sig)
        run = bg.finish(timeout=60)
    finally:
        if held is not None:
            source.release(dst, held_verb)
    if stage in ("stop", "start", "post_restore"):
        # From the stop hook on, signals wait: the pull completes, and says so.
        state = check(case, run, {"ok"}, expect="ok")
        assert any("interrupt arrived" in note for note in run.result.get("notes", [])), case.fail(run.why())
    else:
        state = check(case, run, {"interrupted"}, expect="interrupted")
        failed = [name for name, st in run.stages.items() if st["outcome"] == "failed"]
        # Where the cancellation lands: the held stage, or after the pre-backup
        # (which finishes first) the next wait: the transfer, started with the
        # ping, may be over by then, and the flush comes before the swap.
        if stage == "backup":
            assert failed in ([], ["transfer"], ["flush"]) and "swap" not in run.stages, case.fail(run.why())
        else:
            assert failed == [stage], case.fail(run.why())
    if backup:
        assert os.stat(dst.apps_dir / case.slug / SPARSE).st_ino == sparse_stat.st_ino
    assert state in ("old", "new")


def run_signal_then_start_fails(dst: rig.Puller, sc: Scenario) -> None:
    sig = SIGNALS[sc.params["sig"]]
    case = prepare(dst, sc, local=True)
    mark = dst.ctl / f"{case.slug}.start.started"
    mark.unlink(missing_ok=True)
    dst.source.plan(case.slug, dst.source.archive(case.slug))
    dst.set_hook(case.slug, "start", f'[ "$ver" = new ] && {{ touch {mark}; sleep 1; exit 1; }}\n')
    bg = dst.start_pull(case.slug, "--compress", "none", "--no-pre-backup")
    wait_for(mark.exists, 30, "the start hook", case)
    os.kill(bg.proc.pid, sig)
    run = bg.finish(timeout=60)
    check(case, run, {"hook-failed"}, expect="hook-failed")
    assert run.stages["rollback"]["outcome"] == "ok", case.fail(run.why())


def run_signal_random(dst: rig.Puller, sc: Scenario) -> None:
    rng = sc.rng()
    sig = SIGNALS[sc.params["sig"]]
    case = prepare(dst, sc, size=rng.randint(100 << 10, 300 << 10))
    data = dst.source.archive(case.slug)
    dst.source.plan(case.slug, data, chunk=8192, rate=400_000)
    for hook in ("stop", "start"):
        dst.set_hook(case.slug, hook, "sleep 0.3\n")
    bg = dst.start_pull(case.slug, *flags(rng))
    time.sleep(rng.uniform(0.6, 3.0))
    os.kill(bg.proc.pid, sig)
    run = bg.finish(timeout=60)
    if run.returncode == -sig and not run.lines:
        # Killed before peerkit installed its handlers (interpreter start-up): nothing was touched.
        assert live_state(case) == "old" and case.puller.leftovers(case.slug) == [], case.fail(run.why())
        assert new_records(case) == [], case.fail("a record, but no result")
        return
    check(case, run, {"ok", "interrupted"})


RUNNERS = {"cut-exit0": run_cut, "cut-kill-remote": run_cut, "cut-kill-session": run_cut,
           "all-then-exit-nonzero": run_cut, "zstd-cut": run_zstd_cut, "kill-client": run_kill_client,
           "hook": run_hook, "signal": run_signal, "signal-then-start-fails": run_signal_then_start_fails,
           "signal-random": run_signal_random}


def test_enough_fault_runs():
    assert len(SCENARIOS) >= 50
    kinds = {sc.kind for sc in SCENARIOS}
    assert kinds == set(RUNNERS) | {"disk-full", "no-space"}


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.id for sc in SCENARIOS])
def test_fault_run(request, sc):
    COUNTS.faults += 1
    if sc.kind in ("disk-full", "no-space"):
        puller = request.getfixturevalue("disk")
        (run_disk_full if sc.kind == "disk-full" else run_no_space)(puller, sc)
    else:
        RUNNERS[sc.kind](request.getfixturevalue("dst"), sc)
    COUNTS.survived += 1


def test_an_incremental_pull_stopped_while_its_rsync_answers_app_info_changes_nothing(dst):
    """SIGTERM while the greeting is the answer a with-app-info rsync owes: nothing changes, nothing is left."""
    if shutil.which("rsync", path="/usr/local/bin:/usr/bin:/bin") is None:
        pytest.fail("rsync is not installed", pytrace=False)
    slug = "info-stop"
    src = dst.source
    src.clear_plan(slug)
    dst.clear_hooks(slug)
    src.app(slug, rig.app_spec("new", seed=21))
    assert dst.pull(slug, "--no-pre-backup", "--compress", "none").code == "ok"
    before = snapshot(dst.apps_dir / slug)
    src.app(slug, rig.app_spec("newer", seed=22))
    dst.inst.set_recorded_features(src.inst.name, ["app-info", "receive-app", "replace-key", "rsync",
                                                   "with-app-info", "zstd"])
    started = src.hold(dst, "with-app-info", 6)
    try:
        bg = dst.start_pull(slug, "--incremental", "--no-pre-backup")
        assert harness_wait(started.exists, 30), "with-app-info was never asked"
        os.kill(bg.proc.pid, signal.SIGTERM)
        run = bg.finish(timeout=60)
    finally:
        src.release(dst, "with-app-info")
    assert run.code == "interrupted", run.why()
    assert [name for name, st in run.stages.items() if st["outcome"] == "failed"] == ["ping"], run.why()
    assert snapshot(dst.apps_dir / slug) == before and dst.leftovers(slug) == []
    # The local rsync went with the pull.
    assert subprocess.run(["pgrep", "-u", str(dst.inst.user.uid), "-x", "rsync"]).returncode == 1


@pytest.mark.parametrize("asked", ["app-info", "list-apps"])
def test_a_transfer_started_with_the_ping_waits_for_the_space_check(disk, asked):
    """Before app-info (or list-apps) and the space check, an early transfer writes its head start at most.

    That head start is a quarter of the free space (64 MiB at most), so an
    app that does not fit is refused before it fills the disk, and one that
    fits goes on once the checks pass.
    """
    slug = "head-start"
    src = disk.source
    src.clear_plan(slug)
    disk.clear_hooks(slug)
    new = rig.as_pulled_by(src.app(slug, rig.app_spec("new", size=5 << 20, seed=7)), disk.inst.user)
    live = disk.apps_dir / slug
    shutil.rmtree(live, ignore_errors=True)
    mount = disk.apps_dir.parent
    # A ping records the source's features: the next pull starts its transfer with its ping.
    assert rig.cli(disk.inst, "ping", src.inst.name).returncode == 0
    recorded_app_info(disk, asked == "app-info")

    def used() -> int:
        st = os.statvfs(mount)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    st = os.statvfs(mount)
    free, before = st.f_bavail * st.f_frsize, used()
    started = src.hold(disk, asked, 3)
    try:
        bg = disk.start_pull(slug, "--compress", "none", "--no-pre-backup")
        assert harness_wait(started.exists, 30), f"{asked} was never asked"
        peak, deadline = 0, time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the app's size is held back: only the early stream writes
            peak = max(peak, used() - before)
            time.sleep(0.01)
        run = bg.finish(timeout=60)
    finally:
        src.release(disk, asked)
    assert run.code == "ok", run.why()
    assert any("alongside the ping" in n for n in run.result["notes"]), run.result["notes"]
    # Something was written early, and no more than the head start (plus one chunk).
    assert 0 < peak <= free // 4 + (512 << 10), (peak, free)
    assert snapshot(live) == new
    shutil.rmtree(live)
