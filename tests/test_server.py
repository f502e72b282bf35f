"""peerkit serve's reading of authorized_keys options: from=, expiry-time=, command=, and the grant.

`peerkit serve` must refuse exactly what sshd would refuse for a peerkit key
line (another source, a past expiry) and serve nothing but peer-shell's own
forced command.  These are the pure functions it decides with; the server
itself is exercised in tests/integration/test_serve.py.
"""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from peerkit import authkeys, pairing
from peerkit.config import Config
from peerkit.identity import read_identity
from peerkit.server import Grant, expired, find_grant, parse_options, source_allowed
from tests.instances import PEER_SHELL, make_instance

UTC = timezone.utc


# -- source_allowed (from=) -------------------------------------------------------

@pytest.mark.parametrize("patterns, address, allowed", [
    # CIDR blocks, IPv4 and IPv6
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("192.0.2.0/24", "192.0.2.255", True),
    ("192.0.2.0/25", "192.0.2.128", False),
    ("2001:db8::/32", "2001:db8:1::5", True),
    ("2001:db8::/32", "2001:db9::5", False),
    # single addresses
    ("127.0.0.2", "127.0.0.2", True),
    ("127.0.0.2", "127.0.0.1", False),
    ("::1", "::1", True),
    ("::1", "127.0.0.1", False),
    ("2001:db8::1", "2001:0db8:0000::0001", True),  # the same address written differently
    # a list: any entry may match
    ("192.0.2.1,10.0.0.0/8", "10.9.9.9", True),
    ("192.0.2.1,10.0.0.0/8", "192.0.2.1", True),
    ("192.0.2.1,10.0.0.0/8", "192.0.2.2", False),
    # IPv4 never matches an IPv6 block and vice versa
    ("::/0", "192.0.2.1", False),
    ("0.0.0.0/0", "2001:db8::1", False),
    # negation: a negated match refuses, whatever else matches, in any order
    ("!10.0.0.5,10.0.0.0/8", "10.0.0.5", False),
    ("10.0.0.0/8,!10.0.0.5", "10.0.0.5", False),
    ("10.0.0.0/8,!10.0.0.5", "10.0.0.6", True),
    ("!10.0.0.0/24,*", "10.0.0.77", False),
    ("!10.0.0.0/24,*", "10.0.1.77", True),
    ("!2001:db8::/32,*", "2001:db8::1", False),
    # a negation alone allows nothing (sshd: a list needs a positive match)
    ("!10.0.0.5", "10.0.0.6", False),
    # wildcards apply to the address text
    ("*", "203.0.113.9", True),
    ("*", "2001:db8::9", True),
    ("192.0.2.*", "192.0.2.44", True),
    ("192.0.2.*", "192.0.3.44", False),
    ("10.0.0.?", "10.0.0.7", True),
    ("10.0.0.?", "10.0.0.17", False),
    ("2001:db8::*", "2001:db8::abc", True),
    # IPv4 clients on a dual-stack socket count as their IPv4 address
    ("10.0.0.0/8", "::ffff:10.1.2.3", True),
    ("!10.0.0.5,*", "::ffff:10.0.0.5", False),
    # a block with host bits set voids the whole list, as in sshd
    # ("inconsistent mask length"; cross-checked against sshd in
    # test_trust_lifecycle.py)
    ("127.0.0.1/8", "127.0.0.1", False),
    ("127.0.0.0/8,10.1.2.3/8", "127.0.0.1", False),
    ("10.1.2.3/8,127.0.0.1", "127.0.0.1", False),
    ("2001:db8::1/32", "2001:db8::1", False),
    ("127.0.0.1/32", "127.0.0.1", True),
    # not an address: nothing matches
    ("*", "not-an-address", False),
    ("*", "", False),
])
def test_source_allowed(patterns, address, allowed):
    assert source_allowed(patterns, address) is allowed


