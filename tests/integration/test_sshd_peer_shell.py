"""peer-shell behind a real SSH server: what a paired key can and cannot do.

Every test runs twice (see conftest.py): through /usr/sbin/sshd (id
``sshd``) and through each instance's own `peerkit serve` (id ``serve``),
with the authorized_keys lines that `peerkit pair` wrote, as the throwaway
users that own the instances, with the real OpenSSH clients (ssh, sftp,
scp) or a library client.  The sshd is deliberately permissive
(forwarding, agent, X11, tty and sftp all enabled), and
``test_control_key_without_restrict_gets_what_peerkit_keys_are_refused``
shows it really grants those things to a key line without ``restrict``: so
every refusal under sshd is the key line's doing.  `peerkit serve` refuses
the same requests itself; where it refuses at the protocol level (pty,
shell, subsystem) peer-shell never runs, which the tests check as well.

What only OpenSSH shows (its log's "Accepted publickey" and "Starting
session" lines) is checked under sshd; the serve runs check the equivalent
where there is one (peerkit-serve's auth refusals in the audit log).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import peerkit
from peerkit.apps import archive_size
from peerkit.errors import BadSlug, NoSuchApp, PeerRefused
from tests.support import sshd as harness

pytestmark = pytest.mark.integration

LOCALHOST = "127.0.0.1"

# Run as the app owner: builds the apps of test 1 (sizes, modes, links, names).
_MAKE_APPS = r'''
import os, random, sys
apps = sys.argv[1]
os.makedirs(apps, exist_ok=True)

def put(path, data=b"", mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)

blog = os.path.join(apps, "blog")
b = lambda *parts: os.path.join(blog, *parts)
put(b("index.html"), b"<h1>hello</h1>\n")
put(b("bin", "run.sh"), b"#!/bin/sh\necho run\n", 0o755)
put(b("config", "secret.key"), b"s3cret\n", 0o600)
put(b("config", "read-only.txt"), b"ro\n", 0o444)
put(b("with space", "a file  with two  spaces.txt"), b"spaces\n")
put(b("\u00fcn\u00efc\u00f6d\u00e9", "\u65e5\u672c\u8a9e \u30ce\u30fc\u30c8.md"), "# \u30ce\u30fc\u30c8\n".encode())
# > 100 bytes of UTF-8: does not fit a ustar name, so tar needs a pax path record.
put(b("lang", "\u00e9" * 70 + ".txt"), b"long utf-8 name\n")
put(b("a", "b", "c", "d", "e", "deep.txt"), b"deep\n")
put(b("data", "big.bin"), random.Random(20240917).randbytes(3 * 1024 * 1024 + 123))
put(b("data", "empty-file"))
os.makedirs(b("empty-dir"))
put(b("private", "x"), b"x")
os.chmod(b("private"), 0o700)
os.symlink("data/big.bin", b("current"))
os.symlink("a/b", b("shortcut"))
os.symlink("not/there", b("dangling"))

put(os.path.join(apps, "wiki", "README"), b"w" * 2500)
put(os.path.join(apps, "zeta-9", "one-kib"), b"z" * 1024)
os.makedirs(os.path.join(apps, "aaa-empty"))
# Never listed: names outside the slug grammar, symlinks, plain files.
for bad in ("Bad_Name", "-leading-dash", ".hidden", "with space"):
    put(os.path.join(apps, bad, "f"), b"bad")
os.symlink("blog", os.path.join(apps, "linked"))
os.symlink("/etc", os.path.join(apps, "etc"))
put(os.path.join(apps, "notes"), b"a file, not an app")

# Distinct mtimes, children before parents.  Whole seconds: stream-app's tar
# deletes the pax mtime record, so sub-second precision does not survive.
stamp = 1_500_000_000
for app in ("blog", "wiki", "zeta-9", "aaa-empty"):
    top = os.path.join(apps, app)
    for root, dirs, files in os.walk(top, topdown=False):
        for name in files + dirs:
            stamp += 86_400 + 7
            os.utime(os.path.join(root, name), ns=(stamp * 10**9,) * 2, follow_symlinks=False)
        stamp += 86_400 + 7
        os.utime(root, ns=(stamp * 10**9,) * 2, follow_symlinks=False)
'''


# -- helpers ---------------------------------------------------------------------

def refusal(proc: subprocess.CompletedProcess) -> dict:
    """Return the single JSON error line of a refused call, after checking nothing else came out."""
    assert proc.stdout == b"", proc.stdout[:200]
    lines = proc.stderr.decode("utf-8", "replace").splitlines()
    assert len(lines) == 1, proc.stderr
    return json.loads(lines[0])


def assert_refused(proc: subprocess.CompletedProcess, code: str, exit_code: int) -> None:
    assert refusal(proc) == {"ok": False, "error": code}
    assert proc.returncode == exit_code, proc.stderr


def ok_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout.endswith(b"\n") and proc.stdout.count(b"\n") == 1, proc.stdout
    return json.loads(proc.stdout)


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """(type, mode, mtime, content digest or link target) of every entry, by relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                what: tuple = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                what = ("dir", None)
            # Symlink modes are always 0777 on Linux; compare them anyway.
            out[rel] = (*what, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


class TargetServer:
    """A TCP service on 127.0.0.1 that greets each client with a secret and counts them.

    A forwarding attempt that got through would reach it and read the secret.
    """

    SECRET = b"TARGET-SECRET-BANNER\n"

    def __init__(self) -> None:
        self.sock = socket.create_server((LOCALHOST, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with conn:
                with contextlib.suppress(OSError):
                    conn.sendall(self.SECRET)

    def __enter__(self) -> "TargetServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def read_until_eof(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def connect_when_listening(port: int, timeout: float = 10) -> socket.socket:
    """Connect to 127.0.0.1:port as soon as something listens there."""
    holder: list[socket.socket] = []

    def attempt() -> bool:
        try:
            holder.append(socket.create_connection((LOCALHOST, port), timeout=2))
        except OSError:
            return False
        return True

    assert harness.wait_until(attempt, timeout), f"nothing listened on {port}"
    return holder[0]


def stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        # OpenSSH 9.2's client sometimes catches the SIGTERM of an `ssh -N`
        # and stays in its poll loop (seen under both servers); the test is
        # about what the server refused, not about how the client exits.
        proc.kill()
        return proc.communicate(timeout=10)


def paramiko_connect(login: str, key: Path, server: harness.Sshd):
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(server.known_hosts_path))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(server.host, port=server.port, username=login,
                   pkey=paramiko.Ed25519Key.from_private_key_file(str(key)),
                   allow_agent=False, look_for_keys=False, timeout=10, banner_timeout=10, auth_timeout=10)
    return client


def channel_request_granted(transport, request: str) -> bool:
    """Send a session channel request with want-reply set; return whether sshd granted it.

    paramiko only offers auth-agent-req without want-reply, so this builds
    the message itself (RFC 4254 section 5.4) and waits with paramiko's own
    event machinery: a refusal makes paramiko close the channel and raise.
    """
    import paramiko
    from paramiko.common import cMSG_CHANNEL_REQUEST

    chan = transport.open_session(timeout=10)
    try:
        msg = paramiko.Message()
        msg.add_byte(cMSG_CHANNEL_REQUEST)
        msg.add_int(chan.remote_chanid)
        msg.add_string(request)
        msg.add_boolean(True)
        chan._event_pending()
        transport._send_user_message(msg)
        try:
            chan._wait_for_event()
        except paramiko.SSHException:
            return False
        return True
    finally:
        chan.close()


def paramiko_exec(client, command: str) -> tuple[int, bytes, bytes]:
    _, stdout, stderr = client.exec_command(command, timeout=20)
    out, err = stdout.read(), stderr.read()
    return stdout.channel.recv_exit_status(), out, err


def new_events(instance: harness.PeerkitInstance, before: int) -> list[dict]:
    """peer-shell's audit lines after the first ``before`` lines (not peerkit-serve's own)."""
    return [e for e in instance.audit_events()[before:] if "server" not in e]


def serve_events(instance: harness.PeerkitInstance, before: int) -> list[dict]:
    """peerkit-serve's own audit lines (auth and limit refusals) after the first ``before`` lines."""
    return [e for e in instance.audit_events()[before:] if e.get("server") == "peerkit-serve"]


def is_sshd(instance: harness.PeerkitInstance) -> bool:
    return instance.server.kind == "sshd"


def sessions_started(sshd: harness.Sshd, login: str) -> int:
    """How many sessions (exec, shell or subsystem) sshd started for ``login``; each runs peer-shell."""
    return sum(1 for line in sshd.log_text().splitlines()
               if line.startswith("Starting session: ") and f" for {login} from " in line)


def settle(instance: harness.PeerkitInstance, sshd: harness.Sshd, timeout: float = 10) -> None:
    """Wait until every session sshd started for the instance's owner has its one audit line."""
    def counts() -> tuple[int, int]:
        shell_lines = sum(1 for e in instance.audit_events() if "server" not in e)
        return sessions_started(sshd, instance.user.name), shell_lines

    harness.wait_until(lambda: counts()[0] == counts()[1], timeout)
    started, logged = counts()
    assert started == logged, f"{instance}: sshd started {started} peer-shell sessions, the audit log has {logged} lines"


def quiesce(instances: list[harness.PeerkitInstance], quiet: float = 0.25, timeout: float = 10) -> None:
    """Under serve: wait until no audit log grows for ``quiet`` seconds (sessions still logging finish).

    `peerkit serve` does not log sessions the way sshd does, so there is no
    count to compare against; its sessions always run peer-shell's serve(),
    which always writes its one audit line (tests/test_shell.py).
    """
    import time

    def sizes() -> list[int]:
        return [len(i.audit_events()) for i in instances]

    deadline = time.monotonic() + timeout
    last, since = sizes(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = sizes()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def every_session_is_audited(make_instance, servers):
    """After each test: one audit line per peer-shell session, for every instance (sshd).

    Also lets a session whose client hung up early finish logging before
    the next test counts lines (both servers).
    """
    yield
    if servers.sshd is not None:
        for instance in make_instance.made.values():
            settle(instance, servers.sshd)
    else:
        quiesce(list(make_instance.made.values()))


@pytest.fixture(scope="module")
def alpha_apps(paired) -> Path:
    """A's apps, created by A's owner (so peer-shell, running as A, can read them)."""
    alpha, _ = paired
    alpha.user.run([sys.executable, "-c", _MAKE_APPS, str(alpha.apps_dir)], check=True)
    return alpha.apps_dir


# -- 1. what a paired key can do ----------------------------------------------------

def test_paired_key_can_ping_list_apps_and_stream_an_app_byte_identical(paired, alpha_apps):
    alpha, beta = paired

    pong = ok_json(beta.ssh(alpha, "ping"))
    assert pong == {"ok": True, "peer": alpha.name, "version": peerkit.__version__,
                    "features": ["app-info", "receive-app", "replace-key", "rsync", "with-app-info", "zstd"]}

    listing = ok_json(beta.ssh(alpha, "list-apps"))
    assert listing["peer"] == alpha.name
    # Sorted by slug; the symlinked dirs (linked -> blog, etc -> /etc), the
    # names outside the grammar and the plain file are not advertised.
    # size_kb is the size of the stream stream-app sends (headers included).
    expected = [{"slug": slug, "size_kb": archive_size(alpha_apps / slug) // 1024}
                for slug in ("aaa-empty", "blog", "wiki", "zeta-9")]
    assert listing["apps"] == expected
    assert expected[0]["size_kb"] == 10 and expected[1]["size_kb"] > 3072
    # app-info: the ping's answer and one app's entry; the symlinked dir is no app.
    assert ok_json(beta.ssh(alpha, "app-info blog")) == {**pong, "domain": listing["domain"], "app": expected[1]}
    assert ok_json(beta.ssh(alpha, "app-info linked")) == {**pong, "domain": listing["domain"], "app": None}
    # with-app-info (a pull's rsync): the same answer first on stderr; for no app, then the error, and nothing ran.
    res = beta.ssh(alpha, "with-app-info rsync --server --sender -lHtpre.iLsfxCIvu . linked/")
    assert res.returncode == 50 and res.stdout == b"", res
    answer, error = res.stderr.splitlines()
    assert json.loads(answer) == {**pong, "domain": listing["domain"], "app": None}
    assert json.loads(error) == {"ok": False, "error": "no-such-app"}

    before = len(alpha.audit_events())
    archive = beta.ssh(alpha, "stream-app blog")
    assert archive.returncode == 0, archive.stderr
    assert archive.stderr == b""
    assert len(archive.stdout) > 3 * 1024 * 1024

    # Unpack on the receiving side, as its owner, with plain GNU tar.
    dest = beta.user.home / "restored-blog"
    beta.user.run(["mkdir", "-m", "700", str(dest)], check=True)
    beta.user.run(["tar", "-x", "-p", "-f", "-", "-C", str(dest)], input=archive.stdout, check=True)

    sent, got = tree_snapshot(alpha_apps / "blog"), tree_snapshot(dest)
    assert got == sent
    # The comparison covered what it should: a few of the awkward members.
    for rel in ("with space/a file  with two  spaces.txt", "\u00fcn\u00efc\u00f6d\u00e9/\u65e5\u672c\u8a9e \u30ce\u30fc\u30c8.md",
                "lang/" + "\u00e9" * 70 + ".txt", "a/b/c/d/e/deep.txt", "empty-dir", "private",
                "current", "dangling", "data/empty-file", "bin/run.sh", "config/read-only.txt"):
        assert rel in sent, rel
    assert sent["current"][:2] == ("link", "data/big.bin")
    assert sent["bin/run.sh"][2] == 0o755 and sent["private"][2] == 0o700
    assert sent["config/read-only.txt"][2] == 0o444

    events = new_events(alpha, before)
    assert len(events) == 1
    assert events[0]["verb"] == "stream-app" and events[0]["slug"] == "blog"
    assert events[0]["outcome"] == "ok" and events[0]["bytes"] == len(archive.stdout)


# -- 2. what it cannot do ----------------------------------------------------------

def _session_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("Starting session:")]


def test_no_pty_even_when_forced(paired):
    alpha, beta = paired
    server = alpha.server
    offset = server.log_offset()
    proc = beta.ssh(alpha, "ping", options=["-tt"])
    # OpenSSH treats a refused pty as fatal when one was forced with -tt.
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert b"PTY allocation request failed" in proc.stderr
    if not is_sshd(alpha):
        # serve has no tty code at all (allow_pty=False, pty_requested says no);
        # the client's refusal above is the proof.  Nothing went to its log.
        assert server.log_since(offset) == ""
        return
    log = server.wait_for_log(offset, "Starting session:")
    sessions = _session_lines(log)
    assert len(sessions) == 1
    # sshd names the tty in this line when it allocates one ("... on /dev/pts/N for ...").
    assert sessions[0].startswith("Starting session: forced-command (key-option) '")
    assert f"' for {alpha.user.name} from {LOCALHOST} port " in sessions[0]
    assert " on /dev/" not in sessions[0] and " on pts" not in sessions[0]


def test_no_interactive_shell(paired):
    alpha, beta = paired
    before = len(alpha.audit_events())
    if not is_sshd(alpha):
        # serve refuses the shell request itself: peer-shell never runs.
        proc = beta.ssh(alpha)
        assert (proc.returncode, proc.stdout) == (255, b"")
        assert b"shell request failed" in proc.stderr
        master, slave = os.openpty()
        try:
            proc = beta.user.popen(beta.ssh_argv(alpha), stdin=slave, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
            os.close(slave)
            slave = -1
            out, err = proc.communicate(timeout=30)
        finally:
            os.close(master)
            if slave != -1:
                os.close(slave)
        assert (proc.returncode, out) == (255, b"")
        assert err.decode().splitlines() == ["PTY allocation request failed on channel 0",
                                             "shell request failed on channel 0"]
        proc = beta.ssh(alpha, options=["-tt"])
        assert proc.returncode == 255 and proc.stdout == b""
        assert b"PTY allocation request failed" in proc.stderr
        quiesce([alpha])
        assert new_events(alpha, before) == []  # peer-shell never ran
        # serve audited each refusal itself: shell; pty, shell; pty, shell.
        assert [e["verb"] for e in serve_events(alpha, before)] == ["shell", "pty", "shell", "pty", "shell"]
        return
    # From a script: no command, no tty -> a shell request, answered by peer-shell's refusal.
    assert_refused(beta.ssh(alpha), "refused", PeerRefused.exit_code)
    [event] = new_events(alpha, before)
    assert event["outcome"] == "refused" and event["reason"] == "empty command"

    # From a terminal, as a person would type `ssh host`: the pty is refused
    # (not fatal in this mode), then the shell request gets the same refusal.
    master, slave = os.openpty()
    try:
        proc = beta.user.popen(beta.ssh_argv(alpha), stdin=slave, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        os.close(slave)
        slave = -1
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert proc.returncode == PeerRefused.exit_code
    assert out == b""
    lines = err.decode().splitlines()
    assert lines[0].startswith("PTY allocation request failed")
    assert [json.loads(line) for line in lines[1:]] == [{"ok": False, "error": "refused"}]

    # Forcing a tty gets nothing at all.
    proc = beta.ssh(alpha, options=["-tt"])
    assert proc.returncode == 255 and proc.stdout == b""
    assert b"PTY allocation request failed" in proc.stderr


def test_no_local_or_dynamic_port_forwarding(paired):
    alpha, beta = paired
    sshd = alpha.server
    local_port, socks_port = harness.free_port(), harness.free_port()
    with TargetServer() as target:
        offset = sshd.log_offset()
        proc = beta.user.popen(
            beta.ssh_argv(alpha, options=["-N", "-o", "ExitOnForwardFailure=yes",
                                          "-L", f"{local_port}:{LOCALHOST}:{target.port}",
                                          "-D", f"{LOCALHOST}:{socks_port}"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            # -L: the client listens locally; the server refuses to connect onwards.
            with connect_when_listening(local_port) as sock:
                assert read_until_eof(sock) == b""
            # -D: a SOCKS5 CONNECT through the tunnel goes nowhere either.
            with connect_when_listening(socks_port) as sock:
                sock.sendall(b"\x05\x01\x00")
                sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(LOCALHOST) + target.port.to_bytes(2, "big"))
                assert TargetServer.SECRET not in read_until_eof(sock)
            # serve answers every direct-tcpip open with a refusal and logs
            # nothing; the target never accepting a connection is the proof.
            if is_sshd(alpha):
                needle = f"refused local port forward: originator {LOCALHOST} port"
                log = sshd.wait_for_log(offset, needle)
                assert harness.wait_until(lambda: sshd.log_since(offset).count(needle) >= 2, 5), log
                assert sshd.log_since(offset).count(f"target {LOCALHOST} port {target.port}") >= 2
        finally:
            stop(proc)
        assert target.accepted == 0


def test_no_remote_port_forwarding(paired):
    alpha, beta = paired
    remote_port = harness.free_port()
    with TargetServer() as target:
        proc = beta.ssh(alpha, options=["-N", "-o", "ExitOnForwardFailure=yes",
                                        "-R", f"{LOCALHOST}:{remote_port}:{LOCALHOST}:{target.port}"])
        assert proc.returncode == 255
        assert f"remote port forwarding failed for listen port {remote_port}".encode() in proc.stderr
        # Nothing listens on the server side (the same host here).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOCALHOST, remote_port), timeout=2).close()
        assert target.accepted == 0


def test_library_client_is_refused_agent_x11_pty_forwarding_and_sftp(paired):
    import paramiko

    alpha, beta = paired
    client = paramiko_connect(alpha.user.name, beta.identity, alpha.server)
    try:
        transport = client.get_transport()
        # The connection itself works: the paired key runs peer-shell.
        status, out, err = paramiko_exec(client, "ping")
        assert (status, json.loads(out)["peer"], err) == (0, alpha.name, b"")
        # Not agent forwarding (SSH_AUTH_SOCK would reach the forced command),
        assert not channel_request_granted(transport, "auth-agent-req@openssh.com")
        # nor a pty, nor X11,
        chan = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            chan.get_pty()
        chan = transport.open_session(timeout=10)
        with pytest.raises(paramiko.SSHException):
            chan.request_x11()
        with TargetServer() as target:
            # nor a direct-tcpip channel (what -L and -D use),
            with pytest.raises(paramiko.ChannelException) as refused:
                transport.open_channel("direct-tcpip", (LOCALHOST, target.port), (LOCALHOST, 40000), timeout=10)
            # sshd says "administratively prohibited"; serve's SSH layer
            # (asyncssh) answers a refused open with "connect failed", the
            # same answer whatever the target, without connecting anywhere.
            assert refused.value.code == (paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED if is_sshd(alpha)
                                          else paramiko.common.OPEN_FAILED_CONNECT_FAILED)
            assert target.accepted == 0
        # nor a listening port on the server (what -R uses),
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward(LOCALHOST, 0)
        # nor an sftp session: under sshd the forced command answers the
        # subsystem request, serve refuses it outright.
        before = len(alpha.audit_events())
        with pytest.raises(paramiko.SSHException):
            paramiko.SFTPClient.from_transport(transport)
        chan = transport.open_session(timeout=10)
        if is_sshd(alpha):
            # And a shell request ends in peer-shell's refusal.
            chan.invoke_shell()
            assert chan.recv_exit_status() == PeerRefused.exit_code
            assert chan.makefile_stderr("rb").read() == b'{"ok": false, "error": "refused"}\n'
        else:
            # serve refuses the shell request itself.
            with pytest.raises(paramiko.SSHException):
                chan.invoke_shell()
        assert transport.is_active()
    finally:
        client.close()
    if is_sshd(alpha):
        assert harness.wait_until(lambda: len(alpha.audit_events()) >= before + 2, 5)
        events = new_events(alpha, before)
        assert [(e["outcome"], e.get("command")) for e in events] == [("refused", "internal-sftp"), ("refused", None)]
    else:
        quiesce([alpha])
        assert new_events(alpha, before) == []  # peer-shell never ran
        assert [(e["verb"], e["outcome"]) for e in serve_events(alpha, before)] == [
            ("subsystem", "refused"), ("shell", "refused")]


def test_asyncssh_client_pings_and_is_refused_a_pty(paired):
    import asyncssh

    alpha, beta = paired
    sshd = alpha.server

    async def session() -> None:
        async with asyncssh.connect(sshd.host, port=sshd.port, username=alpha.user.name,
                                    client_keys=[str(beta.identity)], known_hosts=str(sshd.known_hosts_path),
                                    agent_path=None, config=[], connect_timeout=10) as conn:
            result = await conn.run("ping", check=False)
            assert result.exit_status == 0 and json.loads(result.stdout)["peer"] == alpha.name
            with pytest.raises(asyncssh.ChannelOpenError, match="PTY request failed"):
                await conn.create_process("ping", term_type="xterm")
            result = await conn.run("id", check=False)
            assert (result.exit_status, result.stdout) == (PeerRefused.exit_code, "")
            assert json.loads(result.stderr) == {"ok": False, "error": "refused"}

    asyncio.run(asyncio.wait_for(session(), 60))


@pytest.mark.servers("sshd", reason="shows the permissive sshd config; serve serves nothing but peerkit lines")
def test_control_key_without_restrict_gets_what_peerkit_keys_are_refused(control_login, sshd):
    """The same requests, for a key line with a forced command but no `restrict`: granted.

    So this sshd is as permissive as its config says, and the refusals above
    come from the `restrict` in peerkit's key lines.
    """
    user, key = control_login
    client = paramiko_connect(user.name, key, sshd)
    try:
        transport = client.get_transport()
        assert channel_request_granted(transport, "auth-agent-req@openssh.com")
        transport.open_session(timeout=10).get_pty()
        if shutil.which("xauth", path="/usr/bin:/bin"):
            transport.open_session(timeout=10).request_x11()
        with TargetServer() as target:
            chan = transport.open_channel("direct-tcpip", (LOCALHOST, target.port), (LOCALHOST, 40000), timeout=10)
            assert chan.makefile("rb").read() == TargetServer.SECRET
            assert target.accepted == 1
        port = transport.request_port_forward(LOCALHOST, 0)
        assert port > 0
        transport.cancel_port_forward(LOCALHOST, port)
    finally:
        client.close()


def test_sftp_and_scp_are_refused(paired):
    alpha, beta = paired
    sshd = alpha.server
    opts = harness.ssh_options(beta.identity, sshd.known_hosts_path)
    login = f"{alpha.user.name}@{sshd.host}"
    before = len(alpha.audit_events())

    # The sftp client: the subsystem request reaches peer-shell, which refuses.
    proc = beta.user.run(["sftp", *opts, "-P", str(sshd.port), "-b", "-", login], input=b"ls -la /\nget /etc/passwd\n")
    assert proc.returncode != 0
    assert b"passwd" not in proc.stdout and b"etc" not in proc.stdout
    assert b"Connection closed" in proc.stderr

    # A raw subsystem request: nothing usable comes back (sshd drops a
    # subsystem's stderr, so there is not even the error line; serve
    # refuses the request before anything runs).
    proc = beta.ssh(alpha, "sftp", options=["-s"])
    if is_sshd(alpha):
        assert (proc.returncode, proc.stdout, proc.stderr) == (PeerRefused.exit_code, b"", b"")
    else:
        assert (proc.returncode, proc.stdout) == (255, b"")
        assert b"subsystem request failed" in proc.stderr

    # scp over sftp (the default) and over the legacy protocol (an exec of `scp -f`).
    got = beta.user.home / "copied-passwd"
    proc = beta.user.run(["scp", *opts, "-P", str(sshd.port), f"{login}:/etc/passwd", str(got)])
    assert proc.returncode != 0 and not got.exists()
    proc = beta.user.run(["scp", "-O", *opts, "-P", str(sshd.port), f"{login}:/etc/passwd", str(got)])
    assert proc.returncode != 0 and not got.exists()
    assert json.loads(proc.stderr.splitlines()[-1]) == {"ok": False, "error": "refused"}

    events = new_events(alpha, before)
    # Under serve the subsystem requests never reach peer-shell: only the
    # legacy scp's exec does.
    subsystems = [("refused", "internal-sftp")] * 3 if is_sshd(alpha) else []
    assert [(e["outcome"], e["command"]) for e in events] == [*subsystems, ("refused", "scp -f /etc/passwd")]


@pytest.mark.parametrize("command, code, exit_code", [
    ("id", "refused", PeerRefused.exit_code),
    ("/bin/sh -c id", "refused", PeerRefused.exit_code),
    ("ping; id", "refused", PeerRefused.exit_code),
    ("ping && id", "refused", PeerRefused.exit_code),
    ("stream-app ../..", "bad-slug", BadSlug.exit_code),
    ("stream-app x y", "refused", PeerRefused.exit_code),
    ("stream-app blog --to-command=id", "refused", PeerRefused.exit_code),
    ("stream-app no-such-app", "no-such-app", NoSuchApp.exit_code),
    ("scp -f /etc/passwd", "refused", PeerRefused.exit_code),
    ("rsync --server --sender -vlogDtpre.iLsfxC . /", "refused", PeerRefused.exit_code),
    ("internal-sftp", "refused", PeerRefused.exit_code),
    ("ping ", "refused", PeerRefused.exit_code),
    ("PING", "refused", PeerRefused.exit_code),
])
def test_any_other_command_is_refused(paired, alpha_apps, command, code, exit_code):
    alpha, beta = paired
    assert_refused(beta.ssh(alpha, command), code, exit_code)


# -- 3. hostile commands are refused and logged -------------------------------------

_FORGED = '{"time":"x","peer":"site-beta","outcome":"ok","verb":"ping"}'
HOSTILE = [
    # (what the client sends, outcome, whether the parser rejected it before naming a verb)
    ("stream-app ../..", "bad-slug", True),
    ("stream-app ../../../../etc/shadow", "bad-slug", True),
    ("stream-app linked", "no-such-app", False),  # symlink to another app
    ("stream-app etc", "no-such-app", False),  # symlink to /etc
    ("ping\n" + _FORGED, "refused", True),  # a forged second log line
    ("ping; cat /etc/shadow", "refused", True),
    ("ping $(touch {pwned})", "refused", True),
    ("ping `touch {pwned}`", "refused", True),
    ("ping | touch {pwned}", "refused", True),
    ("\x1b]0;owned\x07\x1b[2J\x1b[31mping", "refused", True),  # terminal escapes
    ("p\u0456ng", "refused", True),  # Cyrillic i
    ("stream-app \u2024\u2024", "refused", True),  # one-dot leaders look like '..'
    (b"stream-app \xff\xfe/../x", "refused", True),  # not UTF-8 at all
    ("stream-app " + "../" * 400 + "etc", "refused", True),  # over the length limit
]


def test_traversal_and_injection_are_refused_and_logged_once_each(paired, alpha_apps, harness_root):
    alpha, beta = paired
    sshd = alpha.server
    pwned = harness_root / "pwned"
    log = alpha.audit_log
    for raw, outcome, unparsed in HOSTILE:
        text = raw.replace("{pwned}", str(pwned)) if isinstance(raw, str) else raw
        lines_before = log.read_bytes().count(b"\n")
        offset = sshd.log_offset()

        proc = beta.ssh(alpha, text)
        if isinstance(text, bytes) and not is_sshd(alpha):
            # An exec request that is not UTF-8 is refused by serve's SSH
            # layer (asyncssh) before peer-shell could see it: no audit line.
            assert (proc.returncode, proc.stdout) == (255, b"")
            assert b"exec request failed" in proc.stderr
            assert log.read_bytes().count(b"\n") == lines_before
            continue

        assert proc.returncode != 0 and proc.stdout == b"", text
        assert refusal(proc)["error"] == outcome, text
        data = log.read_bytes()
        assert data.count(b"\n") == lines_before + 1, (text, data[-600:])
        line = data.splitlines()[-1]
        # The hostile text is only ever escaped: pure printable ASCII on one line.
        assert all(0x20 <= byte < 0x7F for byte in line), line
        assert len(line) < 1024
        event = json.loads(line)
        assert event["outcome"] == outcome and event["peer"] == "site-beta"
        # Who called: the address and port from SSH_CONNECTION, the same
        # connection sshd logged.
        assert event["client"] == LOCALHOST and isinstance(event["client_port"], int)
        if is_sshd(alpha):
            accepted = f"Accepted publickey for {alpha.user.name} from {LOCALHOST} port {event['client_port']} ssh2"
            assert accepted in sshd.wait_for_log(offset, accepted)
        else:
            # serve hands peer-shell the connection's own peer address.
            assert 1024 <= event["client_port"] <= 65535 and event["client_port"] != sshd.port
        sent = text.decode("utf-8", "surrogateescape") if isinstance(text, bytes) else text
        if unparsed:
            assert "verb" not in event
            shown = sent[:200] + ("\u2026" if len(sent) > 200 else "")
            assert event["command"] == shown
        else:
            assert event["verb"] == "stream-app" and event["slug"] == sent.split(" ")[1]
    assert not pwned.exists()
    assert b"\x1b" not in log.read_bytes() and _FORGED.encode() not in log.read_bytes()


def test_refusal_is_logged_even_when_the_client_hangs_up_at_once(paired):
    """Send hostile commands and close each channel without waiting for the answer.

    Regression: peer-shell wrote its error line before the audit record, and
    a write to the closed channel (EPIPE) skipped the record.
    """
    alpha, beta = paired
    sshd = alpha.server

    def settled() -> None:
        if is_sshd(alpha):
            settle(alpha, sshd)
        else:
            harness.wait_until(lambda: len(alpha.audit_events()) >= before + len(hostile), 10)
            quiesce([alpha])

    hostile = ["stream-app ../../etc", "id; rm -rf ~", "sftp-server"]
    before = 0
    settled()
    before = len(alpha.audit_events())
    client = paramiko_connect(alpha.user.name, beta.identity, sshd)
    try:
        transport = client.get_transport()
        for command in hostile:
            chan = transport.open_session(timeout=10)
            chan.exec_command(command)
            chan.close()
    finally:
        client.close()
    settled()
    events = new_events(alpha, before)
    assert sorted(e["command"] for e in events) == sorted(hostile)
    assert {e["outcome"] for e in events} <= {"refused", "bad-slug"}


# -- 4, 5. revocation --------------------------------------------------------------

def test_after_unpair_the_server_refuses_the_key(fresh_instance, beta, beta_token):
    delta = fresh_instance("delta")
    sshd = delta.server
    delta.pair(beta_token)
    assert ok_json(beta.ssh(delta, "ping"))["peer"] == delta.name

    result = delta.unpair(beta.name)
    assert (result["key_removed"], result["row_removed"]) == (True, True)

    events_before = len(delta.audit_events())
    offset = sshd.log_offset()
    proc = beta.ssh(delta, "ping")
    assert proc.returncode == 255
    assert proc.stdout == b""
    assert b"Permission denied (publickey)" in proc.stderr
    # Refused by the server itself: no login, and peer-shell never ran.
    assert new_events(delta, events_before) == []
    if is_sshd(delta):
        assert f"Accepted publickey for {delta.user.name}" not in sshd.log_since(offset)
        assert len(delta.audit_events()) == events_before
    else:
        # serve says why in the audit log: the key has no line any more.
        refusals = serve_events(delta, events_before)
        assert refusals and {(e["verb"], e["outcome"], e["reason"]) for e in refusals} == {
            ("auth", "refused", "key not authorized")}, refusals
        assert {e["key"] for e in refusals} == {identity_fingerprint(beta)}
        assert {e["client"] for e in refusals} == {LOCALHOST}


def identity_fingerprint(instance: harness.PeerkitInstance) -> str:
    """The SHA256 fingerprint of the instance's identity, as ssh-keygen prints it."""
    pub = instance.identity.with_name(instance.identity.name + ".pub")
    return harness.run_root(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)]).stdout.split()[1]


_DELETE_ROW = "import sqlite3, sys\ndb = sqlite3.connect(sys.argv[1])\nwith db:\n    print(db.execute('DELETE FROM peers WHERE name = ?', (sys.argv[2],)).rowcount)\n"


def test_key_line_without_peer_row_is_refused_by_peer_shell(fresh_instance, beta, beta_token):
    epsilon = fresh_instance("epsilon")
    sshd = epsilon.server
    epsilon.pair(beta_token)
    assert ok_json(beta.ssh(epsilon, "ping"))["peer"] == epsilon.name

    # The operator (or a crash) removes the row but leaves the key line.
    deleted = epsilon.user.run([sys.executable, "-c", _DELETE_ROW, str(epsilon.db_path), beta.name],
                               check=True, text=True)
    assert deleted.stdout.strip() == "1"
    assert f"peerkit:{beta.name}" in epsilon.authorized_keys.read_text()
    assert epsilon.peers() == []

    offset = sshd.log_offset()
    before = len(epsilon.audit_events())
    assert_refused(beta.ssh(epsilon, "ping"), "refused", PeerRefused.exit_code)
    # The server let the key in (the line is there); peer-shell said no.
    if is_sshd(epsilon):
        assert f"Accepted publickey for {epsilon.user.name}" in sshd.log_since(offset)
    else:
        assert serve_events(epsilon, before) == []
    [event] = new_events(epsilon, before)
    assert event["outcome"] == "refused" and "not paired" in event["reason"]


# -- 6. symmetry ---------------------------------------------------------------

def test_pairing_is_symmetric(paired):
    alpha, beta = paired
    assert ok_json(beta.ssh(alpha, "ping"))["peer"] == alpha.name
    assert ok_json(alpha.ssh(beta, "ping"))["peer"] == beta.name
    assert ok_json(alpha.ssh(beta, "list-apps"))["apps"] == []
    # Each side pinned the other's server host keys from the token (under
    # serve each instance has its own, generated by its first start).
    for here, there in ((alpha, beta), (beta, alpha)):
        [peer] = here.peers()
        assert peer["name"] == there.name and peer["authorized"]
        assert sorted(peer["host_key_fingerprints"]) == sorted(there.server.host_key_fingerprints())
    if not is_sshd(alpha):
        assert alpha.server.host_key_fingerprints() != beta.server.host_key_fingerprints()


# -- 7. other tools' key lines are left alone ------------------------------------------

def test_foreign_key_line_is_byte_identical_after_pair_and_unpair(fresh_instance, beta, beta_token,
                                                                 harness_root):
    gamma = fresh_instance("gamma")
    sshd = gamma.server
    other_key = harness_root / f"other-tool-key-{sshd.kind}"
    harness.run_root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backup@other-host", "-f", str(other_key)])
    other_line = other_key.with_name(other_key.name + ".pub").read_text().strip()
    original = ("# other-tool: do not edit\n"
                f'command="/usr/local/bin/backup-receiver --ro",no-pty,from="10.0.0.0/8"  {other_line}').encode()
    assert not original.endswith(b"\n")
    gamma.user.write_file(gamma.authorized_keys, original, mode=0o600)

    gamma.pair(beta_token)
    paired_text = gamma.authorized_keys.read_bytes()
    assert paired_text.startswith(original + b"\n")
    offset = sshd.log_offset()
    assert ok_json(beta.ssh(gamma, "ping"))["peer"] == gamma.name
    if is_sshd(gamma):
        # sshd used peerkit's line (line 3), after the unterminated foreign one.
        assert f"found at {gamma.authorized_keys}:3" in sshd.log_since(offset)

    gamma.unpair(beta.name)
    assert gamma.authorized_keys.read_bytes() == original
    st = gamma.authorized_keys.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (gamma.user.uid, 0o600)
    assert beta.ssh(gamma, "ping").returncode == 255
