"""The client's logic that needs no network (the connections themselves: tests/integration).

Requests sent alongside the ping: a peer's serve.max_sessions_per_peer may
refuse the sessions a pull opens at once (ping, list-apps, rsync); refused
ones go again after the ping, one at a time.  The real server and pull are
in tests/integration/test_serve.py; here the order is pinned down exactly.

app-info's answers, including the malformed ones no real peer-shell sends,
and its fallback to ping and list-apps for a peer that refuses it (the real
one: tests/integration/test_transfers.py).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from peerkit.client import PeerConnection, _alongside, app_info, app_info_answer, known_features
from peerkit.errors import NoSuchApp, PeerRefused, PeerUnreachable, ProtocolError, SessionRefused, TransferIncomplete


class Peer:
    """Refuses each named request's first ``refusals[name]`` tries; records who ran when."""

    def __init__(self, refusals: dict[str, int]) -> None:
        self.refusals = dict(refusals)
        self.running = 0
        self.most_at_once = 0
        self.log: list[str] = []

    def call(self, name: str):
        async def run(_conn: object) -> str:
            if self.refusals.get(name, 0) > 0:
                self.refusals[name] -= 1
                self.log.append(f"{name} refused")
                raise SessionRefused(name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.log.append(f"{name} runs")
            await asyncio.sleep(0.01)
            self.running -= 1
            return name
        return run


def test_refused_requests_wait_for_the_ping_then_take_turns():
    peer = Peer({"list-apps": 1, "rsync": 1})

    async def scenario() -> list[str]:
        pinged, turns = asyncio.Event(), asyncio.Lock()
        futures = [asyncio.ensure_future(_alongside(None, peer.call(n), pinged, turns)) for n in ("list-apps", "rsync")]
        await asyncio.sleep(0.05)
        # Both refused, and neither tries again before the ping is done.
        assert peer.log == ["list-apps refused", "rsync refused"] and not any(f.done() for f in futures)
        pinged.set()
        return list(await asyncio.gather(*futures))

    assert asyncio.run(scenario()) == ["list-apps", "rsync"]
    assert peer.most_at_once == 1
    assert peer.log[2:] == ["list-apps runs", "rsync runs"]


def test_a_request_not_refused_runs_at_once():
    peer = Peer({})

    async def scenario() -> str:
        pinged = asyncio.Event()  # never set: it must not matter
        return await asyncio.wait_for(_alongside(None, peer.call("list-apps"), pinged, asyncio.Lock()), 5)

    assert asyncio.run(scenario()) == "list-apps"


def test_a_request_refused_again_after_the_ping_fails():
    # Tried twice at most: a peer that refuses everything is not asked forever.
    peer = Peer({"rsync": 2})

    async def scenario() -> None:
        pinged = asyncio.Event()
        pinged.set()
        await _alongside(None, peer.call("rsync"), pinged, asyncio.Lock())

    with pytest.raises(SessionRefused):
        asyncio.run(scenario())
    assert peer.log == ["rsync refused", "rsync refused"]


def test_only_features_we_act_on_are_recorded():
    # A peer's feature list is its own say: unbounded, and not ours to store.
    conn = PeerConnection(None, None)  # type: ignore[arg-type]
    conn.features = frozenset({"zstd", "rsync", "x" * 31, "shell-access"})
    assert known_features(conn) == ["rsync", "zstd"]


def test_the_cpu_is_asked_about_aes_once_per_process():
    """`ping --all` and `serve` connect dozens of times; /proc/cpuinfo is read for the first only."""
    from peerkit import client as module

    module._cpu_has_aes.cache_clear()
    first = module.encryption_algs()
    assert module.encryption_algs() == first
    assert module._cpu_has_aes.cache_info().misses == 1
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        aes = any(line.startswith("flags") and " aes" in line for line in fh)
    assert first[0].startswith("aes128-gcm" if aes else "chacha20")


class Answers(PeerConnection):
    """A peer that answers each command with its entry in ``answers`` (an exception is raised); records them."""

    def __init__(self, answers: dict) -> None:
        super().__init__(None, SimpleNamespace(name="beta"))  # type: ignore[arg-type]
        self.answers = answers
        self.asked: list[str] = []

    async def call_json(self, command: str) -> dict:
        self.asked.append(command)
        answer = self.answers[command]
        if isinstance(answer, Exception):
            raise answer
        return answer


GREETING = {"ok": True, "peer": "alpha", "version": "1", "features": ["app-info", "rsync"]}


def test_app_info_is_the_inventory_list_apps_gives_of_that_app():
    conn = Answers({"app-info wiki": {**GREETING, "domain": "a.example.org", "app": {"slug": "wiki", "size_kb": 7}}})
    assert asyncio.run(app_info(conn, "wiki")) == {
        "peer": "beta", "apps": [{"slug": "wiki", "size_kb": 7}], "domain": "a.example.org"}
    assert conn.asked == ["app-info wiki"] and conn.features == {"app-info", "rsync"}
    conn = Answers({"app-info wiki": {**GREETING, "domain": "bad domain;x", "app": None}})
    assert asyncio.run(app_info(conn, "wiki")) == {"peer": "beta", "apps": [], "domain": None}


@pytest.mark.parametrize("answer", [
    {**GREETING, "app": {"slug": "other", "size_kb": 7}},  # about another app
    {**GREETING, "app": {"slug": "wiki", "size_kb": -1}},
    {**GREETING, "app": {"slug": "wiki", "size_kb": True}},
    {**GREETING, "app": {"slug": "wiki"}},
    {**GREETING, "app": "wiki"},
    {**GREETING, "app": [{"slug": "wiki", "size_kb": 7}]},
    {**GREETING},  # no app at all
    {**GREETING, "ok": False, "app": None},
    {"app": {"slug": "wiki", "size_kb": 7}},
], ids=["other-app", "negative-size", "bool-size", "no-size", "string", "list", "no-app", "not-ok", "no-ok"])
def test_a_malformed_app_info_answer_is_a_protocol_error(answer):
    with pytest.raises(ProtocolError):
        asyncio.run(app_info(Answers({"app-info wiki": answer}), "wiki"))


def test_a_peer_that_refuses_app_info_is_asked_ping_and_list_apps():
    listing = {"peer": "alpha", "apps": [{"slug": "wiki", "size_kb": 3}, {"slug": "x", "size_kb": 1}],
               "domain": "a.example.org"}
    conn = Answers({"app-info wiki": PeerRefused("beta answered refused"),
                    "ping": {**GREETING, "features": ["rsync"]}, "list-apps": listing})
    inventory = asyncio.run(app_info(conn, "wiki"))
    assert conn.asked == ["app-info wiki", "ping", "list-apps"]
    assert inventory == {"peer": "beta", "apps": listing["apps"], "domain": "a.example.org"}
    assert known_features(conn) == ["rsync"]  # what is recorded: no app-info next time
    # Refused by the ping too: the peer refuses us, and that is the answer.
    conn = Answers({"app-info wiki": PeerRefused("refused"), "ping": PeerRefused("refused")})
    with pytest.raises(PeerRefused):
        asyncio.run(app_info(conn, "wiki"))
    assert conn.asked == ["app-info wiki", "ping"]
    # Other failures are not a missing verb: no second try.
    for failure in (PeerUnreachable("gone"), SessionRefused("busy")):
        conn = Answers({"app-info wiki": failure})
        with pytest.raises(type(failure)):
            asyncio.run(app_info(conn, "wiki"))
        assert conn.asked == ["app-info wiki"]


def _answered(line: bytes | BaseException) -> "asyncio.Future[bytes]":
    """The future rsync.run_client fills with stderr's first line (or fails), already done."""
    future = asyncio.get_running_loop().create_future()
    if isinstance(line, BaseException):
        future.set_exception(line)
    else:
        future.set_result(line)
    return future


def _answer(conn: PeerConnection, line: bytes | BaseException) -> dict:
    async def go() -> dict:
        return await app_info_answer(conn, "wiki", _answered(line))
    return asyncio.run(go())


def test_with_app_info_answer_is_checked_as_app_info_is():
    line = json.dumps({**GREETING, "domain": "a.example.org", "app": {"slug": "wiki", "size_kb": 7}}).encode()
    conn = Answers({})
    assert _answer(conn, line) == {"peer": "beta", "apps": [{"slug": "wiki", "size_kb": 7}], "domain": "a.example.org"}
    assert conn.features == {"app-info", "rsync"} and conn.asked == []


@pytest.mark.parametrize("line", [
    b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"wiki"',
    json.dumps({**GREETING, "app": {"slug": "other", "size_kb": 7}}).encode(),
    json.dumps({**GREETING, "app": {"slug": "wiki", "size_kb": -1}}).encode(),
    json.dumps({**GREETING}).encode(),
    json.dumps({"app": {"slug": "wiki", "size_kb": 7}}).encode(),
], ids=["empty", "text", "not-utf8", "list", "string", "other-app", "negative-size", "no-app", "no-ok"])
def test_a_malformed_with_app_info_answer_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        _answer(Answers({}), line)


@pytest.mark.parametrize("code,error", [("refused", PeerRefused), ("no-such-app", NoSuchApp),
                                        ("failed", TransferIncomplete), (None, PeerRefused)])
def test_an_error_line_in_place_of_the_answer_raises_what_its_code_means(code, error):
    line = json.dumps({"ok": False, **({"error": code} if code else {})}).encode()
    with pytest.raises(error):
        _answer(Answers({}), line)


APP_INFO = {**GREETING, "domain": None, "app": {"slug": "wiki", "size_kb": 7}}


@pytest.mark.parametrize("first,asked,restart", [
    (json.dumps(APP_INFO).encode(), [], False),
    # A peer-shell older than with-app-info refuses it: app-info, and the rsync goes again.
    (b'{"ok": false, "error": "refused"}', ["app-info wiki"], True),
    # The rsync failed before answering (here or on the peer): app-info; its error is the transfer's.
    (TransferIncomplete("rsync exited 12"), ["app-info wiki"], False),
    (SessionRefused("no session"), ["app-info wiki"], False),
    (b'{"ok": false, "error": "failed"}', ["app-info wiki"], False),
])
def test_a_pull_greets_with_the_rsync_answer_or_else_app_info(first, asked, restart):
    from peerkit.pull import _greet_with_rsync

    conn = Answers({"app-info wiki": APP_INFO})
    flag = [False]

    async def go() -> dict:
        return await _greet_with_rsync(conn, "wiki", _answered(first), flag)

    assert asyncio.run(go())["apps"] == [{"slug": "wiki", "size_kb": 7}]
    assert conn.asked == asked and flag == [restart]


def test_a_malformed_rsync_answer_is_not_papered_over_by_app_info():
    from peerkit.pull import _greet_with_rsync

    conn = Answers({"app-info wiki": APP_INFO})

    async def go() -> dict:
        return await _greet_with_rsync(conn, "wiki", _answered(b"garbage"), [False])

    with pytest.raises(ProtocolError):
        asyncio.run(go())
    assert conn.asked == []


@pytest.mark.parametrize("error,code", [
    ("no-such-app", "no-such-app"), ("refused", "refused"), ("some-new-code", "some-new-code"),
    ("\x1b[2J\x1b[31mpwned", None), ("No-Such-App", None), ("a" * 41, None), ("", None), (7, None),
    ("ok\nfake line", None), ("caf\u00e9", None),
])
def test_a_peer_error_code_reaches_our_messages_only_when_shaped_like_one(error, code):
    from peerkit.client import remote_error

    assert remote_error(json.dumps({"ok": False, "error": error}).encode() + b"\n") == code
    line = json.dumps({"ok": False, "error": error}).encode()
    with pytest.raises(PeerRefused if code in (None, "refused", "some-new-code") else NoSuchApp) as info:
        _answer(Answers({}), line)
    assert info.value.message.isprintable() and "\x1b" not in str(info.value)


def test_a_peers_name_and_version_are_fit_for_a_terminal():
    from peerkit.client import ping

    conn = Answers({"ping": {**GREETING, "peer": "al\x1b[2Jpha", "version": "1.0\x07" + "x" * 100}})
    reply = asyncio.run(ping(conn))
    assert reply["peer"] == "al?[2Jpha" and reply["version"] == "1.0?" + "x" * 60
    assert asyncio.run(ping(Answers({"ping": {**GREETING, "peer": ["x"], "version": 3}})))["version"] is None
    assert asyncio.run(ping(Answers({"ping": GREETING}))) == GREETING  # a plain answer goes through unchanged


@pytest.mark.parametrize("code,closed,expected", [
    ("OPEN_ADMINISTRATIVELY_PROHIBITED", False, SessionRefused),  # sshd's MaxSessions
    ("OPEN_CONNECT_FAILED", False, SessionRefused),  # an asyncssh server's "Session refused" (peerkit serve)
    ("OPEN_CONNECT_FAILED", True, PeerUnreachable),  # asyncssh's answer for a channel the lost connection took
    ("OPEN_ADMINISTRATIVELY_PROHIBITED", True, PeerUnreachable),
])
def test_a_channel_that_does_not_open_is_a_refusal_only_while_the_connection_lives(code, closed, expected):
    import asyncssh

    class Conn:
        async def create_session(self, *_a, **_k):
            raise asyncssh.ChannelOpenError(getattr(asyncssh, code), "no")

        def is_closed(self) -> bool:
            return closed

    class Named:
        name = "peer-x"

    conn = PeerConnection(Conn(), Named())  # type: ignore[arg-type]
    with pytest.raises(expected):
        asyncio.run(conn.stream("ping", lambda _data: None))


def test_ping_all_connects_to_a_bounded_number_of_peers_at_a_time(tmp_path, monkeypatch):
    """Eight peers behind one real TCP listener that accepts and never says a word (a tarpit).

    Each connection waits out the 1 s login timeout there, so with a bound
    of three they arrive in waves: three, then three more a second later,
    then two.  Unbounded, all eight arrived at once.
    """
    import socket
    import threading
    import time

    from peerkit import client, pairing
    from tests.instances import make_instance

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[float] = []

    def hold(conn: socket.socket) -> None:
        with conn:
            while conn.recv(4096):  # until the client gives up and closes
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(time.monotonic())
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    alpha = make_instance(tmp_path / "alpha", "alpha", connect_timeout=1)
    for i in range(8):
        peer = make_instance(tmp_path / f"p{i}", f"p{i}", host="127.0.0.1", port=port)
        pairing.pair(alpha, pairing.our_token(peer)[0])
    monkeypatch.setattr(client, "PING_ALL_AT_ONCE", 3)
    try:
        results = asyncio.run(client.ping_all(alpha))
    finally:
        listener.close()
    assert sorted(r["peer"] for r in results) == [f"p{i}" for i in range(8)]
    assert all(r["ok"] is False and r["error"] == "peer-unreachable" for r in results), results
    assert len(accepted) == 8
    # Before the first wave could time out, only the first wave had arrived.
    assert len([t for t in accepted if t < accepted[0] + 0.9]) == 3, [round(t - accepted[0], 2) for t in accepted]


def test_an_interrupted_ping_all_records_the_peers_that_had_finished(tmp_path):
    """`peerkit ping --all`, stopped with Ctrl-C's signal while three peers still hang in a tarpit.

    The three on a port where nothing listens had already failed: their
    status is recorded; the three that never finished keep theirs.
    """
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    from peerkit import pairing
    from peerkit.state import PeerStore
    from tests.instances import make_instance

    tarpit = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(tarpit.accept()[0]) for _ in range(3)], daemon=True).start()
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: refused at once
    alpha = make_instance(tmp_path / "alpha", "alpha", connect_timeout=60)
    for name, port in [*((f"hang{i}", tarpit.getsockname()[1]) for i in range(3)),
                       *((f"gone{i}", closed_port) for i in range(3))]:
        peer = make_instance(tmp_path / name, name, host="127.0.0.1", port=port)
        pairing.pair(alpha, pairing.our_token(peer)[0])
    proc = subprocess.Popen([sys.executable, "-m", "peerkit.cli", "--config", str(alpha.path), "--json", "ping", "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(held) < 3:  # every ping has started; the refused ones end at once
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        tarpit.close()
        for conn in held:
            conn.close()
    assert proc.returncode == 130, (out, err)
    with PeerStore(alpha.db_path) as store:
        statuses = {p.name: p.status for p in store.all()}
    assert statuses == {**{f"gone{i}": "unreachable" for i in range(3)}, **{f"hang{i}": "new" for i in range(3)}}