def test_source_allowed_never_resolves_host_names(monkeypatch):
    """A host name pattern is compared as text; DNS is never asked (the source controls its reverse DNS)."""
    def no_dns(*args, **kwargs):
        raise AssertionError("DNS was consulted")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "getfqdn"):
        monkeypatch.setattr(socket, name, no_dns)
    assert source_allowed("localhost", "127.0.0.1") is False
    assert source_allowed("*.example.org", "192.0.2.1") is False
    assert source_allowed("localhost,127.0.0.1", "127.0.0.1") is True
    assert source_allowed("!localhost,*", "127.0.0.1") is True


# -- expired (expiry-time=) ----------------------------------------------------------

NOW = datetime(2030, 6, 15, 12, 30, 45, tzinfo=UTC)


@pytest.mark.parametrize("stamp, is_expired", [
    # YYYYMMDD: the start of that day
    ("20300615Z", True),
    ("20300616Z", False),
    ("20300614Z", True),
    # YYYYMMDDHHMM
    ("203006151230Z", True),
    ("203006151231Z", False),
    # YYYYMMDDHHMMSS, to the second; the instant itself has expired
    ("20300615123044Z", True),
    ("20300615123045Z", True),
    ("20300615123046Z", False),
    ("20991231235959Z", False),
    ("19700101000000Z", True),
])
def test_expired_utc_forms(stamp, is_expired):
    assert expired(stamp, NOW) is is_expired


def test_expired_without_z_is_local_time(monkeypatch):
    """Without Z the stamp is the server's local time (as sshd reads it); with Z it is UTC."""
    import os
    import time

    monkeypatch.setenv("TZ", "Etc/GMT-3")  # POSIX sign: three hours ahead of UTC
    time.tzset()
    try:
        # 14:00 local = 11:00 UTC: past at 12:30 UTC, while 14:00Z is still ahead.
        assert expired("203006151400", NOW) is True
        assert expired("203006151400Z", NOW) is False
        # 16:00 local = 13:00 UTC: still ahead.
        assert expired("20300615160000", NOW) is False
        assert expired("20300615", NOW) is True  # local midnight
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert "TZ" not in os.environ


@pytest.mark.parametrize("stamp", [
    "", "Z", "2030", "2030061", "203006151", "2030061512", "20300615123", "2030061512304",
    "203006151230456", "20300615123045ZZ", "2030-06-15", "2030061512:30", "+20300615", " 20300615",
    "2030061x", "99999999", "20301315", "20300230", "20300615246000", "20300615125960Z",
    "２０３００６１５",  # full-width digits are digits to str.isdigit, not to sshd
    "2030061\u00b2",  # a superscript two, ditto
    "20300615z",  # lower-case z is not UTC
])
def test_malformed_expiry_fails_closed(stamp):
    """Whatever sshd cannot read as a time counts as expired, never as 'no expiry' (and never raises)."""
    assert expired(stamp, NOW) is True
    assert expired(stamp, datetime(1971, 1, 1, tzinfo=UTC)) is True


def test_expired_defaults_to_now():
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y%m%d%H%M%SZ")
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y%m%d%H%M%SZ")
    assert expired(future) is False
    assert expired(past) is True


# -- parse_options ----------------------------------------------------------------

def test_parse_options_flags_and_values():
    assert parse_options("restrict") == {"restrict": ""}
    assert parse_options("restrict,no-pty,command=/bin/true") == {
        "restrict": "", "no-pty": "", "command": "/bin/true"}


def test_parse_options_quoted_commas_and_spaces():
    options = ('restrict,from="10.0.0.1,192.0.2.0/24,!10.0.0.9",expiry-time="20300101Z",'
               'command="/opt/peerkit/bin/peer-shell --config /home/a b/config.yaml site-b"')
    assert parse_options(options) == {
        "restrict": "",
        "from": "10.0.0.1,192.0.2.0/24,!10.0.0.9",
        "expiry-time": "20300101Z",
        "command": "/opt/peerkit/bin/peer-shell --config /home/a b/config.yaml site-b",
    }


