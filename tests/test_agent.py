"""`peerkit agent` and the `peerkit` entry point that hands commands to it, with real processes.

Every test starts a real agent on a real Unix socket and runs the real
`peerkit` entry point against it; "the same as run directly" is checked by
running the very same command without the agent and comparing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerkit.cli import launch
from peerkit.cli.agent import Request, parse_request
from tests.conftest import run_peerkit
from tests.instances import make_instance
from tests.support import ci
from tests.support.agent import PYTHON_AGENT, AgentProcess, private_dir

PEERKIT = [sys.executable, "-m", "peerkit.cli"]


@pytest.fixture
def agent(tmp_path):
    with AgentProcess(private_dir(tmp_path / "run") / "agent.sock") as running:
        yield running


def via(agent: AgentProcess | Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `peerkit ARGS` with PEERKIT_AGENT set to ``agent``'s socket."""
    sock = agent.socket if isinstance(agent, AgentProcess) else agent
    return subprocess.run([*PEERKIT, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PEERKIT_AGENT": str(sock), **(env or {})}, **kw)


def start_via(agent: AgentProcess, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*PEERKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PEERKIT_AGENT": str(agent.socket), **(env or {})})


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- what a command looks like through the agent -------------------------------------------------

def test_a_command_gives_the_same_output_and_status_as_run_directly(agent, tmp_path):
    missing = str(tmp_path / "nowhere" / "config.yaml")
    for args in (["--config", missing, "--json", "peers"], ["--config", missing, "peers"], ["nosuch"],
                 ["--version"], ["pull", "--help"]):
        direct, through = run_peerkit(*args), via(agent, *args)
        assert (through.returncode, through.stdout, through.stderr) == \
            (direct.returncode, direct.stdout, direct.stderr), args
    # Each one ran in a worker of the agent (none fell back to running here).
    assert [(command, outcome) for _pid, command, outcome in agent.wait_workers(5)] == [
        ("peers", "exit 11"), ("peers", "exit 11"), ("nosuch", "exit 2"), ("--version", "exit 0"), ("pull", "exit 0")]


def test_the_worker_takes_the_callers_directory_environment_and_umask(agent, tmp_path):
    cfg = make_instance(tmp_path / "inst", "alpha")
    work = tmp_path / "work"
    work.mkdir()

    def umask_027() -> None:
        os.umask(0o027)

    # The config comes from the environment only, the target is relative to
    # the working directory, and the directories made take the umask.
    proc = via(agent, "--json", "systemd", "install", "--dir", "units/new", env={"PEERKIT_CONFIG": str(cfg.path)},
               cwd=work, preexec_fn=umask_027)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["units"][0] == "units/new/peerkit-serve.service"
    assert f"--config {cfg.path} serve" in (work / "units" / "new" / "peerkit-serve.service").read_text()
    assert (work / "units").stat().st_mode & 0o777 == 0o750
    assert (work / "units" / "new").stat().st_mode & 0o777 == 0o750
    assert [(command, outcome) for _pid, command, outcome in agent.wait_workers(1)] == [("systemd", "exit 0")]


def test_no_agent_at_the_path_means_the_command_runs_here(tmp_path):
    missing = str(tmp_path / "config.yaml")
    direct = run_peerkit("--config", missing, "--json", "peers")
    for sock in (tmp_path / "none.sock", tmp_path):  # nothing there; a directory
        through = via(sock, "--config", missing, "--json", "peers")
        assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout) == (11, through.stdout)


# -- signals and deaths ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def stop_signals_not_ignored():
    """Children start with the stop signals' default actions, even when this run was started
    ignoring one (under nohup: an ignored signal stays ignored across exec)."""
    ignored = [sig for sig in launch.FORWARDED_SIGNALS if signal.getsignal(sig) is signal.SIG_IGN]
    for sig in ignored:
        signal.signal(sig, signal.SIG_DFL)
    yield
    for sig in ignored:
        signal.signal(sig, signal.SIG_IGN)


@pytest.fixture
def serving(tmp_path):
    """An instance whose `peerkit serve --port 0` runs until a signal (a long-running command)."""
    cfg = make_instance(tmp_path / "inst", "alpha")
    return ["--config", str(cfg.path), "--json", "serve", "--listen", "127.0.0.1", "--port", "0"]


def _wait_listening(proc: subprocess.Popen) -> None:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on 127.0.0.1:" in line, line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_caller_reaches_the_worker_with_the_same_outcome(agent, serving, sig):
    outcomes = []
    for how in ("direct", "agent"):
        if how == "direct":
            proc = subprocess.Popen([*PEERKIT, *serving], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        else:
            proc = start_via(agent, *serving)
        _wait_listening(proc)
        proc.send_signal(sig)
        out, _err = proc.communicate(timeout=30)
        outcomes.append((proc.returncode, out))
    assert outcomes[0] == outcomes[1]
    # SIGINT and SIGTERM stop the server cleanly; SIGHUP, not handled, ends it.
    assert outcomes[0][0] == (-signal.SIGHUP if sig == signal.SIGHUP else 0)
    worker = agent.worker_pids()[-1]
    wait_gone(worker)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_the_caller_was_started_ignoring_has_the_same_outcome(agent, serving, sig):
    """`nohup peerkit …`: SIGHUP stays ignored, through the agent as run directly; SIGINT, which
    serve handles over an inherited SIG_IGN, still stops it both ways."""
    previous = signal.signal(sig, signal.SIG_IGN)  # what nohup (SIGHUP) or a shell's background job (SIGINT) does
    try:
        procs = [subprocess.Popen([*PEERKIT, *serving], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 start_via(agent, *serving)]
    finally:
        signal.signal(sig, previous)
    for proc in procs:
        _wait_listening(proc)
        proc.send_signal(sig)
    if sig == signal.SIGHUP:
        time.sleep(1)
        assert [proc.poll() for proc in procs] == [None, None], "SIGHUP ended a command that ignores it"
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
    outcomes = []
    for proc in procs:
        out, _err = proc.communicate(timeout=30)
        outcomes.append((proc.returncode, out))
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 0


def test_a_caller_that_dies_has_its_worker_stopped_cleanly(agent, serving):
    proc = start_via(agent, *serving)
    _wait_listening(proc)
    [worker] = agent.worker_pids()
    proc.kill()
    proc.wait()
    agent.wait_for_log(f"worker {worker}: serve: exit 0")  # SIGTERM: the server stopped as it should
    wait_gone(worker)


def test_a_worker_killed_outright_ends_its_caller_by_the_same_signal(agent, serving):
    proc = start_via(agent, *serving)
    _wait_listening(proc)
    [worker] = agent.worker_pids()
    os.kill(worker, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    agent.wait_for_log(f"worker {worker}: serve: signal 9")


def test_when_the_agent_dies_its_worker_stops_cleanly_and_tells_the_caller(agent, serving):
    proc = start_via(agent, *serving)
    _wait_listening(proc)
    [worker] = agent.worker_pids()
    agent.proc.kill()
    out, err = proc.communicate(timeout=30)
    # PR_SET_PDEATHSIG: the kernel sent the worker SIGTERM, the server stopped
    # as it does on SIGTERM, and the worker gave its status to the caller itself.
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"ok": True, "stopped": True}
    wait_gone(worker)


def test_a_caller_whose_worker_and_agent_both_vanish_says_the_outcome_is_unknown(agent, serving):
    proc = start_via(agent, *serving)
    _wait_listening(proc)
    [worker] = agent.worker_pids()
    os.kill(worker, signal.SIGSTOP)  # it cannot act on the SIGTERM the agent's death sends it
    agent.proc.kill()
    agent.proc.wait()
    os.kill(worker, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 61, err
    assert json.loads(out.splitlines()[-1]) == {
        "ok": False, "error": "agent-lost", "message": "The agent stopped before the command finished; its "
        "outcome is unknown (see the agent's log): the agent closed the connection"}
    assert "peerkit: error: The agent stopped before the command finished" in err


def test_stopping_the_agent_stops_its_workers_and_waits_for_them(agent, serving):
    proc = start_via(agent, *serving)
    _wait_listening(proc)
    [worker] = agent.worker_pids()
    assert agent.stop(signal.SIGTERM) == 0
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and json.loads(out.splitlines()[-1]) == {"ok": True, "stopped": True}
    assert f"worker {worker}: serve: exit 0" in agent.log()
    assert not agent.socket.exists()


# -- which agent is used ----------------------------------------------------------------------

def agent_with(setup: str) -> list[str]:
    """argv of an agent started through the library with ``setup`` run first (``agent``, ``module`` in scope)."""
    return [sys.executable, "-c", f"""
import sys
from peerkit.cli import agent as module
agent = module.Agent(sys.argv[-1], lambda text: print(text, file=sys.stderr, flush=True))
{setup}
agent.serve()
"""]


# The same installation, one file older: what an agent left running over an upgrade sees.
STALE_AGENT = agent_with('agent.build += "1"')


def test_an_agent_of_another_peerkit_build_is_not_used_and_steps_aside(tmp_path):
    missing = str(tmp_path / "config.yaml")
    direct = run_peerkit("--config", missing, "--json", "peers")
    with AgentProcess(private_dir(tmp_path / "run") / "agent.sock", argv=STALE_AGENT) as stale:
        through = via(stale, "--config", missing, "--json", "peers")
        assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout)
        assert stale.proc.wait(timeout=30) == 0  # for its service manager to start the new one
        assert "refused a request (build)" in stale.log() and "peerkit changed" in stale.log()
        assert stale.worker_pids() == [] and not stale.socket.exists()


def test_a_worker_that_dies_before_its_command_starts_leaves_the_command_to_the_caller(tmp_path):
    missing = str(tmp_path / "config.yaml")
    direct = run_peerkit("--config", missing, "--json", "peers")
    # Every worker is killed before it says "started" (as the OOM killer might).
    script = agent_with("import os, signal\nmodule._run_worker = lambda *args: os.kill(os.getpid(), signal.SIGKILL)")
    with AgentProcess(private_dir(tmp_path / "run") / "agent.sock", argv=script) as dying:
        through = via(dying, "--config", missing, "--json", "peers")
        assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout)  # run here, once
        assert [(command, outcome) for _pid, command, outcome in dying.wait_workers(1)] == [("peers", "signal 9")]


def test_a_caller_of_another_installation_is_refused_without_stopping_the_agent(agent, tmp_path):
    fields = _fields(["--version"])
    fields[1] = b"/opt/other/bin/python3\n/opt/other/lib/peerkit\n/pull.py:1:1"
    cwd = os.open(tmp_path, os.O_RDONLY)
    try:
        reply = _exchange(agent.socket, launch.frame(*fields), [cwd, 0, 1, 2])
    finally:
        os.close(cwd)
    assert launch.take_frame(bytearray(reply)) == [b"refused", b"build"]
    assert agent.proc.poll() is None and "peerkit changed" not in agent.log()
    assert via(agent, "--version").returncode == 0 and len(agent.wait_workers(1)) == 1


def test_the_build_id_follows_the_source(tmp_path, monkeypatch):
    package = tmp_path / "peerkit"
    shutil.copytree(Path(launch.__file__).parent.parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "bench", "web"))
    monkeypatch.setattr(launch, "__file__", str(package / "cli" / "launch.py"))
    before = launch.build_id()
    assert launch.build_id() == before
    module = package / "pull.py"
    os.utime(module, ns=(module.stat().st_atime_ns, module.stat().st_mtime_ns + 1))
    assert launch.build_id() != before


@pytest.mark.parametrize("argv, forwarded", [
    (["pull", "beta", "wiki"], "pull"), (["--json", "--config", "x", "pull"], "pull"),
    (["--config=x", "ping", "agent"], "ping"), (["agent"], "agent"), (["--json", "agent", "--socket", "s"], "agent"),
    ([], None), (["--config", "x"], None),
])
def test_the_command_is_found_after_the_group_options(argv, forwarded):
    assert launch.command_of(argv) == forwarded


# -- the socket --------------------------------------------------------------------------------

def _agent_exit(sock: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PYTHON_AGENT, "--socket", str(sock), "--json"], capture_output=True, text=True,
                          timeout=60)


def test_a_socket_directory_others_can_write_to_is_refused(tmp_path):
    run = private_dir(tmp_path / "run")
    run.chmod(0o770)
    proc = _agent_exit(run / "agent.sock")
    assert proc.returncode == 60, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["error"] == "agent-socket"
    assert not (run / "agent.sock").exists()


def test_a_file_at_the_socket_path_is_never_replaced(tmp_path):
    path = private_dir(tmp_path / "run") / "agent.sock"
    path.write_text("precious\n")
    proc = _agent_exit(path)
    assert proc.returncode == 60 and "not a socket" in proc.stderr
    assert path.read_text() == "precious\n"


def test_a_second_agent_on_the_same_socket_is_refused_and_the_first_keeps_serving(agent, tmp_path):
    proc = _agent_exit(agent.socket)
    assert proc.returncode == 60 and "another agent is listening" in proc.stderr
    assert via(agent, "--version").returncode == 0 and len(agent.wait_workers(1)) == 1


def test_a_socket_left_by_a_dead_agent_is_replaced(tmp_path):
    path = private_dir(tmp_path / "run") / "agent.sock"
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(path))
    left.close()  # bound, never listening: what a killed agent leaves
    with AgentProcess(path) as running:
        assert path.stat().st_mode & 0o777 == 0o600
        assert via(running, "--version").returncode == 0 and len(running.wait_workers(1)) == 1


