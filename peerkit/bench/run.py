"""Set up two instances behind a real sshd, run each case alternating peerkit and its baseline, report.

Each case yields a row: medians, min and max of both sides (alternated
ABAB..., the first side swapping every iteration), the ratio of medians and
whether its target is met.  The pull cases also run peerkit's side
through a `peerkit agent` in the same rotation (ABC, BCA, CAB, ...) and
yield a second row for it, against the same baseline runs.  Results go to
``OUT/results.json`` and ``OUT/results.md``; the table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import sshd as harness  # noqa: E402  (the integration tests' fixture code)

MiB = 1 << 20
GiB = 1 << 30
GCM = "aes128-gcm@openssh.com"
SEED = 20240601
CASES = ["full-large", "full-small", "incr-vs-full", "incr-vs-rsync", "memory", "ping",
         "forced-command", "fanout", "compress"]
# The cases that write (and at the end delete) app data sets: see settle_wait.
DATA_CASES = frozenset({"full-large", "full-small", "incr-vs-full", "incr-vs-rsync", "memory", "compress"})


@dataclass
class Sizes:
    large: int = GiB
    small_files: int = 20_000
    small_dirs: int = 200
    incr_set: int = GiB
    mem_small: int = 256 * MiB
    mem_large: int = 2 * GiB
    peers: int = 50
    compressible: int = 512 * MiB

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(large=128 * MiB, small_files=2_000, small_dirs=20, incr_set=128 * MiB,
                   mem_small=64 * MiB, mem_large=512 * MiB, peers=10, compressible=64 * MiB)


@dataclass
class Row:
    case: str
    label: str
    a_name: str
    b_name: str
    unit: str = "s"
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    target: str = ""
    met: bool | None = None
    ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def stats(self, xs: list[float]) -> dict:
        if not xs:
            return {}
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}

    def to_json(self) -> dict:
        return {"case": self.case, "label": self.label, "peerkit": self.a_name, "baseline": self.b_name,
                "unit": self.unit, "peerkit_stats": self.stats(self.a), "baseline_stats": self.stats(self.b),
                "ratio_of_medians": self.ratio, "target": self.target, "met": self.met, "note": self.note,
                **self.extra}


# -- running things and timing them ---------------------------------------------------

@dataclass
class Timed:
    seconds: float
    maxrss_kib: int
    rc: int
    out: str
    err: str


def timed(user: harness.ThrowawayUser, argv: list[str], *, env: dict | None = None, cwd=None,
          wrap: list[str] | None = None, check: bool = True, timeout: float = 3600) -> Timed:
    """Run ``argv`` as ``user`` and return wall time and the child's peak RSS (os.wait4)."""
    STOP.check()
    env = env if env is not None else user.env(extra_path=[harness.venv_bin()])
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if wrap:  # e.g. ip netns exec NS setpriv ...: started as root, drops to the user itself
            kw = {"env": env, "cwd": str(cwd or user.home)}
            argv = [*wrap, *argv]
        else:
            kw = user._kwargs(env, cwd)
        start = time.perf_counter()
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, **kw)
        deadline = start + timeout
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                STOP.check()
                time.sleep(0.002)
        except BaseException:
            # Stopped (or anything else going wrong here): the command is in
            # its own session, so nothing else would end it, and it must not
            # outlive its user.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        res = Timed(seconds, ru.ru_maxrss, proc.returncode, out.read().decode("utf-8", "replace"),
                    err.read().decode("utf-8", "replace"))
    if check and res.rc != 0:
        raise harness.HarnessError(f"{shlex.join(map(str, argv))} exited {res.rc}: {res.err[-800:]} {res.out[-400:]}")
    return res


def alternate(runs: int, a: Callable[[], float], b: Callable[[], float], row: Row,
              before: Callable[[str], None] | None = None) -> None:
    """ABAB...: iteration i runs A then B when i is even, B then A when odd."""
    rotate(runs, [("a", row.a_name, a, row.a), ("b", row.b_name, b, row.b)], row.case, row.unit, before)


Side = tuple[str, str, Callable[[], float], list[float]]  # key for `before`, name, run it, its values


def rotate(runs: int, sides: list[Side], case: str, unit: str, before: Callable[[str], None] | None = None) -> None:
    """Run every side once per iteration, the order rotated by one each time (AB BA; ABC BCA CAB ...)."""
    for i in range(runs):
        k = i % len(sides)
        for key, name, fn, values in sides[k:] + sides[:k]:
            if before is not None:
                before(key)
            value = fn()
            values.append(value)
            print(f"  [{case}] run {i + 1}/{runs} {name}: {value:.4g} {unit}", flush=True)


def agent_row(row: Row, values: list[float], a_name: str) -> Row:
    """The same case with `peerkit agent` running: peerkit's side from ``values``, the same baseline runs."""
    return Row(row.case + "+agent", "same, with `peerkit agent` running (PEERKIT_AGENT set: no process start)",
               a_name, row.b_name, unit=row.unit, a=values, b=row.b, target=row.target)


# -- deterministic data ---------------------------------------------------------------

