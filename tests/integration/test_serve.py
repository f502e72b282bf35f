"""`peerkit serve` itself: environment requests, abuse limits, shutdown.

The refusals every SSH server must make for peerkit (pty, shell, sftp,
forwarding, other commands, unpaired or expired keys, from=, revocation,
rotation) are proven for sshd and serve alike by the parametrized modules
(test_sshd_peer_shell.py, test_pull.py, test_trust_lifecycle.py).  This
module covers what only the embedded server has: it refuses environment
requests, caps connections and sessions, locks out a source that keeps
failing to authenticate, drops clients that never authenticate, and stops
cleanly on SIGTERM, cutting a running transfer so the puller keeps its app.

World (module scope): ``S`` (``site-s``) runs `peerkit serve` as its owner,
with limits each test sets for itself (the server restarts with them, so
every test starts with fresh counters); ``C`` (``site-c``) is paired with S
both ways and is the client, through the real OpenSSH client, the peerkit
CLI, asyncssh or paramiko.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import sshd as harness
from tests.trees import diff, snapshot

pytestmark = pytest.mark.integration

LOCALHOST = "127.0.0.1"
OTHER_SOURCE = "127.0.0.2"  # another loopback address: another source to serve
BIG = 8 << 20


@dataclass
class World:
    root: Path
    s: harness.PeerkitInstance
    c: harness.PeerkitInstance
    baseline: dict  # S's serve: and hooks: sections as the harness wrote them

    @property
    def server(self) -> harness.EmbeddedServer:
        return self.s.server  # type: ignore[return-value]

    def mark(self, name: str) -> Path:
        return self.root / "marks" / name

    def serve_events(self, before: int = 0) -> list[dict]:
        return [e for e in self.s.audit_events()[before:] if e.get("server") == "peerkit-serve"]

    def shell_events(self, before: int = 0) -> list[dict]:
        return [e for e in self.s.audit_events()[before:] if "server" not in e]


@pytest.fixture(scope="module")
def world(harness_root, venv_bin):
    root = harness_root / "serve-limits"
    root.mkdir(mode=0o755)
    (root / "marks").mkdir(mode=0o777)
    os.chmod(root / "marks", 0o777)  # S's hooks leave marks here
    users: list[harness.ThrowawayUser] = []
    servers: list[harness.EmbeddedServer] = []
    try:
        for _ in range(2):
            users.append(harness.ThrowawayUser.create(harness_root))
        problem = harness.check_runs_as(users[0], venv_bin / "peerkit")
        if problem:
            pytest.fail(problem, pytrace=False)
        s_user, c_user = users
        known_hosts = root / "known_hosts"
        servers = [harness.EmbeddedServer(root, user, known_hosts_path=known_hosts, bin_dir=venv_bin)
                   for user in users]
        s = harness.PeerkitInstance(s_user, "site-s", servers[0], venv_bin).init()
        c = harness.PeerkitInstance(c_user, "site-c", servers[1], venv_bin).init()
        harness.pair_both_ways(s, c)
        # S's apps: a small one the session tests hold open, a big one to cut.
        s.user.run(["mkdir", "-p", str(s.apps_dir / "slow"), str(s.apps_dir / "big")], check=True)
        s.user.write_file(s.apps_dir / "slow" / "README", b"slow\n" * 100, mode=0o644)
        s.user.write_file(s.apps_dir / "big" / "blob", os.urandom(BIG), mode=0o644)
        baseline = {"serve": dict(s.settings.get("serve") or {}), "hooks": dict(s.settings["hooks"])}
        yield World(root, s, c, baseline)
    finally:
        for server in servers:
            server.stop()
        errors = []
        for user in users:
            try:
                user.delete()
            except harness.HarnessError as exc:
                errors.append(str(exc))
        if errors:
            raise harness.HarnessError("; ".join(errors))


@pytest.fixture
def configure(world):
    """Let a test give S serve: limits and hooks (the server restarts); the baseline comes back afterwards."""
    def apply(serve: dict | None = None, hooks: dict | None = None, restart: bool = True) -> None:
        def change(data: dict) -> None:
            data["serve"] = {**world.baseline["serve"], **(serve or {})}
            data["hooks"] = {**world.baseline["hooks"], **(hooks or {})}
        world.s.set_config(change)
        if restart:
            world.server.restart()

    yield apply
    apply()  # restarts the server, also after a test stopped it


def client_options(world: World, key=None, local_addr: str | None = None) -> dict:
    """asyncssh.connect() options for C (or ``key``) calling S, hermetic like peerkit's own client."""
    import asyncssh

    options = dict(port=world.server.port, username=world.s.user.name,
                   client_keys=[key if key is not None else asyncssh.read_private_key(str(world.c.identity))],
                   known_hosts=str(world.server.known_hosts_path), agent_path=None, config=[],
                   connect_timeout=10)
    if local_addr:
        options["local_addr"] = (local_addr, 0)
    return options