def test_reading_a_running_agents_log_never_overwrites_it(tmp_path):
    # The helper's log shares its open file with the process writing to it;
    # reading it must not move that file's offset, or the next line lands on
    # top of the first ones (a CI run once saw exactly that).
    writer = [sys.executable, "-c", "import sys\nfor i in range(4000): print(f'line {i}', file=sys.stderr, flush=True)"]
    with AgentProcess(tmp_path / "unused.sock", argv=writer, wait=False) as running:
        while running.proc.poll() is None:
            running.log()
        assert running.log() == "".join(f"line {i}\n" for i in range(4000))


def test_connections_that_send_nothing_are_dropped_and_a_full_agent_makes_callers_wait(tmp_path):
    script = agent_with("module.REQUEST_TIMEOUT = 1.0\nmodule.MAX_CALLERS = 2")
    with AgentProcess(private_dir(tmp_path / "run") / "agent.sock", argv=script) as small:
        idle = []
        for _ in range(2):
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(small.socket))
            idle.append(conn)
        # Two places, both taken: this command waits in the backlog until the
        # silent connections are dropped, then runs in a worker.
        proc = via(small, "--version")
        assert proc.returncode == 0 and proc.stdout.startswith("peerkit, version")
        for conn in idle:
            conn.settimeout(10)
            assert launch.take_frame(bytearray(conn.recv(100))) == [b"refused", b"timeout"]
            assert conn.recv(100) == b""
            conn.close()
        assert [command for _pid, command, _outcome in small.wait_workers(1)] == ["--version"]
        log = small.log()
        assert log.count("refused a request (timeout)") == 2
        assert log.index("refused a request (timeout)") < log.index("worker ")