def gen_random_file(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            STOP.check()
            n = min(left, 4 * MiB)
            fh.write(rng.randbytes(n))
            left -= n


def gen_large(app: Path, size: int) -> None:
    gen_random_file(app / "data.bin", size, random.Random(SEED))


def gen_small(app: Path, files: int, dirs: int) -> None:
    rng = random.Random(SEED + 1)
    for i in range(files):
        if i % 1000 == 0:
            STOP.check()
        d = app / f"d{i % dirs:03d}"
        if i < dirs:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.dat").write_bytes(rng.randbytes(4096))


def gen_set(app: Path, total: int) -> None:
    """``total`` bytes as 1 MiB files in 32 directories."""
    rng = random.Random(SEED + 2)
    for i in range(total // MiB):
        gen_random_file(app / f"d{i % 32:02d}" / f"f{i:05d}.bin", MiB, rng)


WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will what up "
         "out can more some could into them other than then now only its time like about over such also "
         "request server error warning info debug user session login logout database query commit backup "
         "nextcloud upload download file folder share calendar contact sync token cache worker").split()


def gen_compressible(app: Path, total: int) -> None:
    """Half application log text, half an SQL dump: seeded, about 3.1x with zstd -1, 3.3x with -3."""
    rng = random.Random(SEED + 3)
    app.mkdir(parents=True, exist_ok=True)
    half = total // 2
    with open(app / "app.log", "w", encoding="ascii") as fh:
        written, t = 0, 1_700_000_000
        while written < half:
            STOP.check()
            lines = []
            for _ in range(2000):
                t += rng.randint(0, 3)
                lvl = rng.choice(("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"))
                lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}Z {lvl} "
                             f"[worker-{rng.randint(1, 16)}] " + " ".join(rng.choices(WORDS, k=rng.randint(6, 18))))
            chunk = "\n".join(lines) + "\n"
            fh.write(chunk)
            written += len(chunk)
    with open(app / "dump.sql", "w", encoding="ascii") as fh:
        fh.write("CREATE TABLE oc_filecache (fileid INTEGER PRIMARY KEY, storage INTEGER, path TEXT, "
                 "name TEXT, mimetype INTEGER, size INTEGER, mtime INTEGER, etag TEXT);\n")
        written, fid = 0, 0
        while written < total - half:
            STOP.check()
            rows = []
            for _ in range(500):
                fid += 1
                name = "_".join(rng.choices(WORDS, k=3)) + rng.choice((".jpg", ".txt", ".pdf", ".md"))
                rows.append(f"({fid},{rng.randint(1, 9)},'files/{rng.choice(WORDS)}/{name}','{name}',"
                            f"{rng.randint(1, 40)},{rng.randint(0, 10**7)},{1_700_000_000 + rng.randint(0, 10**7)},"
                            f"'{rng.getrandbits(64):016x}')")
            chunk = "INSERT INTO oc_filecache VALUES " + ",".join(rows) + ";\n"
            fh.write(chunk)
            written += len(chunk)


def own(path: Path, user: harness.ThrowawayUser) -> None:
    harness.run_root(["chown", "-R", f"{user.uid}:{user.gid}", str(path)], timeout=600)


def make_app(inst: harness.PeerkitInstance, slug: str, gen: Callable[[Path], None]) -> Path:
    app = inst.apps_dir / slug
    if app.exists():
        shutil.rmtree(app)
    t = time.monotonic()
    gen(app)
    own(app, inst.user)
    print(f"  generated {slug} in {time.monotonic() - t:.1f}s ({du(app) / MiB:.0f} MiB)", flush=True)
    return app


def du(path: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(top, f)).st_size
    return total


