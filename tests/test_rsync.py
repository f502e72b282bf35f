"""peerkit.rsync and peerkit.rsyncrelay: rsync's remote shell hands its command to the peerkit process.

The relay may speak for anything that runs as rsync's remote shell, so the
peerkit process runs only the rsync server command for the app and the
direction it asked for; everything else is refused before a channel opens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

from peerkit import swap
from peerkit.client import PeerConnection
from peerkit.errors import PeerkitError, SessionRefused, TransferIncomplete
from peerkit.rsync import (HOST, RELAY, LinkFarm, _relay_request, checked_command, client_argv, relay_command,
                           run_client)
from peerkit.rsyncargs import rsync_binary

from tests.trees import make_tree

CAPS = "e.iLsfxCIvu"
PULL = ["rsync", "--server", "--sender", f"-lHogtpr{CAPS}", "--numeric-ids", ".", "app/"]
PUSH = ["rsync", "--server", f"-lHtpr{CAPS}", "--delete", "--stats", "--numeric-ids", ".", "app/"]


@pytest.mark.parametrize("words,pull", [(PULL, True), (PUSH, False)])
def test_our_own_command_is_passed_on_as_one_line(words, pull):
    assert checked_command([HOST, *words], "app", pull=pull) == " ".join(words)


REFUSED = [
    (["other", *PULL], "another host"),
    (["-l", "root", HOST, *PULL], "ssh options before the host"),
    ([HOST], "no command"),
    ([HOST, "sh", "-c", "id"], "not rsync"),
    ([HOST, *PULL[:-1], "other/"], "another app"),
    ([HOST, *PUSH], "the other direction"),
    ([HOST, *PULL[:-2], "--rsh=sh", ".", "app/"], "an option off the allowlist"),
    ([HOST, *PULL[:-1], "app/ x"], "a word that would split on the peer"),
    ([HOST, *PULL[:-1], "app/\n"], "a control character"),
    ([HOST, *PULL[:4], "", *PULL[4:]], "an empty word"),
]


@pytest.mark.parametrize("words,why", REFUSED, ids=[why for _, why in REFUSED])
def test_anything_else_is_refused(words, why):
    with pytest.raises(PeerkitError):
        checked_command(words, "app", pull=True)


def test_client_argv_puts_the_relay_in_and_paths_after_double_dash(tmp_path):
    argv = client_argv("/usr/bin/rsync", "RELAY", f"{HOST}:app/", f"{tmp_path}/", pull=True, link_dest=tmp_path)
    assert argv[argv.index("-e") + 1] == "RELAY"
    assert argv[-3:] == ["--", f"{HOST}:app/", f"{tmp_path}/"]
    assert f"--link-dest={tmp_path}" in argv


def test_relay_command_quotes_only_what_needs_it(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    assert relay_command(7) == f"'/opt/my python/bin/python3' -I -S {RELAY} 7"
    monkeypatch.setattr(sys, "executable", "/opt/it's/python3")
    with pytest.raises(PeerkitError):
        relay_command(7)


def _start_relay(*words: str) -> tuple[subprocess.Popen, socket.socket, int]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    stdin_r, stdin_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(RELAY), str(theirs.fileno()), *words],
                            stdin=stdin_r, stdout=subprocess.PIPE, pass_fds=(theirs.fileno(),), env={})
    os.close(stdin_r)
    theirs.close()
    return proc, ours, stdin_w


def test_relay_hands_over_its_words_and_pipes_and_exits_with_the_answer():
    proc, ours, to_stdin = _start_relay(HOST, *PULL)
    words, fds = asyncio.run(_relay_request(ours))
    assert words == [HOST, *PULL]
    # fds[0] is the relay's stdin (rsync's output), fds[1] its stdout (rsync's input).
    os.write(to_stdin, b"to the peer")
    assert os.read(fds[0], 100) == b"to the peer"
    os.write(fds[1], b"from the peer")
    os.close(fds[1])
    assert proc.stdout.read() == b"from the peer"  # and EOF: the relay kept no copy of its stdout
    os.close(fds[0])
    ours.send(b"23")
    assert proc.wait(10) == 23
    ours.close()
    os.close(to_stdin)


def test_relay_without_an_answer_exits_255_like_ssh():
    proc, ours, to_stdin = _start_relay(HOST, *PULL)
    _, fds = asyncio.run(_relay_request(ours))
    for fd in fds:
        os.close(fd)
    ours.close()
    assert proc.wait(10) == 255
    os.close(to_stdin)


def test_relay_imports_no_more_than_it_needs():
    # The relay's start is waited for by rsync and by the pull (no channel
    # opens before it handed its command over): `socket` alone would add
    # selectors, enum and functools, about 6 ms (README, Benchmarks).
    probe = (f"import sys; sys.argv = [{str(RELAY)!r}]; "
             "exec(compile(open(sys.argv[0]).read().replace('os._exit(main(sys.argv))', 'pass'), sys.argv[0], 'exec')); "
             "print(sorted(m for m in ('socket', 'selectors', 'enum', 'subprocess') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    assert out.strip() == "[]"


class _FakeConnection:
    """A connection whose channels are refused, or never open (``hang``)."""

    class _Peer:
        name = "peer-x"

    def __init__(self, hang: bool = False, lost: bool = False) -> None:
        import asyncssh

        self.peer = self._Peer()
        self.opened = asyncio.Event()

        async def create_process(*_a, **_k):
            self.opened.set()
            if hang:
                await asyncio.Event().wait()
            if lost:  # what asyncssh raises for every channel still opening when the connection goes
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
            # The code an asyncssh server (peerkit serve) refuses a session with.
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Session refused")

        self.conn = type("Conn", (), {"create_process": staticmethod(create_process),
                                      "is_closed": staticmethod(lambda: lost)})()

    lost = PeerConnection.lost


def _relays() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(RELAY) in line and not line.startswith("ps ")]


needs_rsync = pytest.mark.skipif(rsync_binary() is None, reason="rsync is not installed")


@needs_rsync
def test_a_refused_channel_is_session_refused_and_leaves_no_rsync_or_relay(tmp_path):
    conn = _FakeConnection()
    before = _relays()

    async def run() -> None:
        await asyncio.wait_for(run_client(conn, "app", tmp_path / "staging", None), 30)

    with pytest.raises(SessionRefused):
        asyncio.run(run())
    assert conn.opened.is_set() and _relays() == before


@needs_rsync
def test_a_channel_lost_with_the_connection_is_transfer_incomplete_not_session_refused(tmp_path):
    # A refusal makes a pull ask again after the ping; a lost connection must not.
    conn = _FakeConnection(lost=True)

    async def run() -> None:
        await asyncio.wait_for(run_client(conn, "app", tmp_path / "staging", None), 30)

    with pytest.raises(TransferIncomplete, match="connection lost"):
        asyncio.run(run())


@needs_rsync
def test_cancelling_mid_request_ends_rsync_and_its_relay_instead_of_waiting_for_them(tmp_path):
    # rsync killed mid-run leaves its relay waiting for a status, holding
    # rsync's stderr; waiting for rsync (which waits for that pipe) must not
    # wait for the relay.
    conn = _FakeConnection(hang=True)
    before = _relays()

    async def run() -> None:
        task = asyncio.ensure_future(run_client(conn, "app", tmp_path / "staging", None))
        await asyncio.wait_for(conn.opened.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)

    asyncio.run(run())
    assert _relays() == before


# -- the link farm, filled by a thread while the pull connects --------------------------------------

def test_a_farm_that_cannot_be_filled_says_so_and_goes(tmp_path):
    async def main():
        farm = LinkFarm(tmp_path / "no-such-app", tmp_path, "app")
        assert farm.path.is_dir() and farm.path.name.startswith(".peerkit-staging-app-")
        with pytest.raises(FileNotFoundError):
            await farm.ready()
        await farm.remove()
        assert not farm.path.exists()

    asyncio.run(main())


def test_a_farm_removed_while_it_fills_waits_for_its_thread(tmp_path):
    live = make_tree(tmp_path / "live", {f"d{i:02d}/f{j}": b"x" for i in range(40) for j in range(25)})

    async def main():
        farm = LinkFarm(live, tmp_path, "app")
        await farm.remove()  # at once: the thread has barely begun
        assert not farm.path.exists()
        assert all(os.stat(live / f"d{i:02d}" / "f0").st_nlink == 1 for i in range(40))

    asyncio.run(main())


def test_a_discarded_farm_goes_in_a_thread_while_the_loop_goes_on(tmp_path, monkeypatch):
    import threading

    from peerkit import rsync

    live = make_tree(tmp_path / "live", {f"d{i:02d}/f{j}": b"x" for i in range(20) for j in range(25)})
    threads = []

    def remove_tree(path):
        threads.append(threading.current_thread())
        swap.remove_tree(path)

    monkeypatch.setattr(rsync, "remove_tree", remove_tree)

    async def main():
        farm = LinkFarm(live, tmp_path, "app")
        await farm.ready()
        removal = farm.discard()
        assert farm.discard() is removal  # once only: rsync's end and the pull's clean-up both ask
        assert farm.path.exists()  # discard returns at once
        await farm.remove()  # waits for that same removal, and does not raise
        assert not farm.path.exists()
        assert all(os.stat(live / f"d{i:02d}" / "f0").st_nlink == 1 for i in range(20))

    asyncio.run(main())
    # Not in the loop's thread: the checks and the flush go on there meanwhile.
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