@contextlib.contextmanager
def paramiko_transport(world: World):
    """A paramiko connection of C to S (another client implementation than asyncssh and OpenSSH)."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(world.server.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(LOCALHOST, port=world.server.port, username=world.s.user.name,
                   pkey=paramiko.Ed25519Key.from_private_key_file(str(world.c.identity)),
                   allow_agent=False, look_for_keys=False, timeout=10)
    try:
        yield client.get_transport()
    finally:
        client.close()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_for_events(world: World, before: int, count: int, timeout: float = 10) -> list[dict]:
    harness.wait_until(lambda: len(world.serve_events(before)) >= count, timeout)
    return world.serve_events(before)


# -- environment requests ------------------------------------------------------------

HOSTILE_ENV = {
    "LANG": "xx_EVIL.UTF-8",
    "LC_ALL": "xx_EVIL.UTF-8",
    "LD_PRELOAD": "/tmp/evil.so",
    "PATH": "/tmp/evil-bin",
    "PEERKIT_CONFIG": "/tmp/evil-config.yaml",
    "SSH_ORIGINAL_COMMAND": "stream-app big",
    "SSH_CONNECTION": "203.0.113.66 6666 203.0.113.1 22",
}


def env_request_granted(chan, name: str, value: str) -> bool:
    """Send an "env" channel request with want-reply set (paramiko's own never asks); return the answer."""
    import paramiko
    from paramiko.common import cMSG_CHANNEL_REQUEST

    msg = paramiko.Message()
    msg.add_byte(cMSG_CHANNEL_REQUEST)
    msg.add_int(chan.remote_chanid)
    msg.add_string("env")
    msg.add_boolean(True)
    msg.add_string(name)
    msg.add_string(value)
    chan._event_pending()
    chan.transport._send_user_message(msg)
    try:
        chan._wait_for_event()
    except paramiko.SSHException:
        return False
    return True


def test_env_requests_are_refused_and_never_reach_peer_shell(world, configure):
    """What we could observe: every env request is answered "failure"; the command runs exactly as without.

    * paramiko sends each variable with want-reply set, on a channel of its
      own (paramiko closes a channel whose request failed): serve says no
      to every one.
    * asyncssh sends the variables the way OpenSSH does (no reply wanted)
      before its command.  ``ping`` answers exactly what a plain ping
      answers (not the SSH_ORIGINAL_COMMAND sent as a variable), and its
      audit line has the connection's own address and port, not the
      SSH_CONNECTION sent as a variable.
    * For ``stream-app``, S's pre_stream hook dumps its environment: the
      dump is the same with and without the variables.
    """
    import asyncssh

    dump = world.mark("env-dump")
    configure(hooks={"pre_stream": ["/bin/sh", "-c", f"env | sort > {dump}"]}, restart=False)
    plain = world.c.ssh(world.s, "ping")
    assert plain.returncode == 0, plain.stderr
    before = len(world.s.audit_events())

    with paramiko_transport(world) as transport:
        granted = [name for name, value in HOSTILE_ENV.items()
                   if env_request_granted(transport.open_session(timeout=10), name, value)]
        assert granted == []
        assert transport.is_active()

    async def call(command: str, env: dict | None) -> tuple[int | None, bytes, int]:
        async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
            port = conn.get_extra_info("sockname")[1]
            result = await conn.run(command, env=env, encoding=None, check=False)
            return result.exit_status, result.stdout, port

    status, out, port = run(call("ping", HOSTILE_ENV))
    assert (status, out) == (0, plain.stdout)
    harness.wait_until(lambda: world.shell_events(before), 5)
    [event] = world.shell_events(before)
    assert (event["verb"], event["outcome"], event["client"], event["client_port"]) == (
        "ping", "ok", LOCALHOST, port)

    dumps = []
    for env in (None, HOSTILE_ENV):
        if dump.exists():
            dump.unlink()
        status, out, _ = run(call("stream-app slow", env))
        assert status == 0 and len(out) > 0
        dumps.append(dump.read_text())
    assert dumps[0] == dumps[1]
    for value in HOSTILE_ENV.values():
        assert value not in dumps[1]
    # The refusals are not errors: peerkit-serve logged nothing.
    assert world.serve_events(before) == []


def test_each_refused_request_of_a_paired_peer_is_audited(world):
    """pty, shell, sftp, X11, agent and port forwarding: refused, and one audit line each, with the peer."""
    import asyncssh

    before = len(world.s.audit_events())

    async def attempts() -> list[str]:
        refused = []
        async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
            # A pty: asyncssh reports the refusal by failing the session.
            with contextlib.suppress(asyncssh.Error, OSError):
                await conn.run("ping", term_type="xterm", request_pty="force", check=True, timeout=10)
            refused.append("pty")
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.run(check=True, timeout=10)  # no command: a shell
            refused.append("shell")
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.start_sftp_client()
            refused.append("subsystem")
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.open_connection(LOCALHOST, world.server.port)
            refused.append("forward")
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port(LOCALHOST, 0, LOCALHOST, 9)
            refused.append("forward")
            # The connection still serves what is allowed.
            result = await conn.run("ping", check=True, timeout=10)
            assert json.loads(result.stdout)["peer"] == world.s.name
        return refused

    import paramiko

    tried = run(attempts())
    with paramiko_transport(world) as transport:
        with pytest.raises(paramiko.SSHException):
            transport.open_session(timeout=10).request_x11(single_connection=True)
        tried.append("x11")
        # paramiko asks for no reply here: the audit line below is the proof,
        # waited for while the connection is open (closed at once, the server
        # could drop the request unread, and the test would fail by chance).
        transport.open_session(timeout=10).request_forward_agent(lambda *_: None)
        tried.append("agent")
        events = wait_for_events(world, before, len(tried))
    assert [e["verb"] for e in events] == tried
    for event in events:
        assert (event["peer"], event["outcome"], event["client"]) == (world.c.name, "refused", LOCALHOST)
    assert "sftp" in events[2]["reason"]
    # peer-shell itself never saw them: only the final ping reached it.
    assert [e["verb"] for e in world.shell_events(before)] == ["ping"]


# -- limits -------------------------------------------------------------------------------

def test_connection_cap(world, configure):
    import asyncssh

    configure(serve={"max_connections": 3, "max_auth_failures": 2})
    before = len(world.s.audit_events())

    async def scenario() -> None:
        idle = [await asyncssh.connect(LOCALHOST, **client_options(world)) for _ in range(3)]
        try:
            # Three over the cap, more than the failure limit: capacity
            # refusals are not failed authentications.
            for _ in range(3):
                with pytest.raises((asyncssh.Error, OSError)):
                    async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
                        await conn.run("ping", check=True)
            # The idle connections were left alone.
            result = await idle[0].run("ping", check=False)
            assert result.exit_status == 0 and json.loads(result.stdout)["peer"] == "site-s"
            idle.pop().close()
            await asyncio.sleep(0.3)
            # A slot is free again, and this source is not locked out.
            async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
                result = await conn.run("ping", check=False)
                assert result.exit_status == 0
        finally:
            for conn in idle:
                conn.close()

    run(scenario())
    refusals = world.serve_events(before)
    assert [(e["verb"], e["outcome"], e["reason"], e["client"]) for e in refusals] == [
        ("connect", "refused", "connection limit 3 reached", LOCALHOST)] * 3, refusals


def _hold_hook(world: World) -> tuple[dict, Path, Path]:
    """A pre_stream hook that logs its start and holds the stream until released (at most 20 s)."""
    started, release = world.mark("held"), world.mark("release")
    for path in (started, release):
        if path.exists():
            path.unlink()
    script = (f"echo $$ >> {started}; n=0; while [ ! -e {release} ] && [ $n -lt 400 ]; do sleep 0.05; "
              f"n=$((n + 1)); done")
    return {"pre_stream": ["/bin/sh", "-c", script]}, started, release


def _held(started: Path) -> int:
    try:
        return len(started.read_text().split())
    except FileNotFoundError:
        return 0


def test_sessions_per_peer_cap(world, configure):
    import asyncssh

    hooks, started, release = _hold_hook(world)
    configure(serve={"max_sessions_per_peer": 2}, hooks=hooks)
    before = len(world.s.audit_events())

    async def scenario() -> None:
        async with asyncssh.connect(LOCALHOST, **client_options(world)) as first, \
                asyncssh.connect(LOCALHOST, **client_options(world)) as second:
            held = [await first.create_process("stream-app slow", encoding=None),
                    await second.create_process("stream-app slow", encoding=None)]
            assert await asyncio.to_thread(harness.wait_until, lambda: _held(started) == 2, 10)
            # A third session, on either connection, is one too many for this peer.
            for conn in (first, second):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.run("ping", check=False)
            # The CLI says so in its own words and code.
            proc, result = await asyncio.to_thread(world.c.cli, "ping", world.s.name, check=False)
            assert (proc.returncode, result["error"]) == (44, "session-refused"), proc.stderr
            release.touch()
            for proc in held:
                result = await proc.wait(check=False)
                assert result.exit_status == 0 and len(result.stdout) > 0
            # Both ended: there is room again.
            await asyncio.sleep(0.2)
            result = await first.run("ping", check=False)
            assert result.exit_status == 0

    run(scenario())
    refusals = world.serve_events(before)
    assert [(e["verb"], e["outcome"], e["reason"], e["peer"]) for e in refusals] == [
        ("session", "refused", "session limit 2 reached", "site-c")] * 3, refusals


def test_pull_takes_turns_with_a_server_that_allows_one_session(world, configure):
    """A pull asks list-apps alongside the ping; with one session allowed, it asks again after it."""
    configure(serve={"max_sessions_per_peer": 1})
    c = world.c
    # No features recorded for S (as before its first ping): the transfer waits for the ping.
    c.owner_sql("con.execute(\"UPDATE peers SET config_json = json_remove(config_json, '$.features') "
                "WHERE name = ?\", (args[0],))", "site-s")
    before = len(world.s.audit_events())
    out = c.user.run([str(c.peerkit), "pull", "site-s", "slow", "--json", "--no-pre-backup"],
                     env=c.user.env(extra_path=[c.bin_dir]), check=False)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["ok"] is True, (out.stdout, out.stderr)
    assert (c.apps_dir / "slow" / "README").read_bytes() == b"slow\n" * 100
    # The second channel was refused (and audited), then list-apps ran on its own.
    assert [(e["verb"], e["outcome"]) for e in world.serve_events(before)] == [("session", "refused")]
    assert [e["verb"] for e in world.shell_events(before)] == ["ping", "list-apps", "stream-app"]
    shutil.rmtree(c.apps_dir / "slow")


# What a pull asks S first: app-info (S offered it at the ping), or ping and list-apps (as before S offered it).
GREETINGS = {"app-info": ["app-info"], "ping": ["list-apps", "ping"]}


@pytest.mark.parametrize("greeting", sorted(GREETINGS))
@pytest.mark.parametrize("allowed", [1, 2])
def test_a_pull_started_with_the_ping_takes_turns_too(world, configure, allowed, greeting):
    """With S pinged before, a pull asks app-info (or ping and list-apps) and stream-app at once; refused ones go again."""
    configure(serve={"max_sessions_per_peer": allowed})
    c = world.c
    env = c.user.env(extra_path=[c.bin_dir])
    c.user.run([str(c.peerkit), "ping", "site-s"], env=env, check=True)
    if greeting == "ping":
        c.set_recorded_features("site-s", ["receive-app", "replace-key", "rsync"])  # as before app-info
    before = len(world.s.audit_events())
    out = c.user.run([str(c.peerkit), "pull", "site-s", "slow", "--json", "--no-pre-backup"], env=env, check=False)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["ok"] is True, (out.stdout, out.stderr)
    assert any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert (c.apps_dir / "slow" / "README").read_bytes() == b"slow\n" * 100
    refused = [(e["verb"], e["outcome"]) for e in world.serve_events(before)]
    # Two or three sessions asked at once: all but the allowed ones refused.
    asked = GREETINGS[greeting] + ["stream-app"]
    assert refused == [("session", "refused")] * (len(asked) - allowed), refused
    verbs = [e["verb"] for e in world.shell_events(before)]
    assert sorted(verbs) == asked, verbs
    shutil.rmtree(c.apps_dir / "slow")


# What an incremental pull asks S: rsync that answers app-info first (S offered with-app-info), or app-info
# and rsync (before with-app-info), or ping, list-apps and rsync (before app-info).
INCREMENTAL = {"with-app-info": [], "app-info": ["app-info"], "ping": ["list-apps", "ping"]}


@pytest.mark.parametrize("greeting", sorted(INCREMENTAL))
@pytest.mark.parametrize("allowed", [1, 2])
def test_an_incremental_pull_takes_turns_too(world, configure, allowed, greeting):
    """With rsync recorded, an incremental pull asks rsync with app-info (or app-info, or ping and list-apps) at once."""
    if shutil.which("rsync", path="/usr/local/bin:/usr/bin:/bin") is None:
        pytest.fail("rsync is not installed", pytrace=False)
    configure(serve={"max_sessions_per_peer": allowed})
    c = world.c
    env = c.user.env(extra_path=[c.bin_dir])
    # A ping records S's features (rsync among them), so the pull starts rsync with its ping.
    c.user.run([str(c.peerkit), "ping", "site-s"], env=env, check=True)
    if greeting == "ping":
        c.set_recorded_features("site-s", ["receive-app", "replace-key", "rsync"])  # as before app-info
    elif greeting == "app-info":
        c.set_recorded_features("site-s", ["app-info", "receive-app", "replace-key", "rsync"])
    before = len(world.s.audit_events())
    out = c.user.run([str(c.peerkit), "pull", "site-s", "slow", "--incremental", "--json", "--no-pre-backup"],
                     env=env, check=False)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0 and result["ok"] is True, (out.stdout, out.stderr)
    assert any("alongside the ping" in n for n in result["notes"]), result["notes"]
    assert (c.apps_dir / "slow" / "README").read_bytes() == b"slow\n" * 100
    refused = [(e["verb"], e["outcome"]) for e in world.serve_events(before)]
    # Up to three sessions at once (rsync's channel opens once its relay is up,
    # maybe after the ping): with one allowed, list-apps at least was refused.
    asked = INCREMENTAL[greeting] + ["rsync"]
    assert set(refused) <= {("session", "refused")} and (allowed == 2 or refused or greeting != "ping"), refused
    assert len(refused) <= max(0, len(asked) - allowed), refused
    events = world.shell_events(before)
    assert sorted(e["verb"] for e in events) == sorted(asked), events
    assert [e.get("with_app_info", False) for e in events if e["verb"] == "rsync"] == [greeting == "with-app-info"]
    shutil.rmtree(c.apps_dir / "slow")


def test_sessions_per_peer_cap_counts_channels_before_their_command(world, configure):
    """Opening the channels first and sending the commands afterwards must not get past the cap."""
    import paramiko

    configure(serve={"max_sessions_per_peer": 2})
    with paramiko_transport(world) as transport:
        channels = [transport.open_session(timeout=10) for _ in range(2)]
        with pytest.raises(paramiko.ChannelException):
            transport.open_session(timeout=10)
        # A channel that closes without ever running a command frees its place.
        channels.pop().close()
        time.sleep(0.2)
        chan = transport.open_session(timeout=10)
        chan.exec_command("ping")
        assert chan.recv_exit_status() == 0
        for chan in channels:
            chan.close()


def test_a_session_stops_counting_when_its_command_exits(world, configure):
    """With one session allowed, the next channel opened right after a command ends is served.

    The session is released when its command exits, not in asyncssh's
    close callback a moment later (when the next open could be refused).
    """
    import asyncssh

    configure(serve={"max_sessions_per_peer": 1})
    before = len(world.s.audit_events())

    class Session(asyncssh.SSHClientSession):
        def __init__(self) -> None:
            self.status: asyncio.Future = asyncio.get_running_loop().create_future()

        def exit_status_received(self, status: int) -> None:
            self.status.set_result(status)

    async def scenario() -> None:
        async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
            channels = []
            for _ in range(10):
                session = Session()
                chan, _ = await conn.create_session(lambda: session, "ping")
                # The next channel opens as soon as the exit status is in,
                # while this one's close handshake may still be under way.
                assert await session.status == 0
                channels.append(chan)
            for chan in channels:
                await chan.wait_closed()

    run(scenario())
    assert [e for e in world.serve_events(before) if e.get("outcome") == "refused"] == []


def test_per_source_auth_failure_limit(world, configure):
    import asyncssh

    configure(serve={"max_auth_failures": 3})
    before = len(world.s.audit_events())
    wrong = asyncssh.generate_private_key("ssh-ed25519")

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect(LOCALHOST, **client_options(world, key=wrong))
        # Now even the paired key is turned away from this address...
        with pytest.raises((asyncssh.Error, OSError)):
            async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
                await conn.run("ping", check=True)
        # ...but not from another one.
        async with asyncssh.connect(LOCALHOST, **client_options(world, local_addr=OTHER_SOURCE)) as conn:
            result = await conn.run("ping", check=False)
            assert result.exit_status == 0

    run(scenario())
    events = world.serve_events(before)
    auth = [e for e in events if e["verb"] == "auth"]
    assert auth and {(e["outcome"], e["reason"], e["key"], e["client"]) for e in auth} == {
        ("refused", "key not authorized", wrong.get_fingerprint("sha256"), LOCALHOST)}
    blocked = [e for e in events if e["verb"] == "connect"]
    assert [(e["outcome"], e["reason"], e["client"]) for e in blocked] == [
        ("refused", "too many failed authentications from this address", LOCALHOST)]
    # The OpenSSH client is refused too, before authentication.
    proc = world.c.ssh(world.s, "ping")
    assert proc.returncode == 255 and proc.stdout == b""
    # Only the other source reached peer-shell.
    assert [(e["verb"], e["client"]) for e in world.shell_events(before)] == [("ping", OTHER_SOURCE)]


def test_a_client_that_never_authenticates_is_dropped_after_auth_timeout(world, configure):
    configure(serve={"auth_timeout": 2})
    for greeting in (b"", b"SSH-2.0-silent\r\n"):
        started = time.monotonic()
        with socket.create_connection((LOCALHOST, world.server.port), timeout=10) as sock:
            sock.settimeout(10)
            if greeting:
                sock.sendall(greeting)
            data = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(4096):
                    data += chunk
        elapsed = time.monotonic() - started
        assert data.startswith(b"SSH-2.0-"), data[:80]
        assert 1.5 <= elapsed <= 6, elapsed
    # The server is fine afterwards.
    assert world.c.ssh(world.s, "ping").returncode == 0


# -- robustness ----------------------------------------------------------------------------

def test_a_client_that_hangs_up_does_not_stall_later_sessions(world):
    """Regression: a session whose client vanished left a stale event-loop entry; the next session hung."""
    for _ in range(8):
        proc = world.c.ssh(world.s, "ping", options=["-tt"])  # pty refused: the client quits at once
        assert proc.returncode == 255
        proc = world.c.ssh(world.s, "ping", timeout=15)
        assert proc.returncode == 0, proc.stderr


# -- shutdown ---------------------------------------------------------------------------

def _stop(world: World) -> tuple[int | None, float]:
    started = time.monotonic()
    status = world.server.stop(signal.SIGTERM, timeout=20)
    return status, time.monotonic() - started


def test_sigterm_stops_serve_and_cuts_a_running_pull(world, configure):
    hook_started = world.mark("pull-stream-started")
    if hook_started.exists():
        hook_started.unlink()
    # The transfer is under way (stream-app running) and holds for a second.
    configure(hooks={"pre_stream": ["/bin/sh", "-c", f"touch {hook_started}; sleep 1"]})
    c = world.c
    local = c.apps_dir / "big"
    c.user.run(["mkdir", "-p", str(local)], check=True)
    c.user.write_file(local / "blob", b"the old local copy\n", mode=0o644)
    before = snapshot(local)
    audit_before = len(world.s.audit_events())
    pull = c.user.popen([str(c.peerkit), "pull", "site-s", "big", "--json"], env=c.user.env(extra_path=[c.bin_dir]),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert harness.wait_until(hook_started.exists, 20), "the pull never reached stream-app"
        status, seconds = _stop(world)
        out, err = pull.communicate(timeout=60)
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait()
    assert status == 0 and seconds < 5, (status, seconds, world.server.log_text()[-2000:])
    assert "peerkit serve: stopped" in world.server.log_text()
    result = json.loads(out.strip().splitlines()[-1])
    assert pull.returncode == 52 and result["error"] == "transfer-incomplete", (out, err)
    assert diff(before, snapshot(local)) == []
    assert not [n for n in os.listdir(c.apps_dir) if n.startswith(".peerkit-")]
    # S's audit log has the cut stream.
    [event] = [e for e in world.shell_events(audit_before) if e.get("verb") == "stream-app"]
    assert event["outcome"] == "disconnected"
    shutil.rmtree(local)


def test_sigterm_stops_serve_while_a_client_stalls_mid_stream(world, configure):
    """A client that stops reading leaves the sender blocked on a full socket; SIGTERM must still end serve."""
    import asyncssh

    configure()
    audit_before = len(world.s.audit_events())
    outcome: dict = {}

    async def scenario() -> None:
        async with asyncssh.connect(LOCALHOST, **client_options(world)) as conn:
            proc = await conn.create_process("stream-app big", encoding=None)
            first = await proc.stdout.read(64 << 10)
            assert first
            # Stop reading: the window fills, the sender blocks.  Then SIGTERM.
            await asyncio.sleep(0.5)
            outcome["stop"] = await asyncio.to_thread(_stop, world)
            await proc.wait_closed()
            outcome["exit_status"] = proc.exit_status

    run(scenario())
    status, seconds = outcome["stop"]
    assert status == 0 and seconds < 5, (status, seconds)
    assert outcome["exit_status"] is None  # no exit status: the stream was cut, not finished
    harness.wait_until(lambda: world.shell_events(audit_before), 5)
    [event] = world.shell_events(audit_before)
    assert event["verb"] == "stream-app" and event["outcome"] == "disconnected"
    assert 0 < event["bytes"] < BIG