def drop(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def evict(tree: Path) -> int:
    """Write ``tree`` to disk and drop its files from the page cache; return how many files.

    Kept in the cache, every discarded 1 GiB copy filled memory until the
    kernel had to reclaim pages for each new write: after about ten pulls a
    1 GiB pull took twice the system time (0.85 -> 1.9 s, peerkit and
    baseline alike), and runs late in a case measured that instead.
    """
    os.sync()  # only clean pages can be dropped
    count = 0
    for top, _dirs, files in os.walk(tree):
        for name in files:
            try:
                fd = os.open(os.path.join(top, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def _disk_activity() -> tuple[int, int]:
    """Return (sectors written or discarded so far, I/Os in flight) over every disk (/proc/diskstats)."""
    done = in_flight = 0
    with open("/proc/diskstats", encoding="ascii") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 14 or fields[2].startswith(("loop", "ram")):
                continue
            done += int(fields[9]) + (int(fields[16]) if len(fields) >= 18 else 0)
            in_flight += int(fields[11])
    return done, in_flight


def settle_disk(quiet: float = 1.0, limit: float = 60.0) -> float:
    """Sync, then wait until the disks wrote and discarded nothing for ``quiet`` seconds; return the wait.

    Removing the previous run's 20,000 files (and the discards that follow on
    a virtual disk) keeps the disk busy well after ``sync`` returns; without
    this, the next run, peerkit or baseline alike, measured that instead.
    """
    started = time.monotonic()
    harness.run_root(["sync"], timeout=600)
    last, since = _disk_activity()[0], time.monotonic()
    while time.monotonic() - started < limit:
        time.sleep(0.1)
        done, in_flight = _disk_activity()
        if done != last or in_flight:
            last, since = done, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - started


# A full-size run of the DATA_CASES deletes its data sets at the end:
# gigabytes, in hundreds of thousands of files.  ext4 then avoids the freed
# inodes for minutes (see Env.discard), and a full-size run started meanwhile
# measured that: pulls of the 20,000 files took 1.4-6.3 s instead of about
# 1 s, on both sides, and the ratios ranged from 0.93 to 3.72.  So such a run
# records its clean-up in CLEANED, and the next one waits until this long
# after it.
CLEANED = Path("/var/tmp/peerkit-bench.cleaned")
SETTLE_AFTER_CLEANUP = 300.0


def settle_wait(now: float, marker: Path | None = None, settle: float | None = None) -> float:
    """Return how long a full-size run should still wait after the last one's clean-up (0: none recorded)."""
    marker = CLEANED if marker is None else marker
    settle = SETTLE_AFTER_CLEANUP if settle is None else settle
    try:
        cleaned = marker.stat().st_mtime
    except OSError:
        return 0.0
    # A time in the future (a clock set back) waits the whole period, not more.
    return min(settle, max(0.0, cleaned + settle - now))


def wait_after_cleanup() -> float:
    """Wait (saying so, and stoppable) until SETTLE_AFTER_CLEANUP after the last full-size run's clean-up."""
    left = settle_wait(time.time())
    if left <= 0:
        return 0.0
    print(f"waiting {left:.0f} s: the last full-size run deleted its data sets "
          f"{SETTLE_AFTER_CLEANUP - left:.0f} s ago, and the filesystem is slow to create files for up to "
          f"{SETTLE_AFTER_CLEANUP / 60:.0f} minutes after that (--no-wait starts at once)", flush=True)
    started = time.monotonic()
    deadline = started + left
    shown = started
    while (rest := deadline - time.monotonic()) > 0:
        STOP.check()
        time.sleep(min(rest, 1.0))
        if time.monotonic() - shown >= 60 and rest > 1:
            shown = time.monotonic()
            print(f"   {deadline - shown:.0f} s to wait", flush=True)
    return time.monotonic() - started


def mark_cleaned() -> None:
    """Record that a full-size run deleted its data sets now (see settle_wait)."""
    # A run that cannot record it only costs the next run its wait.
    with contextlib.suppress(OSError):
        # /var/tmp is writable by everyone: never follow a symlink planted
        # there to a file of root's (its time would be set instead).
        fd = os.open(CLEANED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.utime(fd)  # now, also when it was there already
        finally:
            os.close(fd)


# -- the environment ------------------------------------------------------------------

class Env:
    """alpha (the source) and beta (the puller) behind one private OpenSSH sshd on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.users: list[harness.ThrowawayUser] = []
        self.servers: list = []
        self.netns: list[str] = []
        self.links: list[str] = []  # veth pairs, gone with their namespace once moved into it
        self._main = None
        self._agent: BenchAgent | None = None

    def user(self) -> harness.ThrowawayUser:
        u = harness.ThrowawayUser.create(self.root, prefix="pkb")
        self.users.append(u)
        return u

    def main(self):
        if self._main is None:
            ua, ub = self.user(), self.user()
            sshd = harness.Sshd(self.root / "sshd", [ua.name, ub.name], log_level="ERROR")
            self.servers.append(sshd)  # before it starts: one that fails to come up is still stopped
            sshd.start()
            alpha = harness.PeerkitInstance(ua, "site-a", sshd).init()
            beta = harness.PeerkitInstance(ub, "site-b", sshd).init()
            harness.pair_both_ways(alpha, beta)
            beta.cli("ping", "site-a")  # records alpha's host key (rsync needs it)
            self._main = (sshd, alpha, beta)
        return self._main

    def agent(self) -> "BenchAgent":
        """`peerkit agent` as beta's user, started on first use."""
        if self._agent is None:
            self._agent = BenchAgent(self.main()[2])
        return self._agent

    def discard(self, path: Path) -> None:
        """Move ``path`` out of the way and out of the page cache; it is deleted with everything else at the end.

        Deleting a 20,000-file tree just before the next run made that run's
        file creation take 16-19 s of kernel time instead of 1.5-3.7 s (a
        local `tar -x`, measured): ext4 does not reuse an inode freed in the
        last minutes and reads inode tables to skip them (`perf`: its
        `recently_deleted`), so neither side is timed right after a
        deletion.  ``evict`` says why its pages go.
        """
        if not path.exists():
            return
        trash = self.root / "trash"
        trash.mkdir(exist_ok=True)
        moved = trash / f"{len(os.listdir(trash))}-{path.name}"
        try:
            path.rename(moved)
        except OSError:  # another filesystem: delete after all
            drop(path)
            return
        evict(moved)

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                s.stop()
        for ns in self.netns:
            harness.run_root(["ip", "netns", "del", ns], check=False)
        for link in self.links:
            harness.run_root(["ip", "link", "del", link], check=False)
        for u in self.users:
            # Whatever a stopped run left running as the user (a pull, a
            # peer-shell, an rsync) would keep its files, and userdel, busy.
            harness.run_root(["pkill", "-KILL", "-U", str(u.uid)], check=False)
            with contextlib.suppress(Exception):
                u.delete()
        shutil.rmtree(self.root, ignore_errors=True)


def pull_argv(inst: harness.PeerkitInstance, peer: str, app: str, *extra: str) -> list[str]:
    return [str(inst.peerkit), "--config", str(inst.config_path), "--json", "pull", peer, app,
            "--no-pre-backup", "--no-progress", *extra]


def ssh_tar_argv(beta: harness.PeerkitInstance, alpha: harness.PeerkitInstance, app: str, dest: Path) -> list[str]:
    ssh = beta.ssh_argv(alpha, f"stream-app {app}", options=["-c", GCM])
    script = f"set -o pipefail; {shlex.join(map(str, ssh))} | tar -x -C {shlex.quote(str(dest))}"
    return ["/bin/bash", "-c", script]


def stage_seconds(json_out: str, stage: str) -> float:
    """Return how long ``stage`` took in a `peerkit --json pull` result (0 if absent)."""
    return stages_of(json_out).get(stage, 0.0)


def stages_of(json_out: str) -> dict[str, float]:
    """Return every stage's seconds in a `peerkit --json pull` result."""
    for line in reversed(json_out.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and "stages" in result:
            return {s["name"]: s["duration_ms"] / 1000 for s in result["stages"]}
    return {}


def stage_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Return the median seconds of each stage over ``runs``, in pipeline order."""
    names = [name for name in (runs[0] if runs else {})]
    return {n: round(statistics.median(r.get(n, 0.0) for r in runs), 3) for n in names}


def fresh_dir(path: Path, user: harness.ThrowawayUser) -> Path:
    drop(path)
    path.mkdir(parents=True)
    os.chown(path, user.uid, user.gid)
    return path


# -- cases ---------------------------------------------------------------------------

def case_full(env: Env, sizes: Sizes, runs: int, small: bool) -> list[Row]:
    sshd, alpha, beta = env.main()
    if small:
        slug, label = "small-files", f"full pull, {sizes.small_files:,} files of 4 KiB in {sizes.small_dirs} dirs"
        make_app(alpha, slug, lambda p: gen_small(p, sizes.small_files, sizes.small_dirs))
    else:
        slug, label = "one-large", f"full pull, one {sizes.large / MiB:,.0f} MiB incompressible file"
        make_app(alpha, slug, lambda p: gen_large(p, sizes.large))
    row = Row("full-small" if small else "full-large", label, "peerkit pull",
              f"ssh -c {GCM} … stream-app | tar -x", target="≤ 1.0×")
    dest = beta.user.home / "baseline" / slug

    def before(side: str) -> None:
        env.discard(beta.apps_dir / slug)
        env.discard(dest)
        fresh_dir(dest, beta.user)
        settle_disk()

    flushes: list[float] = []
    peaks: list[float] = []
    agent = env.agent()

    def pull(via_agent: bool = False) -> float:
        res = timed(beta.user, pull_argv(beta, "site-a", slug, "--compress", "none"),
                    env=agent.env if via_agent else None)
        if not via_agent:
            flushes.append(stage_seconds(res.out, "flush"))
            peaks.append(res.maxrss_kib / 1024)  # the agent's worker is not this process
        return res.seconds

    with_agent: list[float] = []
    served = agent.served()
    rotate(runs, [("a", row.a_name, pull, row.a), ("agent", "peerkit pull (agent)", lambda: pull(True), with_agent),
                  ("b", row.b_name, lambda: timed(beta.user, ssh_tar_argv(beta, alpha, slug, dest)).seconds, row.b)],
           row.case, row.unit, before)
    agent.check(served, runs)
    # What writing the copy to disk before the swap costs (the baseline does not).
    row.extra["flush_stage_seconds"] = flushes
    # The memory case holds RSS to its target with large files; this says the same of many small ones.
    row.extra["peak_rss_mib"] = peaks
    row.note = (f"of which flush (syncfs before the swap) {statistics.median(flushes):.2f} s median; "
                f"client peak RSS {max(peaks):.0f} MiB")
    env.discard(dest)
    env.discard(beta.apps_dir / slug)
    env.discard(alpha.apps_dir / slug)
    rows = [row, agent_row(row, with_agent, "peerkit pull (agent)")]
    for r in rows:
        r.ratio = statistics.median(r.a) / statistics.median(r.b)
        r.met = r.ratio <= 1.0
    return rows


def _mutator(app: Path):
    counter = [0]

    def change() -> None:
        counter[0] += 1
        target = app / "d00" / "f00000.bin"
        with open(target, "r+b") as fh:
            fh.write(random.Random(SEED * 7 + counter[0]).randbytes(MiB))
        # The pull's flush (syncfs) would otherwise also write what the
        # harness and the previous run left dirty, which the baseline never does.
        settle_disk()
    return change


def _incr_setup(env: Env, sizes: Sizes):
    sshd, alpha, beta = env.main()
    slug = "file-set"
    app = alpha.apps_dir / slug
    if not app.exists():
        make_app(alpha, slug, lambda p: gen_set(p, sizes.incr_set))
    if not (beta.apps_dir / slug).exists():
        timed(beta.user, pull_argv(beta, "site-a", slug, "--compress", "none"))
    return sshd, alpha, beta, slug, app


def case_incr_vs_full(env: Env, sizes: Sizes, runs: int) -> list[Row]:
    sshd, alpha, beta, slug, app = _incr_setup(env, sizes)
    change = _mutator(app)
    row = Row("incr-vs-full", f"re-pull after changing one 1 MiB file of the {sizes.incr_set / MiB:,.0f} MiB set "
              f"({sizes.incr_set // MiB} files of 1 MiB)", "peerkit pull --incremental", "peerkit pull (full)",
              target="≥ 10× faster")
    agent = env.agent()
    # Both sides through the agent too: a deployment with the agent has it for both.
    with_agent = Row(row.case + "+agent", "same, with `peerkit agent` running (PEERKIT_AGENT set: no process start)",
                     "peerkit pull --incremental (agent)", "peerkit pull (full, agent)", target=row.target)
    stages: list[dict[str, float]] = []
    agent_stages: list[dict[str, float]] = []

    def full(via_agent: bool) -> float:
        return timed(beta.user, pull_argv(beta, "site-a", slug, "--compress", "none"),
                     env=agent.env if via_agent else None).seconds

    served = agent.served()
    rotate(runs, [("a", row.a_name, lambda: incremental_pull(beta, slug, stages), row.a),
                  ("b", row.b_name, lambda: full(False), row.b),
                  ("agent-a", with_agent.a_name, lambda: incremental_pull(beta, slug, agent_stages, agent), with_agent.a),
                  ("agent-b", with_agent.b_name, lambda: full(True), with_agent.b)],
           row.case, row.unit, lambda side: change())
    agent.check(served, 2 * runs)
    for r, st in ((row, stages), (with_agent, agent_stages)):
        r.ratio = statistics.median(r.a) / statistics.median(r.b)
        r.met = 1 / r.ratio >= 10
        r.extra["incremental_stage_seconds"] = stage_medians(st)
        r.note = f"speed-up {1 / r.ratio:.2f}×; " + stage_note(r.extra["incremental_stage_seconds"])
    return [row, with_agent]


def stage_note(medians: dict[str, float]) -> str:
    """Say where an incremental pull's time went (stages of 5 ms or more)."""
    parts = [f"{name} {sec * 1000:.0f}" for name, sec in medians.items() if sec >= 0.005]
    return "stage medians, ms: " + ", ".join(parts) if parts else "no stage times"


def incremental_pull(beta: harness.PeerkitInstance, slug: str, stages: list[dict[str, float]],
                     agent: "BenchAgent | None" = None) -> float:
    """Run one `peerkit pull --incremental` (through ``agent`` if given); keep its stage times; return its seconds."""
    res = timed(beta.user, pull_argv(beta, "site-a", slug, "--incremental"), env=agent.env if agent else None)
    stages.append(stages_of(res.out))
    return res.seconds


class BenchAgent:
    """`peerkit agent` running as ``inst``'s user (tests/support/agent.py); ``env`` makes `peerkit` use it."""

    def __init__(self, inst: harness.PeerkitInstance) -> None:
        from tests.support.agent import AgentProcess, private_dir

        # The agent refuses a socket directory anyone else could write to.
        run_dir = private_dir(inst.user.home / "agent", inst.user.uid, inst.user.gid)
        self.env = inst.user.env(extra_path=[harness.venv_bin()], PEERKIT_AGENT=str(run_dir / "agent.sock"))
        self.process = AgentProcess(run_dir / "agent.sock", argv=[str(inst.peerkit), "agent"],
                                    popen=inst.user.popen, env=self.env)

    def served(self) -> int:
        """How many pulls the agent's workers finished."""
        return sum(1 for _pid, command, outcome in self.process.workers() if (command, outcome) == ("pull", "exit 0"))

    def check(self, before: int, expected: int) -> None:
        """Fail unless ``expected`` more pulls ran in the agent since ``before``: a caller
        the agent refused runs the pull itself, which would be timed as the agent's."""
        # A worker tells its caller its status before the agent reaps and logs it.
        deadline = time.monotonic() + 30
        while self.served() - before < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.served() - before != expected or self.process.proc.poll() is not None:
            raise harness.HarnessError(f"the agent ran {self.served() - before} of {expected} pulls: "
                                       f"{self.process.log()[-800:]}")

    def close(self) -> None:
        self.process.__exit__(None, None, None)


def rrsync_path() -> str | None:
    for p in ("/usr/bin/rrsync", "/usr/share/doc/rsync/scripts/rrsync"):
        if os.path.exists(p):
            return p
    gz = Path("/usr/share/doc/rsync/scripts/rrsync.gz")
    if gz.exists():
        import gzip
        out = Path("/usr/local/lib/peerkit-bench-rrsync")
        out.write_bytes(gzip.decompress(gz.read_bytes()))
        out.chmod(0o755)
        return str(out)
    return None


def case_incr_vs_rsync(env: Env, sizes: Sizes, runs: int) -> list[Row]:
    sshd, alpha, beta, slug, app = _incr_setup(env, sizes)
    row = Row("incr-vs-rsync", f"same ({sizes.incr_set / MiB:,.0f} MiB set, one 1 MiB file changed)",
              "peerkit pull --incremental", "rsync -a over ssh with rrsync -ro", target="≤ 1.2×")
    rr = rrsync_path()
    if rr is None:
        row.note = "not run: rrsync not found"
        return [row]
    # A second key of beta's, authorized on alpha behind rrsync only.
    key = beta.user.home / ".ssh" / "bench-rsync"
    if not key.exists():
        beta.user.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-rsync", "-f", str(key)], check=True)
        line = (f'restrict,command="{rr} -ro {alpha.apps_dir}" '
                + (key.with_name("bench-rsync.pub")).read_text().strip() + "\n")
        ak = alpha.authorized_keys
        alpha.user.write_file(ak, ak.read_bytes() + line.encode(), mode=0o600)
    dest = beta.user.home / "rsync-copy"
    if not dest.exists():
        fresh_dir(dest, beta.user)
        harness.run_root(["cp", "-a", str(beta.apps_dir / slug) + "/.", str(dest)], timeout=600)
    ssh = shlex.join(["ssh", *harness.ssh_options(key, sshd.known_hosts_path), "-c", GCM, "-p", str(sshd.port)])
    rsync = ["rsync", "-a", "-e", ssh, f"{alpha.user.name}@{sshd.host}:{slug}/", f"{dest}/"]
    change = _mutator(app)
    stages: list[dict[str, float]] = []
    # What staging costs rsync itself: before each baseline run, the same
    # rsync into a new directory seeded by --link-dest against its copy
    # (peerkit's way: the copy in use is never written).  Not the target's
    # baseline, reported beside it.
    staged: list[float] = []
    agent = env.agent()
    with_agent = agent_row(row, [], "peerkit pull --incremental (agent)")
    agent_stages: list[dict[str, float]] = []
    current: list[bool] = []

    def baseline() -> float:
        into = fresh_dir(beta.user.home / f"rsync-staged-{len(staged)}", beta.user)
        staged.append(timed(beta.user, rsync[:-1] + [f"--link-dest={dest}", f"{into}/"]).seconds)
        env.discard(into)
        settle_disk()  # what it wrote is not the in-place run's to flush
        seconds = timed(beta.user, rsync).seconds
        # The copy must really be current (rsync -a via rrsync did the work):
        # checked now, as the source changes before every run of either side.
        current.append((dest / "d00" / "f00000.bin").read_bytes() == (app / "d00" / "f00000.bin").read_bytes())
        return seconds

    change()
    served = agent.served()
    rotate(runs, [("a", row.a_name, lambda: incremental_pull(beta, slug, stages), row.a),
                  ("agent", with_agent.a_name, lambda: incremental_pull(beta, slug, agent_stages, agent), with_agent.a),
                  ("b", row.b_name, baseline, row.b)],
           row.case, row.unit, lambda side: change())
    agent.check(served, runs)
    row.extra["rsync_staged_stats"] = row.stats(staged)
    staged_median = statistics.median(staged)
    for r, st in ((row, stages), (with_agent, agent_stages)):
        r.extra["incremental_stage_seconds"] = stage_medians(st)
        r.ratio = statistics.median(r.a) / statistics.median(r.b)
        r.met = r.ratio <= 1.2
        r.note = stage_note(r.extra["incremental_stage_seconds"])
    row.note = (f"rsync -a with --link-dest into a new directory (staging, as peerkit does): "
                f"{staged_median:.2f} s, peerkit {statistics.median(row.a) / staged_median:.2f}× that; " + row.note)
    if not all(current):
        row.note = "WARNING: rsync copy differs from the source"
    return [row, with_agent]


def case_memory(env: Env, sizes: Sizes, runs: int) -> Row:
    sshd, alpha, beta = env.main()
    make_app(alpha, "mem-small", lambda p: gen_random_file(p / "data.bin", sizes.mem_small, random.Random(SEED + 5)))
    make_app(alpha, "mem-large", lambda p: gen_random_file(p / "data.bin", sizes.mem_large, random.Random(SEED + 6)))
    row = Row("memory", f"client peak RSS, {sizes.mem_small / MiB:,.0f} MiB vs {sizes.mem_large / MiB:,.0f} MiB app",
              f"pull {sizes.mem_large / MiB:,.0f} MiB", f"pull {sizes.mem_small / MiB:,.0f} MiB", unit="MiB",
              target="peak RSS ≤ 64 MiB and flat (large/small ≤ 1.25)")

    def pull(slug: str) -> float:
        drop(beta.apps_dir / slug)
        return timed(beta.user, pull_argv(beta, "site-a", slug, "--compress", "none")).maxrss_kib / 1024

    alternate(runs, lambda: pull("mem-large"), lambda: pull("mem-small"), row)
    for slug in ("mem-small", "mem-large"):
        drop(beta.apps_dir / slug)
        drop(alpha.apps_dir / slug)
    row.ratio = statistics.median(row.a) / statistics.median(row.b)
    row.met = max(row.a + row.b) <= 64 and row.ratio <= 1.25
    return row


def case_ping(env: Env, sizes: Sizes, runs: int) -> Row:
    sshd, alpha, beta = env.main()
    row = Row("ping", "ping round trip (process start to exit)", "peerkit ping", f"ssh -c {GCM} … ping",
              unit="ms", target="≤ 1.5×")
    argv_a = [str(beta.peerkit), "--config", str(beta.config_path), "ping", "site-a"]
    argv_b = [str(a) for a in beta.ssh_argv(alpha, "ping", options=["-c", GCM])]
    alternate(runs * 3, lambda: timed(beta.user, argv_a).seconds * 1000,
              lambda: timed(beta.user, argv_b).seconds * 1000, row)
    row.ratio = statistics.median(row.a) / statistics.median(row.b)
    row.met = row.ratio <= 1.5
    return row


def case_forced(env: Env, sizes: Sizes, runs: int) -> Row:
    sshd, alpha, beta = env.main()
    row = Row("forced-command", "forced-command start: peer-shell answering ping, run directly",
              "peer-shell … (ping)", "/bin/true", unit="ms", target="peer-shell ≤ 80 ms")
    e = alpha.user.env(SSH_ORIGINAL_COMMAND="ping", SSH_CONNECTION="127.0.0.1 50000 127.0.0.1 22")
    argv = [str(alpha.peer_shell), "--config", str(alpha.config_path), "site-b"]
    alternate(runs * 3, lambda: timed(alpha.user, argv, env=e).seconds * 1000,
              lambda: timed(alpha.user, ["/bin/true"], env=e).seconds * 1000, row)
    row.ratio = statistics.median(row.a) / statistics.median(row.b)
    row.met = statistics.median(row.a) <= 80
    return row


def case_fanout(env: Env, sizes: Sizes, runs: int) -> Row:
    """One user, N+1 instances (separate homes), each with its own `peerkit serve`."""
    n = sizes.peers
    row = Row("fanout", f"fan-out ping, {n} peers (embedded servers)", "peerkit ping --all", "one peerkit ping",
              unit="ms", target="≤ 3×")
    u = env.user()
    base = env.root / "fan"
    base.mkdir(mode=0o755)
    known = base / "known_hosts"

    def instance(name: str) -> harness.PeerkitInstance:
        home = base / name
        home.mkdir(mode=0o755)
        os.chown(home, u.uid, u.gid)
        alias = harness.ThrowawayUser(u.name, u.uid, u.gid, home)  # same account, own HOME
        server = harness.EmbeddedServer(base / f"serve-{name}", alias, known_hosts_path=known)
        env.servers.append(server)
        return harness.PeerkitInstance(alias, name, server).init()

    t = time.monotonic()
    hub = instance("hub")
    hub_token = hub.token()
    for i in range(n):
        p = instance(f"peer-{i:02d}")
        p.pair(hub_token)       # the hub may call p
        hub.pair(p.token())     # the hub knows how to reach p
    print(f"  {n} embedded servers paired in {time.monotonic() - t:.0f}s", flush=True)
    argv_all = [str(hub.peerkit), "--config", str(hub.config_path), "ping", "--all"]
    argv_one = [str(hub.peerkit), "--config", str(hub.config_path), "ping", "peer-00"]
    timed(hub.user, argv_all)  # first contact records every host key
    alternate(runs, lambda: timed(hub.user, argv_all).seconds * 1000,
              lambda: timed(hub.user, argv_one).seconds * 1000, row)
    row.ratio = statistics.median(row.a) / statistics.median(row.b)
    row.met = row.ratio <= 3
    for s in list(env.servers):
        if isinstance(s, harness.EmbeddedServer):
            s.stop()
    return row


class NsSshd(harness.Sshd):
    """The fixture's sshd, started inside a network namespace on a veth address."""

    def __init__(self, workdir: Path, users: list[str], netns: str, host: str) -> None:
        super().__init__(workdir, users, log_level="ERROR")
        self.netns = netns
        self.host = host

    def start(self, timeout: float = 15, attempts: int = 1) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        self._ensure_privsep_dir()
        self._make_host_keys()
        self.port = 2222  # the namespace is ours: nothing else listens there
        self._write_config()
        self._write_known_hosts()
        harness.run_root([self.sshd, "-t", "-f", str(self.config_path)])
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, self.sshd, "-D", "-e", "-f",
                                      str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True)
        ok = harness.wait_until(lambda: "Server listening" in self.log_text() or self.proc.poll() is not None
                                or harness.run_root(["ip", "netns", "exec", self.netns, "ss", "-ltn"],
                                                    check=False).stdout.count(f":{self.port} ") > 0, timeout, 0.1)
        if not ok or self.proc.poll() is not None:
            raise harness.HarnessError(f"sshd in {self.netns} did not start: {self.log_text()[-1000:]}")


def case_compress(env: Env, sizes: Sizes, runs: int) -> Row:
    row = Row("compress", f"compressible {sizes.compressible / MiB:,.0f} MiB (log text + SQL dump), "
              "100 Mbit/s veth between two netns (tc tbf)", "--compress auto", "--compress none",
              target="≥ 3× faster")
    tag = f"{os.getpid() % 100000}"
    ns_s, ns_c = f"pkb-s{tag}", f"pkb-c{tag}"
    vs, vc = f"pkb{tag}s", f"pkb{tag}c"
    try:
        # Each listed before it is made: a failure halfway still removes it.
        env.netns.append(ns_s)
        harness.run_root(["ip", "netns", "add", ns_s])
        env.netns.append(ns_c)
        harness.run_root(["ip", "netns", "add", ns_c])
        env.links.append(vs)
        harness.run_root(["ip", "link", "add", vs, "type", "veth", "peer", "name", vc])
        harness.run_root(["ip", "link", "set", vs, "netns", ns_s])
        harness.run_root(["ip", "link", "set", vc, "netns", ns_c])
        for ns, dev, addr in ((ns_s, vs, "10.77.0.1/24"), (ns_c, vc, "10.77.0.2/24")):
            x = ["ip", "netns", "exec", ns]
            harness.run_root([*x, "ip", "link", "set", "lo", "up"])
            harness.run_root([*x, "ip", "addr", "add", addr, "dev", dev])
            harness.run_root([*x, "ip", "link", "set", dev, "up"])
            harness.run_root([*x, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit",
                              "burst", "32kbit", "latency", "50ms"])
    except harness.HarnessError as exc:
        row.note = f"not run: {exc}"
        return row
    us, uc = env.user(), env.user()
    sshd = NsSshd(env.root / "sshd-ns", [us.name, uc.name], ns_s, "10.77.0.1")
    env.servers.append(sshd)
    sshd.start()
    src = harness.PeerkitInstance(us, "site-s", sshd).init()
    dst = harness.PeerkitInstance(uc, "site-c", sshd).init()
    harness.pair_both_ways(src, dst)
    make_app(src, "compressible", lambda p: gen_compressible(p, sizes.compressible))
    wrap = ["ip", "netns", "exec", ns_c, "setpriv", f"--reuid={uc.uid}", f"--regid={uc.gid}", "--clear-groups"]
    # A paired peer is pinged before it is pulled from, as in the main pair:
    # the ping records its host key and features (pulls start with the ping).
    timed(uc, [str(dst.peerkit), "--config", str(dst.config_path), "ping", "site-s"], wrap=wrap)

    def pull(mode: str) -> float:
        r = timed(uc, pull_argv(dst, "site-s", "compressible", "--compress", mode), wrap=wrap)
        last = json.loads(r.out.strip().splitlines()[-1])
        row.extra.setdefault("notes_" + mode, last.get("notes"))
        return r.seconds

    alternate(runs, lambda: pull("auto"), lambda: pull("none"), row,
              lambda side: drop(dst.apps_dir / "compressible"))
    row.ratio = statistics.median(row.a) / statistics.median(row.b)
    row.met = 1 / row.ratio >= 3
    row.note = f"speed-up {1 / row.ratio:.2f}×; auto chose: {(row.extra.get('notes_auto') or ['?'])[-1]}"
    return row


# -- the machine and the report ---------------------------------------------------------

def machine() -> dict:
    cpu, flags = "?", ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    import asyncssh
    import peerkit

    def ver(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    return {"cpu": cpu, "cores": os.cpu_count(), "aes": " aes" in flags,
            "kernel": platform.release(), "python": platform.python_version(),
            "peerkit": getattr(peerkit, "__version__", "?"), "asyncssh": asyncssh.__version__,
            "openssh": ver(["ssh", "-V"]), "rsync": ver(["rsync", "--version"]), "zstd": ver(["zstd", "--version"]),
            "tar": ver(["tar", "--version"]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def fmt(xs: list[float], unit: str) -> str:
    if not xs:
        return "–"
    d = 0 if unit in ("ms", "MiB") and statistics.median(xs) >= 10 else 2 if unit == "s" else 1
    return f"{statistics.median(xs):.{d}f} ({min(xs):.{d}f}–{max(xs):.{d}f}) {unit}"


def markdown(rows: list[Row], info: dict, quick: bool, runs: int) -> str:
    title = ("peerkit benchmarks — QUICK (scaled-down data sets)" if quick else "peerkit benchmarks — full size")
    m = info
    out = [f"### {title}", "",
           f"{m['date']} · {m['cpu']}, {m['cores']} cores, AES instructions: {'yes' if m['aes'] else 'no'} · "
           f"Linux {m['kernel']} · Python {m['python']} · peerkit {m['peerkit']} · asyncssh {m['asyncssh']} · "
           f"{m['openssh']} · {m['rsync'].replace('  ', ' ')} · zstd {next((w.strip(',') for w in m['zstd'].split() if w.startswith('v1')), m['zstd'])}",
           "", f"Medians of {runs} runs per side ({3 * runs} for ping and forced-command) (min–max in brackets), peerkit and baseline "
           "alternated (the rows “with `peerkit agent` running” in the same rotation, against the same baseline runs); "
           "ratio = peerkit median / baseline median.", "",
           "| case | peerkit | baseline | peerkit | baseline | ratio | target | result |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        result = "not run" if r.met is None else ("met" if r.met else "**missed**")
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}×"
        note = f" — {r.note}" if r.note else ""
        out.append(f"| {r.label}{note} | {r.a_name} | {r.b_name} | {fmt(r.a, r.unit)} | {fmt(r.b, r.unit)} | "
                   f"{ratio} | {r.target} | {result} |")
    return "\n".join(out) + "\n"


RUNNERS = {
    "full-large": lambda e, s, n: case_full(e, s, n, small=False),
    "full-small": lambda e, s, n: case_full(e, s, n, small=True),
    "incr-vs-full": case_incr_vs_full,
    "incr-vs-rsync": case_incr_vs_rsync,
    "memory": case_memory,
    "ping": case_ping,
    "forced-command": case_forced,
    "fanout": case_fanout,
    "compress": case_compress,
}


class Stopped(BaseException):
    """A signal asked the run to stop: what is done is reported, everything made is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """SIGTERM, SIGHUP and SIGINT ask the run to stop; :meth:`check` raises :class:`Stopped` at the next step.

    Killed outright, a run would leave its throwaway accounts, sshd, servers,
    network namespaces and gigabytes of data behind.  The handler only takes
    note: an exception raised from it could land anywhere, and in two places
    it did harm (inside ``pwd.getpwnam``, where C code dropped it and the run
    went on; inside ``subprocess.Popen``, after the fork and before the
    object existed, so a ``useradd`` nobody could kill or wait for made its
    account after the clean-up).  The run stops where it checks instead:
    before each case, each timed command and every few MiB of generated data,
    and while a timed command runs (which is then killed).  A SIGINT the run
    was started ignoring (``bench &`` from a script) stays ignored: stop such
    a run with SIGTERM.
    """

    HANDLED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.cleaning = False

    def install(self) -> None:
        for sig in self.HANDLED:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(f"peerkit-bench: {name}: stopping", file=sys.stderr, flush=True)
        else:
            print(f"peerkit-bench: {name}: already stopping"
                  + ("; still removing what the run made" if self.cleaning else ""), file=sys.stderr, flush=True)

    def stopped(self) -> "Stopped | None":
        """The stop a signal asked for, if one came."""
        return None if self.signum is None else Stopped(self.signum)

    def check(self) -> None:
        """Raise the stop a signal asked for (never once the clean-up began)."""
        if self.signum is not None and not self.cleaning:
            raise Stopped(self.signum)


STOP = StopSignals()  # installed by main(); scripts that import this module keep their own handlers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="peerkit-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (as root, from a checkout):\n"
               "  bin/peerkit-bench --quick                   # scaled-down data sets\n"
               "  bin/peerkit-bench --cases incr-vs-full,incr-vs-rsync --runs 7 --out bench-results/")
    ap.add_argument("--quick", action="store_true", help="scaled-down data sets (said so in the table title)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--runs", type=int, default=None, help="runs per side (default 5, --quick 3)")
    ap.add_argument("--out", default="bench-results", help="output directory (default bench-results/)")
    ap.add_argument("--no-wait", action="store_true",
                    help=f"start at once, even within {SETTLE_AFTER_CLEANUP / 60:.0f} minutes of the last "
                         "full-size run's clean-up (its results then suffer)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in RUNNERS]
    if unknown:
        ap.error(f"unknown case(s): {', '.join(unknown)}")
    problems = harness.missing_prerequisites()
    if problems:
        print("cannot run the benchmarks: " + "; ".join(problems), file=sys.stderr)
        return 2
    # peer-shell runs as the throwaway users, who cannot write the checkout's
    # __pycache__: a module edited since root last imported it would be
    # compiled again on every call and counted as start-up time.
    import compileall
    compileall.compile_dir(str(REPO / "peerkit"), quiet=1)
    runs = args.runs or (3 if args.quick else 5)
    sizes = Sizes.quick() if args.quick else Sizes()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    stopped: Stopped | None = None
    rows: list[Row] = []
    env: Env | None = None
    done = 0  # cases that have their rows
    # Only a full-size run that makes (and deletes) data sets waits, and is waited for.
    heavy = not args.quick and bool(DATA_CASES.intersection(cases))
    try:
        STOP.install()
        if heavy and not args.no_wait:
            wait_after_cleanup()
        env = Env(harness.make_root("peerkit-bench-"))
        print(f"working in {env.root} (removed at the end, or on SIGTERM)", flush=True)
        for case in cases:
            STOP.check()
            print(f"== {case}", flush=True)
            t = time.monotonic()
            try:
                made = RUNNERS[case](env, sizes, runs)
                rows.extend(made if isinstance(made, list) else [made])
            except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
                traceback.print_exc()
                rows.append(Row(case, case, "", "", note=f"not run: {type(exc).__name__}: {str(exc)[:200]}"))
            done += 1
            print(f"   ({time.monotonic() - t:.0f}s)", flush=True)
    except Stopped as exc:
        stopped = exc
        print(f"peerkit-bench: {exc}: removing the test accounts, servers and data", file=sys.stderr, flush=True)
    finally:
        STOP.cleaning = True
        if env is not None:
            env.close()
            if heavy:
                mark_cleaned()
    stopped = stopped or STOP.stopped()  # one that came after the last check
    rows += [Row(case, case, "", "", note=f"not run: {stopped}") for case in cases[done:]]
    md = markdown(rows, info, args.quick, runs)
    (out / "results.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(
        {"quick": args.quick, "runs": runs, "sizes": sizes.__dict__, "machine": info,
         "cases": [r.to_json() for r in rows]}, indent=2) + "\n", encoding="utf-8")
    print()
    print(md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return 0 if stopped is None else 128 + stopped.signum