def test_parse_options_escaped_quote_equals_and_case():
    parsed = parse_options(r'COMMAND="echo \"a,b\" x=y",Environment="A=B=C",No-Pty')
    assert parsed == {"command": 'echo "a,b" x=y', "environment": "A=B=C", "no-pty": ""}


def test_parse_options_empty():
    assert parse_options("") == {}


# -- find_grant ----------------------------------------------------------------------

@pytest.fixture
def alpha_beta(tmp_path) -> tuple[Config, Config]:
    """alpha with beta's token paired (beta may call alpha)."""
    alpha = make_instance(tmp_path / "alpha", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    return alpha, beta


def beta_b64(beta: Config) -> str:
    return read_identity(beta.ssh.identity).b64


def set_lines(cfg: Config, *lines: str) -> None:
    cfg.ssh.authorized_keys.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def line_for(alpha: Config, beta: Config, *extra: str, peer: str = "beta") -> str:
    return authkeys.render_line(peer, read_identity(beta.ssh.identity), alpha.peer_shell, alpha.path,
                                tuple(extra))


def test_find_grant_for_the_paired_key(alpha_beta):
    alpha, beta = alpha_beta
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7") == (Grant("beta", str(alpha.path)), "ok")


def test_find_grant_unknown_key(alpha_beta, tmp_path):
    alpha, _ = alpha_beta
    other = make_instance(tmp_path / "other", "other")
    assert find_grant(alpha, beta_b64(other), "192.0.2.7") == (None, "key not authorized")
    set_lines(alpha)  # an empty file
    assert find_grant(alpha, beta_b64(other), "192.0.2.7") == (None, "key not authorized")
    alpha.ssh.authorized_keys.unlink()  # no file at all
    assert find_grant(alpha, beta_b64(other), "192.0.2.7") == (None, "key not authorized")


def test_find_grant_honours_from(alpha_beta):
    alpha, beta = alpha_beta
    set_lines(alpha, line_for(alpha, beta, 'from="10.0.0.0/8,!10.0.0.5"'))
    assert find_grant(alpha, beta_b64(beta), "10.1.1.1")[1] == "ok"
    assert find_grant(alpha, beta_b64(beta), "10.0.0.5") == (None, "source address not allowed by from=")
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7") == (None, "source address not allowed by from=")
    assert find_grant(alpha, beta_b64(beta), "2001:db8::7") == (None, "source address not allowed by from=")


def test_find_grant_honours_expiry_time(alpha_beta):
    alpha, beta = alpha_beta
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y%m%d%H%M%S")
    past = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y%m%d%H%M%S")
    set_lines(alpha, line_for(alpha, beta, f'expiry-time="{future}Z"'))
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7")[1] == "ok"
    for stamp in (f"{past}Z", "20300230Z", "soon"):
        set_lines(alpha, line_for(alpha, beta, f'expiry-time="{stamp}"'))
        assert find_grant(alpha, beta_b64(beta), "192.0.2.7") == (None, "key expired (expiry-time=)"), stamp


def test_from_is_checked_before_expiry(alpha_beta):
    alpha, beta = alpha_beta
    set_lines(alpha, line_for(alpha, beta, 'from="10.0.0.1"', 'expiry-time="20000101Z"'))
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7")[1] == "source address not allowed by from="
    assert find_grant(alpha, beta_b64(beta), "10.0.0.1")[1] == "key expired (expiry-time=)"


def test_a_foreign_line_for_the_same_key_is_not_a_grant(alpha_beta):
    """Only peerkit's lines (comment peerkit:<name>) grant anything; another tool's line for the key does not."""
    alpha, beta = alpha_beta
    key = read_identity(beta.ssh.identity)
    foreign = [f"{key.kind} {key.b64} beta@laptop",
               f'command="{alpha.peer_shell} --config {alpha.path} beta" {key.kind} {key.b64} beta@laptop',
               f"restrict {key.kind} {key.b64}",
               f"{key.kind} {key.b64} peerkit-beta"]
    for line in foreign:
        set_lines(alpha, line)
        assert find_grant(alpha, key.b64, "192.0.2.7") == (None, "key not authorized"), line
    # peerkit's own line still grants, wherever it is in the file.
    set_lines(alpha, *foreign, line_for(alpha, beta))
    assert find_grant(alpha, key.b64, "192.0.2.7")[1] == "ok"


@pytest.mark.parametrize("command", [
    None,  # no forced command at all
    "/bin/sh",
    "/bin/sh -c id",
    "{peer_shell} --config {config}",  # no peer name
    "{peer_shell} --config {config} beta extra",
    "{peer_shell} --config {config} gamma",  # another peer's name
    "{peer_shell} --conf {config} beta",
    "{peer_shell}  --config {config} beta",  # two spaces
    "/usr/bin/env --config {config} beta",  # peer-shell's shape, another program
    "/opt/wrapper --config {config} beta",  # a wrapper around peer-shell: not ours to skip
])
def test_a_peerkit_line_whose_command_is_not_peer_shell_is_refused(alpha_beta, command):
    alpha, beta = alpha_beta
    key = read_identity(beta.ssh.identity)
    options = "restrict"
    if command is not None:
        options += ',command="' + command.format(peer_shell=alpha.peer_shell, config=alpha.path) + '"'
    set_lines(alpha, f"{options} {key.kind} {key.b64} peerkit:beta")
    assert find_grant(alpha, key.b64, "192.0.2.7") == (None, "key line has no peer-shell forced command")


def test_the_grant_names_the_config_of_the_key_line(alpha_beta, tmp_path):
    """The grant carries the --config path written in the line (peer-shell reads that one), and the peer."""
    alpha, beta = alpha_beta
    other_config = tmp_path / "elsewhere" / "config.yaml"
    key = read_identity(beta.ssh.identity)
    set_lines(alpha, f'restrict,command="{PEER_SHELL} --config {other_config} beta" {key.kind} {key.b64} peerkit:beta')
    assert find_grant(alpha, key.b64, "192.0.2.7") == (Grant("beta", str(other_config)), "ok")


def test_find_grant_reads_the_file_afresh(alpha_beta):
    """Unpairing takes effect on the next login: nothing is cached."""
    alpha, beta = alpha_beta
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7")[1] == "ok"
    pairing.unpair(alpha, "beta")
    assert find_grant(alpha, beta_b64(beta), "192.0.2.7") == (None, "key not authorized")
    assert Path(alpha.ssh.authorized_keys).exists()


# -- peer-shell in-process, as serve runs it ---------------------------------------------

def test_a_client_gone_mid_stream_is_audited_as_disconnected(alpha_beta):
    """serve hands peer-shell a socket; when the client goes, splice() into it fails with ECONNRESET.

    Regression: only EPIPE was taken for a client that went away, so the
    stream's audit line was lost.
    """
    import os
    import threading

    from peerkit import audit, shell

    alpha, _ = alpha_beta
    app = alpha.apps_dir / "big"
    app.mkdir(parents=True)
    (app / "blob").write_bytes(os.urandom(4 << 20))
    ours, theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair()
    stdin_r, stdin_w = os.pipe()
    os.close(stdin_w)
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(shell.serve(
        str(alpha.path), "beta", "stream-app big", {"SSH_CONNECTION": "192.0.2.7 50123 192.0.2.1 22"},
        stdin_r, theirs.fileno(), err_theirs.fileno())))
    worker.start()
    try:
        # The sender fills the socket and blocks in splice(); then the client is gone.
        import time
        time.sleep(0.5)
        ours.close()
        worker.join(30)
        assert not worker.is_alive()
    finally:
        for sock in (theirs, err_ours, err_theirs):
            sock.close()
        os.close(stdin_r)
    assert result == [1]
    event = audit.read_events(alpha.audit_log)[-1]
    assert (event["verb"], event["slug"], event["outcome"]) == ("stream-app", "big", "disconnected")
    assert 0 < event["bytes"] < 4 << 20
    assert event["client"] == "192.0.2.7"