# -- requests that are not what launch sends ---------------------------------------------------------

def _exchange(path: Path, data: bytes, fds: list[int]) -> bytes:
    """Send ``data`` with ``fds`` and return everything the agent answers before it closes."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(path))
    try:
        try:
            if fds:
                sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              struct.pack(f"{len(fds)}i", *fds))])
                if sent < len(data):  # sendall(b"") still calls send(): EPIPE once the agent closed
                    sock.sendall(data[sent:])
            else:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            # The agent may refuse what it has read so far (wrong
            # descriptors, a bad length) and close before the rest is sent:
            # its answer is still there to read.
            pass
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass  # closed with part of the request unread: the answer came before the reset
        return reply
    finally:
        sock.close()


def _fields(argv: list[str]) -> list[bytes]:
    fields = launch.take_frame(bytearray(launch.request(argv)))
    assert fields is not None
    return fields


def _with(index: int, value: bytes) -> bytes:
    fields = _fields(["--version"])
    fields[index] = value
    return launch.frame(*fields)


def malformed() -> dict[str, tuple[bytes, int]]:
    """Requests that launch never sends, and how many descriptors go with each."""
    return {
        "not a peerkit request": (launch.frame(b"GET / HTTP/1.0"), 4),
        "too few fields": (launch.frame(*_fields(["--version"])[:12]), 4),
        "umask with a sign": (_with(2, b"-22"), 4),
        "umask out of range": (_with(2, b"1777"), 4),
        "argc past the end": (_with(12, b"999"), 4),
        "argc with spaces": (_with(12, b" 1"), 4),
        "unknown encoding": (_with(6, b"no-such-codec"), 4),
        "unknown error handler": (_with(7, b"ignore-all"), 4),
        "line buffering not 0 or 1": (_with(8, b"yes"), 4),
        "an environment entry without '='": (launch.frame(*_fields(["--version"]), b"JUSTANAME"), 4),
        "an environment entry without a name": (launch.frame(*_fields(["--version"]), b"=value"), 4),
        "no descriptors": (launch.request(["--version"]), 0),
        "three descriptors": (launch.request(["--version"]), 3),
        "six descriptors": (launch.request(["--version"]), 6),
        "a length past the limit": (struct.pack(">I", launch.MAX_FRAME + 1) + b"x" * 64, 4),
    }


def test_malformed_requests_are_refused_and_cost_the_agent_nothing(agent, tmp_path):
    afile = os.open(tmp_path, os.O_RDONLY)
    before = open_fds(agent.proc.pid)
    try:
        for why, (data, count) in malformed().items():
            reply = _exchange(agent.socket, data, [afile] * count)
            assert launch.take_frame(bytearray(reply)) in ([b"refused", b"request"], [b"refused", b"protocol"]), why
        # The working directory must be a directory.
        plain = os.open(Path(launch.__file__), os.O_RDONLY)
        try:
            reply = _exchange(agent.socket, launch.request(["--version"]), [plain, 0, 1, 2])
        finally:
            os.close(plain)
        assert launch.take_frame(bytearray(reply)) == [b"refused", b"request"]
    finally:
        os.close(afile)
    assert agent.worker_pids() == []
    assert open_fds(agent.proc.pid) == before  # every descriptor received was closed
    assert via(agent, "--version").returncode == 0 and len(agent.wait_workers(1)) == 1


FIELD = st.one_of(st.binary(max_size=12), st.sampled_from([launch.MAGIC, b"0", b"1", b"22", b"utf-8", b"strict",
                                                            b"A=b", b"=", b"7777", b"-1"]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(FIELD, max_size=20), st.integers(0, 6))
def test_any_request_is_parsed_or_refused_with_a_reason(tmp_path, fields, count):
    """Whatever a connection sends, the parser answers a Request or ValueError('protocol'/'request')."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        try:
            parsed = parse_request(fields, [fd] * count)
        except ValueError as exc:
            assert str(exc) in ("protocol", "request")
        else:
            assert isinstance(parsed, Request) and count == 4 and 0 <= parsed.umask <= 0o777
    finally:
        os.close(fd)


