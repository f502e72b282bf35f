"""Network faults: the pull finishes or fails cleanly within its timeouts, and never hangs.

* A fault-injecting TCP proxy on 127.0.0.1 (tests/faults/proxy.py) between
  the puller ``px`` and the private sshd: latency, a stall that resumes, a
  stall for good, resets (RST) and a flipped bit at seeded offsets, some of
  them in the key exchange, authentication, ping and list-apps (where a
  garbled packet once crashed the client, and a lost connection was
  reported as ``refused``).  A failure must carry the code of the stage it
  happened in: ping ``peer-unreachable`` or ``host-key-mismatch``,
  inventory ``peer-unreachable``, transfer ``transfer-incomplete``.
* A link cut: two network namespaces made by the test, joined by a veth
  pair with 10.231.x.1/30 and .2/30 inside them (no other address is ever
  used), an sshd in one and the pulling client in the other; the test sets
  the client's end ``down`` mid-transfer (for good, or for two seconds),
  and before a connection is made.

Timeouts.  peerkit's client gives up on a silent connection after
``client.IDLE_TIMEOUT`` (120 s) or four unanswered keepalives 15 s apart;
neither is configurable.  So that a dead link costs seconds, not minutes,
the runs that wait for those timeouts start the real CLI through a small
launcher that lowers them in that process only (idle 5-10 s, keepalives
2-3 s); everything else is the product unchanged.  With --peerkit-long the
link cut also runs with the real defaults (and must fail within 150 s).
Every run has a hard deadline: a hang fails the test.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.faults.common import Scenario, check, prepare
from tests.faults.proxy import FaultProxy
from tests.hostile import rig
from tests.hostile.counts import COUNTS, long_run
from tests.support import sshd as harness

pytestmark = pytest.mark.integration  # real sshd, network namespaces, root

LAUNCHER = r'''
import sys

import asyncssh
import peerkit.client as client

# Test launcher: the real peerkit CLI with shorter idle and keepalive timeouts (this process only).
idle, keepalive = float(sys.argv[1]), float(sys.argv[2])
client.IDLE_TIMEOUT = idle
client.PeerConnection.stream.__defaults__ = client.PeerConnection.stream.__defaults__[:-1] + (idle,)
_connect = asyncssh.connect


async def connect(*args, **kw):
    kw["keepalive_interval"], kw["keepalive_count_max"] = keepalive, 3
    return await _connect(*args, **kw)


asyncssh.connect = connect
from peerkit.cli.main import run  # noqa: E402

sys.exit(run(sys.argv[3:]))
'''
STAGE_CODES = {"ping": {"peer-unreachable", "host-key-mismatch"}, "inventory": {"peer-unreachable"},
               "transfer": {"transfer-incomplete"}, "verify": {"transfer-incomplete"}}
_SET_PORT = r'''
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
with con:
    (text,) = con.execute("SELECT config_json FROM peers WHERE name = ?", (sys.argv[2],)).fetchone()
    config = json.loads(text)
    config["port"] = int(sys.argv[3])
    con.execute("UPDATE peers SET config_json = ? WHERE name = ?", (json.dumps(config, sort_keys=True), sys.argv[2]))
'''


def install_launcher(puller: rig.Puller):
    path = puller.inst.user.home / "peerkit-short-timeouts.py"
    puller.inst.user.write_file(path, LAUNCHER.encode(), mode=0o644)
    return path


def launcher_argv(puller: rig.Puller, idle: float, keepalive: float, *args: str) -> list[str]:
    return [sys.executable, "-I", str(puller.inst.user.home / "peerkit-short-timeouts.py"), str(idle),
            str(keepalive), *args, "--json"]


def check_network(case, run: rig.Run) -> str:
    """The common invariants, plus: a failure is reported by the stage it happened in."""
    state = check(case, run, {"ok", "peer-unreachable", "host-key-mismatch", "transfer-incomplete"})
    if run.code != "ok":
        failed = [name for name, st in run.stages.items() if st["outcome"] == "failed"]
        assert failed and run.code in STAGE_CODES.get(failed[0], ()), case.fail(f"{run.code} in {failed}\n{run.why()}")
    return state


# -- the proxy --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def px(world) -> rig.Puller:
    puller = world.puller("px")
    install_launcher(puller)
    return puller


TOTALS: dict[str, int] = {}


def _route_through(puller: rig.Puller, port: int) -> None:
    puller.inst.user.run([sys.executable, "-c", _SET_PORT, str(puller.inst.state_dir / "peers.db"),
                          puller.source.inst.name, str(port)], check=True)


PROXY_RUNS = ([("latency", {})] + [("stall-resume", {})] + [("stall-forever", {})]
              + [("reset-down", {})] * 4 + [("reset-early", {})] * 3 + [("reset-up", {})]
              + [("corrupt", {})] * 2 + [("corrupt-handshake", {})] * 3)
if long_run():
    PROXY_RUNS = PROXY_RUNS + [("reset-down", {})] * 8 + [("corrupt", {})] * 6 + [("stall-resume", {})] * 2


@pytest.mark.parametrize("index,kind", [(i, k) for i, (k, _p) in enumerate(PROXY_RUNS)],
                         ids=[f"{i:02d}-{k}" for i, (k, _p) in enumerate(PROXY_RUNS)])
def test_proxy_fault(world, px, index, kind):
    COUNTS.network += 1
    sc = Scenario(500 + index, f"px-{kind}")
    rng = sc.rng()
    case = prepare(px, sc, size=320 << 10, local=True)
    # Offsets are drawn over the first 80% of the bytes a clean pull of the same size moves
    # (measured by the first, latency-only run; the rest varies with window adjustments).
    down = (TOTALS.get("down") or len(px.source.archive(case.slug)) + (8 << 10)) * 4 // 5
    up = (TOTALS.get("up") or 4 << 10) * 4 // 5
    plan: dict = {}
    if kind == "latency":
        plan = {"latency": 0.003}
    elif kind == "stall-resume":
        plan = {"stall_at": rng.randint(down // 10, down // 2), "stall_for": 3}
    elif kind == "stall-forever":
        plan = {"stall_at": rng.randint(down // 10, down // 2), "stall_for": None}
    elif kind == "reset-down":
        plan = {"reset_at": rng.randint(0, down - 1)}
    elif kind == "reset-early":
        # Key exchange, authentication, ping and list-apps: the first 4 kB the server sends.
        plan = {"reset_at": rng.randint(2200, 4200)}
    elif kind == "corrupt-handshake":
        # The clear-text key exchange: name lists (866 hit a decoding crash), the host key.
        plan = {"corrupt_at": 866 if index == PROXY_RUNS.index(("corrupt-handshake", {})) else rng.randint(0, 2400)}
    elif kind == "reset-up":
        plan = {"reset_at": rng.randint(0, up - 1), "reset_dir": "up"}
    elif kind == "corrupt":
        plan = {"corrupt_at": rng.randint(0, down - 1)}
    with FaultProxy((world.sshd.host, world.sshd.port), **plan) as proxy:
        _route_through(px, proxy.port)
        try:
            if kind == "stall-forever":
                argv = launcher_argv(px, 5, 2, "pull", px.source.inst.name, case.slug, "--compress", "none",
                                     "--no-pre-backup")
                bg = rig.Background(argv, user=px.inst.user, env=px.inst.user.env(extra_path=[px.inst.bin_dir]))
                run = bg.finish(timeout=60)
            else:
                run = px.pull(case.slug, "--compress", "none", "--no-pre-backup", timeout=90)
        finally:
            _route_through(px, world.sshd.port)
    state = check_network(case, run)
    if kind == "latency":
        TOTALS.update(proxy.bytes)
    if kind.startswith(("reset", "corrupt", "stall")):
        assert any(e.startswith(kind.split("-")[0]) for e in proxy.events), case.fail(f"never fired: {proxy.events}")
    if kind == "reset-early":
        assert run.code != "ok", case.fail(f"a reset in the handshake went unnoticed: {proxy.events}\n{run.why()}")
    if kind in ("latency", "stall-resume"):
        assert state == "new", case.fail(f"{proxy.events}\n{run.why()}")
    if kind == "stall-forever":
        assert run.code in ("transfer-incomplete", "peer-unreachable") and run.seconds < 40, \
            case.fail(f"{run.seconds:.1f}s {proxy.events}\n{run.why()}")
    COUNTS.network_survived += 1


# -- a link cut between two network namespaces ----------------------------------------------------

class NetnsSshd(harness.Sshd):
    """The harness's sshd config, run inside a network namespace on its 10.231.x.1 address."""

    def __init__(self, workdir, allow_users, namespace: str, address: str) -> None:
        super().__init__(workdir, allow_users)
        self.namespace = namespace
        self.host = address
        self.port = 22

    def start(self, timeout: float = 15, attempts: int = 1) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for kind, path in self.host_keys.items():
            if not path.exists():
                bits = ["-b", "2048"] if kind == "rsa" else []
                harness.run_root(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-f", str(path)])
                os.chmod(path.with_name(path.name + ".pub"), 0o644)
        self.config_path.write_text(self.config_text(), encoding="ascii")
        self.known_hosts_path.write_text(self.known_hosts_text(), encoding="ascii")
        os.chmod(self.known_hosts_path, 0o644)
        harness.run_root([self.sshd, "-t", "-f", str(self.config_path)])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, self.sshd, "-D", "-e", "-f",
                                          str(self.config_path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True)
        if not harness.wait_until(lambda: "Server listening on" in self.log_text(), timeout):
            raise harness.HarnessError(f"sshd in {self.namespace} did not start: {self.log_text()[-2000:]}")


class LinkRig:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        octet = random.Random(tag).randint(16, 250)
        self.ns_src, self.ns_dst = f"pkn-src-{tag}", f"pkn-dst-{tag}"
        self.veth_src, self.veth_dst = f"pks{tag}", f"pkd{tag}"
        self.src_addr, self.dst_addr = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.root = harness.make_root("peerkit-netns-")
        self.users: list[harness.ThrowawayUser] = []
        self.namespaces: list[str] = []
        self.sshd: NetnsSshd | None = None

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return harness.run_root(["ip", *args], check=check)

    def setup(self) -> rig.Puller:
        for ns in (self.ns_src, self.ns_dst):
            self.ip("netns", "add", ns)
            self.namespaces.append(ns)
        self.ip("link", "add", self.veth_src, "type", "veth", "peer", "name", self.veth_dst)
        for ns, dev, addr in ((self.ns_src, self.veth_src, self.src_addr), (self.ns_dst, self.veth_dst, self.dst_addr)):
            self.ip("link", "set", dev, "netns", ns)
            self.ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            self.ip("-n", ns, "link", "set", dev, "up")
            self.ip("-n", ns, "link", "set", "lo", "up")
        src_user = harness.ThrowawayUser.create(self.root, prefix="pkn")
        self.users.append(src_user)
        dst_user = harness.ThrowawayUser.create(self.root, prefix="pkn")
        self.users.append(dst_user)
        self.sshd = NetnsSshd(self.root / "sshd", [src_user.name, dst_user.name], self.ns_src, self.src_addr)
        self.sshd.start()
        src = harness.PeerkitInstance(src_user, "pkn-src", self.sshd).init()
        dst = harness.PeerkitInstance(dst_user, "pkn-dst", self.sshd).init()
        src.pair(dst.token())
        dst.pair(src.token())
        source = rig.Source(src)
        source.use_standin_for(dst)
        puller = rig.Puller(dst, source)
        install_launcher(puller)
        return puller

    def link(self, up: bool) -> None:
        self.ip("-n", self.ns_dst, "link", "set", self.veth_dst, "up" if up else "down")

    def client_argv(self, puller: rig.Puller, argv: list[str]) -> list[str]:
        user = puller.inst.user
        return ["ip", "netns", "exec", self.ns_dst, "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                "--clear-groups", "--", *argv]

    def start(self, puller: rig.Puller, argv: list[str]) -> rig.Background:
        env = puller.inst.user.env(extra_path=[puller.inst.bin_dir])
        return rig.Background(self.client_argv(puller, argv), env=env)

    def teardown(self) -> None:
        if self.sshd is not None:
            self.sshd.stop()
        for user in self.users:
            _end_sessions_of(user)
        for ns in self.namespaces:
            self.ip("netns", "del", ns, check=False)
        for user in self.users:
            user.delete()
        shutil.rmtree(self.root, ignore_errors=True)


def _end_sessions_of(user: harness.ThrowawayUser) -> None:
    """Kill, by pid, what our sshd still runs for this throwaway user (sessions stuck on a dead link)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                uid_line = next(line for line in fh if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if int(uid_line.split()[1]) == user.uid:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _netns_unavailable() -> str | None:
    name = f"pkn-probe-{secrets.token_hex(3)}"
    proc = harness.run_root(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return f"ip netns add failed: {proc.stderr.strip()}"
    harness.run_root(["ip", "netns", "del", name], check=False)
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) not found"
    return None


@pytest.fixture(scope="module")
def link(world):
    problem = _netns_unavailable()
    if problem:
        rig.unavailable(problem)
    lr = LinkRig()
    try:
        lr.puller = lr.setup()
        yield lr
    finally:
        lr.teardown()


def _pull_args(puller: rig.Puller, slug: str) -> list[str]:
    return ["pull", puller.source.inst.name, slug, "--compress", "none", "--no-pre-backup"]


def _start_paced(link: LinkRig, sc: Scenario, argv_for) -> tuple:
    puller = link.puller
    case = prepare(puller, sc, size=1 << 20, local=True)
    data = puller.source.archive(case.slug)
    puller.source.plan(case.slug, data, chunk=16384, rate=400_000)
    bg = link.start(puller, argv_for(case.slug))
    first = bg.wait_for(lambda obj: obj.get("event") == "progress" and obj["bytes"] > (96 << 10), timeout=60)
    assert first is not None, case.fail(f"no progress: {bg.finish(timeout=60).why()}")
    return case, bg


def test_link_cut_for_good_mid_transfer(link):
    COUNTS.network += 1
    puller = link.puller
    sc = Scenario(600, "link-cut")
    case, bg = _start_paced(link, sc, lambda slug: launcher_argv(puller, 5, 2, *_pull_args(puller, slug)))
    link.link(False)
    cut = time.monotonic()
    try:
        run = bg.finish(timeout=90)
    finally:
        link.link(True)
    waited = time.monotonic() - cut
    check(case, run, {"transfer-incomplete"}, expect="transfer-incomplete")
    assert waited < 30, case.fail(f"{waited:.1f}s after the cut")
    COUNTS.network_survived += 1


def test_link_cut_for_two_seconds_recovers(link):
    COUNTS.network += 1
    puller = link.puller
    sc = Scenario(601, "link-flap")
    case, bg = _start_paced(link, sc, lambda slug: launcher_argv(puller, 10, 3, *_pull_args(puller, slug)))
    link.link(False)
    try:
        time.sleep(2)
    finally:
        link.link(True)
    run = bg.finish(timeout=90)
    check(case, run, {"ok"}, expect="ok")
    COUNTS.network_survived += 1


def test_link_down_before_connecting(link):
    COUNTS.network += 1
    puller = link.puller
    sc = Scenario(602, "link-down")
    case = prepare(puller, sc, local=True)
    puller.configure(ssh={"connect_timeout": 3})
    link.link(False)
    try:
        bg = link.start(puller, [str(puller.inst.peerkit), *_pull_args(puller, case.slug), "--json"])
        run = bg.finish(timeout=60)
    finally:
        link.link(True)
        puller.configure()
    check(case, run, {"peer-unreachable"}, expect="peer-unreachable")
    assert run.seconds < 15 and run.outcomes()[-1] == ("ping", "failed"), case.fail(run.why())
    COUNTS.network_survived += 1


@pytest.mark.skipif(not long_run(), reason="--peerkit-long: waits for the real keepalive timeout (about a minute)")
def test_link_cut_for_good_with_the_default_timeouts(link):
    COUNTS.network += 1
    puller = link.puller
    sc = Scenario(603, "link-cut-default")
    case, bg = _start_paced(link, sc, lambda slug: [str(puller.inst.peerkit), *_pull_args(puller, slug), "--json"])
    link.link(False)
    cut = time.monotonic()
    try:
        run = bg.finish(timeout=200)
    finally:
        link.link(True)
    check(case, run, {"transfer-incomplete"}, expect="transfer-incomplete")
    assert time.monotonic() - cut < 150, case.fail("the default timeouts did not fire")
    COUNTS.network_survived += 1