# -- the server in-process: a real asyncssh client and server on loopback --------------------

async def _serving(alpha: Config, beta: Config):
    """Start alpha's server on a free port and point beta's record of alpha at it."""
    from peerkit import server
    from peerkit.state import PeerStore

    acceptor = await server.start(alpha, listen="127.0.0.1", port=0)
    with PeerStore(beta.db_path) as store:
        peer = store.get("alpha")
        peer.config.update(host="127.0.0.1", port=acceptor.get_port())
        store.put(peer)
    return acceptor


@pytest.fixture
def both_ways(alpha_beta) -> tuple[Config, Config]:
    alpha, beta = alpha_beta
    pairing.pair(beta, pairing.our_token(alpha)[0])
    return alpha, beta


def test_a_ping_is_answered_in_the_event_loop_and_nothing_asks_for_our_host_name(both_ways, monkeypatch):
    """No worker thread, no thread pool, no DNS: the ping, the options of both sides, the login."""
    import asyncio
    import threading

    from peerkit import audit, client

    alpha, beta = both_ways
    (alpha.apps_dir / "wiki").mkdir(parents=True)

    def no_dns(*args: object) -> str:
        raise AssertionError("looked up a host name")

    monkeypatch.setattr(socket, "getfqdn", no_dns)

    async def run() -> tuple[dict, set, set, dict]:
        acceptor = await _serving(alpha, beta)
        try:
            before = set(threading.enumerate())
            answer = await client.ping_peer(beta, "alpha")
            after_ping = set(threading.enumerate())
            # Other verbs still run in worker threads, with the same caches.
            with client.PeerStore(beta.db_path) as store:
                conn = await client.connect(beta, store.get("alpha"), store)
            async with conn:
                listing = await client.list_apps(conn)
            return answer, before, after_ping, listing
        finally:
            acceptor.close()
            await acceptor.wait_closed()

    answer, before, after_ping, listing = asyncio.run(run())
    assert answer["remote_name"] == "alpha"
    assert after_ping - before == set()  # asyncssh's own options, or a threaded ping, start the thread pool
    assert [a["slug"] for a in listing["apps"]] == ["wiki"]
    assert [e["verb"] for e in audit.read_events(alpha.audit_log) if e.get("peer") == "beta"] == ["ping", "list-apps"]


def test_a_ping_that_finds_peers_db_locked_waits_in_a_worker_thread_not_in_the_loop(both_ways):
    import asyncio
    import sqlite3

    from peerkit import client

    alpha, beta = both_ways
    writer = sqlite3.connect(alpha.db_path, isolation_level=None, check_same_thread=False)

    async def run() -> tuple[dict, float, int]:
        acceptor = await _serving(alpha, beta)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        try:
            writer.execute("BEGIN EXCLUSIVE")
            loop = asyncio.get_running_loop()
            loop.call_later(0.5, writer.execute, "ROLLBACK")
            tick = asyncio.ensure_future(ticker())
            started = loop.time()
            answer = await client.ping_peer(beta, "alpha")
            tick.cancel()
            return answer, loop.time() - started, ticks
        finally:
            acceptor.close()
            await acceptor.wait_closed()

    try:
        answer, elapsed, ticks = asyncio.run(run())
    finally:
        writer.close()
    assert answer["remote_name"] == "alpha"  # answered, not refused: it waited for the writer
    assert elapsed >= 0.45
    assert ticks >= 20  # and the event loop went on meanwhile