def test_a_request_launch_sends_parses_back_to_what_was_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("PEERKIT_TEST_VALUE", "a=b c\u00e9")
    argv = ["pull", "beta", "wiki", "--json", "caf\u00e9", os.fsdecode(b"raw\xff")]
    fields = launch.take_frame(bytearray(launch.request(argv)))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        parsed = parse_request(fields, [fd] * 4)
    finally:
        os.close(fd)
    assert parsed.argv == argv and parsed.build == launch.build_id()
    assert (b"PEERKIT_TEST_VALUE", "a=b c\u00e9".encode()) in parsed.env
    assert dict(parsed.env) == dict(os.environb)


def test_garbage_from_a_caller_whose_command_runs_stops_it_as_hanging_up_would(agent, serving, tmp_path):
    """After the request only signal messages may come; anything else ends the conversation."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(str(agent.socket))
    cwd = os.open(tmp_path, os.O_RDONLY)
    err_r, err_w = os.pipe()
    try:
        data = launch.request(serving)
        with open(os.devnull, "rb") as null:
            fds = struct.pack("4i", cwd, null.fileno(), err_w, err_w)
            sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        sock.sendall(data[sent:])
        os.close(err_w)
        assert launch.take_frame(bytearray(sock.recv(100)))[0] == b"started"
        with os.fdopen(err_r, "r") as err:
            assert "listening on 127.0.0.1:" in err.readline()
            sock.sendall(struct.pack(">I", launch.MAX_FRAME + 1))
            [(_pid, command, outcome)] = agent.wait_workers(1)
        assert (command, outcome) == ("serve", "exit 0")  # SIGTERM: stopped as it should
    finally:
        os.close(cwd)
        sock.close()


# -- other users ---------------------------------------------------------------------------------

@pytest.fixture
def other_user():
    from tests.support import sshd as harness

    if os.geteuid() != 0:
        ci.unavailable("the agent's user checks", "they need root (a throwaway user)")
    root = harness.make_root("peerkit-agent-")  # 0755: the user can reach what is made here
    user = harness.ThrowawayUser.create(root)
    user.shared = root / "shared"
    try:
        yield user
    finally:
        user.delete()
        shutil.rmtree(root, ignore_errors=True)


def test_another_users_command_is_refused_by_the_agent_and_runs_as_that_user(tmp_path, other_user):
    run = other_user.shared
    run.mkdir(mode=0o755)  # reachable by anyone, writable by root only
    with AgentProcess(run / "agent.sock") as root_agent:
        (run / "agent.sock").chmod(0o666)  # as if misconfigured: only SO_PEERCRED stands in the way
        proc = other_user.run([*PEERKIT, "--json", "peers"], text=True,
                              env=other_user.env(PEERKIT_AGENT=str(run / "agent.sock")))
        # Ran as the other user, in its own process: its own (missing) config.
        assert proc.returncode == 11 and str(other_user.home) in proc.stdout
        root_agent.wait_for_log(f"refused a connection from uid {other_user.uid}")
        assert root_agent.worker_pids() == []


def test_an_agent_of_another_user_is_not_used(tmp_path, other_user):
    run = private_dir(other_user.home / "run", other_user.uid, other_user.gid)
    theirs = AgentProcess(run / "agent.sock", popen=other_user.popen, env=other_user.env())
    try:
        missing = str(tmp_path / "config.yaml")
        proc = via(theirs, "--config", missing, "--json", "peers")  # as root, which can reach the socket
        assert proc.returncode == 11 and missing in proc.stdout
        assert theirs.worker_pids() == []  # our environment and terminal never reached it
    finally:
        theirs.stop()
