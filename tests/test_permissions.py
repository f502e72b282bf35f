"""peerkit.permissions: allow/deny, from= sources and expiry, on real instances in temp dirs."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from peerkit import pairing
from peerkit.authkeys import parse_line, render_line
from peerkit.config import Config
from peerkit.errors import BadPermission, BadSlug, NoSuchPeer
from peerkit.identity import read_identity
from peerkit.permissions import change, describe, parse_expiry, parse_source
from peerkit.state import DEFAULT_PERMISSIONS, PeerStore
from tests.instances import make_instance

PEER_SHELL = Path(sys.executable).parent / "peer-shell"
FOREIGN = (
    "# keys managed by hand\r\n"
    'command="/usr/bin/rrsync -ro /srv/",no-pty ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@nas\n'
    "\n"
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF9hbGljZV9sYXB0b3Bfa2V5X2Zvcl90ZXN0cw admin@laptop\n"
)
UTC = timezone.utc


def token_of(cfg: Config) -> str:
    return pairing.our_token(cfg)[0]


def row(cfg: Config, name: str = "beta"):
    with PeerStore(cfg.db_path) as store:
        return store.get(name)


def ak_text(cfg: Config) -> str:
    # Bytes, decoded: read_text() would turn the foreign line's CRLF into LF.
    return cfg.ssh.authorized_keys.read_bytes().decode()


def key_line(cfg: Config, name: str = "beta") -> str:
    [line] = [l for l in cfg.ssh.authorized_keys.read_text().splitlines() if l.endswith(f" peerkit:{name}")]
    return line


@pytest.fixture
def alpha(tmp_path) -> Config:
    return make_instance(tmp_path / "alpha", "alpha")


@pytest.fixture
def beta(tmp_path) -> Config:
    return make_instance(tmp_path / "beta", "beta")


@pytest.fixture
def paired(alpha, beta) -> Config:
    """alpha, with beta paired on it (beta may call alpha), next to foreign key lines."""
    alpha.ssh.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    alpha.ssh.authorized_keys.write_text(FOREIGN)
    pairing.pair(alpha, token_of(beta))
    return alpha


# -- allow / deny semantics --------------------------------------------------------

A, D = True, False  # allow, deny
SEMANTICS = [
    # (steps: (allow?, change kwargs)), expected permissions after the last step
    ("deny one app",
     [(D, {"apps": ("wiki",)})],
     {"apps": "all", "deny_apps": ["wiki"], "push": False, "from": []}),
    ("deny two apps, kept sorted",
     [(D, {"apps": ("wiki", "blog")})],
     {"apps": "all", "deny_apps": ["blog", "wiki"], "push": False, "from": []}),
    ("deny then allow again",
     [(D, {"apps": ("wiki", "blog")}), (A, {"apps": ("wiki",)})],
     {"apps": "all", "deny_apps": ["blog"], "push": False, "from": []}),
    ("deny every app",
     [(D, {"all_apps": True})],
     {"apps": [], "deny_apps": [], "push": False, "from": []}),
    ("deny every app clears the exceptions",
     [(D, {"apps": ("wiki",)}), (D, {"all_apps": True})],
     {"apps": [], "deny_apps": [], "push": False, "from": []}),
    ("explicit list",
     [(D, {"all_apps": True}), (A, {"apps": ("wiki", "blog")})],
     {"apps": ["blog", "wiki"], "deny_apps": [], "push": False, "from": []}),
    ("explicit list, one withdrawn",
     [(D, {"all_apps": True}), (A, {"apps": ("wiki", "blog")}), (D, {"apps": ("wiki",)})],
     {"apps": ["blog"], "deny_apps": [], "push": False, "from": []}),
    ("allow all apps again clears exceptions",
     [(D, {"apps": ("wiki",)}), (A, {"all_apps": True})],
     {"apps": "all", "deny_apps": [], "push": False, "from": []}),
    ("list back to all",
     [(D, {"all_apps": True}), (A, {"apps": ("wiki",)}), (A, {"all_apps": True})],
     {"apps": "all", "deny_apps": [], "push": False, "from": []}),
    ("push on",
     [(A, {"push": True})],
     {"apps": "all", "deny_apps": [], "push": True, "from": []}),
    ("push on then off",
     [(A, {"push": True}), (D, {"push": True})],
     {"apps": "all", "deny_apps": [], "push": False, "from": []}),
    ("one source",
     [(A, {"sources": ("192.0.2.7",)})],
     {"apps": "all", "deny_apps": [], "push": False, "from": ["192.0.2.7"]}),
    ("sources accumulate, normalised and sorted",
     [(A, {"sources": ("198.51.100.9/24", "192.0.2.7/32")}), (A, {"sources": ("2001:db8::1/64",)})],
     {"apps": "all", "deny_apps": [], "push": False,
      "from": ["192.0.2.7", "198.51.100.0/24", "2001:db8::/64"]}),
    ("a source removed",
     [(A, {"sources": ("192.0.2.7", "203.0.113.0/24")}), (D, {"sources": ("192.0.2.7",)})],
     {"apps": "all", "deny_apps": [], "push": False, "from": ["203.0.113.0/24"]}),
    ("'any' lifts the restriction",
     [(A, {"sources": ("192.0.2.7", "203.0.113.0/24")}), (A, {"sources": ("any",)})],
     {"apps": "all", "deny_apps": [], "push": False, "from": []}),
    ("several kinds in one call",
     [(D, {"apps": ("wiki",), "push": True, "all_apps": False}), (A, {"push": True, "sources": ("10.1.2.3",)})],
     {"apps": "all", "deny_apps": ["wiki"], "push": True, "from": ["10.1.2.3"]}),
]


@pytest.mark.parametrize("steps,expected", [(s, e) for _, s, e in SEMANTICS], ids=[n for n, _, _ in SEMANTICS])
def test_allow_deny_semantics(paired, steps, expected):
    assert row(paired).permissions == DEFAULT_PERMISSIONS
    for allow, kwargs in steps:
        updated = change(paired, "beta", allow=allow, **kwargs)
    assert updated.permissions == expected
    stored = row(paired)
    assert stored.permissions == expected
    for slug in ("wiki", "blog", "other"):
        visible = slug not in expected["deny_apps"] and (expected["apps"] == "all" or slug in expected["apps"])
        assert stored.may_see(slug) is visible, slug
    assert stored.may_push is expected["push"]


def test_describe(paired):
    assert describe(row(paired)) == "all apps; no push"
    change(paired, "beta", allow=False, apps=("wiki",))
    change(paired, "beta", allow=True, push=True, sources=("192.0.2.7", "10.0.0.0/8"))
    assert describe(row(paired)) == "all apps except wiki; push; from 10.0.0.0/8, 192.0.2.7"
    change(paired, "beta", allow=False, all_apps=True)
    assert describe(row(paired)).startswith("no apps; push")


@pytest.mark.parametrize("allow,kwargs,message", [
    (False, {"sources": ("192.0.2.7",)}, "no source restriction"),
    (True, {"sources": ("any", "192.0.2.7")}, "alone"),
    (True, {"sources": ("example.com",)}, "not an IP address"),
    (True, {"sources": ("*.example.com",)}, "not an IP address"),
    (True, {"sources": ("localhost",)}, "not an IP address"),
    (True, {"sources": ("10.0.0.0/33",)}, "not an IP address"),
    (True, {"sources": ("300.1.2.3",)}, "not an IP address"),
    (True, {"sources": ("192.0.2.7,10.0.0.1",)}, "not an IP address"),  # no smuggling a list into from=
    (True, {"sources": ('192.0.2.7"',)}, "not an IP address"),
    (True, {"sources": ("",)}, "not an IP address"),
    (False, {"sources": ("any",)}, "not an IP address"),
    (True, {}, "nothing to change"),
    (False, {}, "nothing to change"),
    (True, {"apps": ()}, "nothing to change"),
])
def test_refused_changes_change_nothing(paired, allow, kwargs, message):
    before_file = paired.ssh.authorized_keys.read_bytes()
    before_row = row(paired)
    with pytest.raises(BadPermission, match=message):
        change(paired, "beta", allow=allow, **kwargs)
    assert paired.ssh.authorized_keys.read_bytes() == before_file
    assert row(paired) == before_row


def test_removing_the_last_source_is_refused(paired):
    change(paired, "beta", allow=True, sources=("192.0.2.7", "192.0.2.8"))
    change(paired, "beta", allow=False, sources=("192.0.2.8",))
    before_file = paired.ssh.authorized_keys.read_bytes()
    with pytest.raises(BadPermission, match="no allowed source"):
        change(paired, "beta", allow=False, sources=("192.0.2.7",))
    # Removing every listed source at once is the same thing.
    change(paired, "beta", allow=True, sources=("192.0.2.8",))
    with pytest.raises(BadPermission, match="no allowed source"):
        change(paired, "beta", allow=False, sources=("192.0.2.7", "192.0.2.8"))
    assert row(paired).permissions["from"] == ["192.0.2.7", "192.0.2.8"]
    assert 'from="192.0.2.7,192.0.2.8"' in key_line(paired)
    assert before_file != paired.ssh.authorized_keys.read_bytes()  # the allow in between did write


@pytest.mark.parametrize("slug", ["Wiki", "../etc", "-rf", "a b", "wiki;id", "", "x" * 64, "wïki"])
def test_bad_slug_is_refused(paired, slug):
    before = paired.ssh.authorized_keys.read_bytes()
    for allow in (True, False):
        with pytest.raises(BadSlug):
            change(paired, "beta", allow=allow, apps=("wiki", slug))
    assert paired.ssh.authorized_keys.read_bytes() == before
    assert row(paired).permissions == DEFAULT_PERMISSIONS


def test_unknown_peer(paired):
    with pytest.raises(NoSuchPeer):
        change(paired, "gamma", allow=True, push=True)


def test_repeating_a_grant_leaves_the_file_alone(paired):
    change(paired, "beta", allow=True, sources=("192.0.2.7",))
    before = paired.ssh.authorized_keys.read_bytes()
    mtime = paired.ssh.authorized_keys.stat().st_mtime_ns
    updated = change(paired, "beta", allow=True, sources=("192.0.2.7/32",))
    assert updated.permissions["from"] == ["192.0.2.7"]
    assert paired.ssh.authorized_keys.read_bytes() == before
    assert paired.ssh.authorized_keys.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.7", "192.0.2.7"),
    ("192.0.2.7/32", "192.0.2.7"),
    ("192.0.2.7/24", "192.0.2.0/24"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:DB8:0:0::1/128", "2001:db8::1"),
    ("2001:db8::1/64", "2001:db8::/64"),
])
def test_parse_source(text, expected):
    assert parse_source(text) == expected


# -- the key line ---------------------------------------------------------------

def test_from_goes_into_the_key_line_and_nothing_else_changes(paired, beta):
    before = ak_text(paired)
    old_line = key_line(paired)
    assert old_line.startswith('restrict,command="')

    change(paired, "beta", allow=True, sources=("203.0.113.0/24", "192.0.2.7"))
    after = ak_text(paired)
    new_line = key_line(paired)
    assert new_line == old_line.replace("restrict,", 'restrict,from="192.0.2.7,203.0.113.0/24",', 1)
    assert after == before.replace(old_line, new_line)
    assert after.startswith(FOREIGN)
    key = read_identity(beta.ssh.identity)
    assert new_line == render_line("beta", key, paired.peer_shell, paired.path,
                                   ('from="192.0.2.7,203.0.113.0/24"',))
    assert parse_line(new_line).options == (
        f'restrict,from="192.0.2.7,203.0.113.0/24",command="{PEER_SHELL} --config {paired.path} beta"')

    # Apps and push are peer-shell's business: the line does not change.
    change(paired, "beta", allow=False, apps=("wiki",), push=True)
    change(paired, "beta", allow=True, push=True)
    assert ak_text(paired) == after

    change(paired, "beta", allow=True, sources=("any",))
    assert ak_text(paired) == before


def test_permissions_survive_in_the_line_with_expiry(alpha, beta):
    when = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    pairing.pair(alpha, token_of(beta), expires_at=when)
    change(alpha, "beta", allow=True, sources=("192.0.2.7",))
    line = key_line(alpha)
    assert line.startswith('restrict,from="192.0.2.7",expiry-time="20310203040506Z",command="')
    assert row(alpha).expires_at == "2031-02-03T04:05:06+00:00"


# -- expiry ---------------------------------------------------------------------

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("expires,expected", [
    ("2030-06-01", datetime(2030, 6, 1, tzinfo=UTC)),
    ("2030-01-02", datetime(2030, 1, 2, tzinfo=UTC)),
    ("2030-06-01T08:30", datetime(2030, 6, 1, 8, 30, tzinfo=UTC)),
    ("2030-06-01 08:30:15", datetime(2030, 6, 1, 8, 30, 15, tzinfo=UTC)),
    ("2030-06-01T08:30:15Z", datetime(2030, 6, 1, 8, 30, 15, tzinfo=UTC)),
    ("2030-06-01T08:30:15+00:00", datetime(2030, 6, 1, 8, 30, 15, tzinfo=UTC)),
    ("2030-06-01T08:30+02:00", datetime(2030, 6, 1, 6, 30, tzinfo=UTC)),
    ("2030-06-01T23:30-05:00", datetime(2030, 6, 2, 4, 30, tzinfo=UTC)),
    ("2030-06-01T08:30:15.987654Z", datetime(2030, 6, 1, 8, 30, 15, tzinfo=UTC)),
])
def test_parse_expiry_dates_and_times(expires, expected):
    got = parse_expiry(expires, None, now=NOW)
    assert got == expected
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0) and got.microsecond == 0


@pytest.mark.parametrize("ttl,span", [
    ("1m", timedelta(minutes=1)), ("30m", timedelta(minutes=30)), ("12h", timedelta(hours=12)),
    ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), ("999999m", timedelta(minutes=999999)),
])
def test_parse_expiry_ttl(ttl, span):
    assert parse_expiry(None, ttl, now=NOW) == NOW + span


def test_parse_expiry_ttl_defaults_to_now():
    before = datetime.now(UTC)
    got = parse_expiry(ttl="1h")
    after = datetime.now(UTC)
    assert before.replace(microsecond=0) + timedelta(hours=1) <= got <= after + timedelta(hours=1)


def test_parse_expiry_nothing():
    assert parse_expiry(None, None, now=NOW) is None
    assert parse_expiry("", "", now=NOW) is None


@pytest.mark.parametrize("expires,ttl,message", [
    ("2030-06-01", "7d", "not both"),
    ("2029-12-31", None, "already past"),
    ("2030-01-01", None, "already past"),
    ("2030-01-01T12:00:00Z", None, "already past"),  # exactly now
    ("2030-01-01T13:00+02:00", None, "already past"),  # 11:00 UTC
    ("2020-01-01T00:00", None, "already past"),
    ("tomorrow", None, "--expires"),
    ("2030-13-01", None, "--expires"),
    ("01/06/2030", None, "--expires"),
    (None, "7", "--ttl"),
    (None, "7y", "--ttl"),
    (None, "0d", "--ttl"),
    (None, "-1d", "--ttl"),
    (None, "1.5h", "--ttl"),
    (None, "1 d", "--ttl"),
    (None, "7D", "--ttl"),
    (None, "1234567m", "--ttl"),
])
def test_parse_expiry_refusals(expires, ttl, message):
    with pytest.raises(BadPermission, match=message):
        parse_expiry(expires, ttl, now=NOW)


@pytest.mark.parametrize("when,stamp", [
    (datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC), "20310203040506Z"),
    (datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5, minutes=30))), "20310202223506Z"),
    (datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC), "20991231235959Z"),
])
def test_paired_with_expiry_line_carries_expiry_time(alpha, beta, when, stamp):
    result = pairing.pair(alpha, token_of(beta), expires_at=when)
    assert result.outcome == "added"
    line = key_line(alpha)
    assert line == render_line("beta", read_identity(beta.ssh.identity), alpha.peer_shell, alpha.path,
                               (f'expiry-time="{stamp}"',))
    assert line.count("expiry-time=") == 1
    stored = row(alpha)
    assert datetime.fromisoformat(stored.expires_at) == when
    assert not stored.expired()
    assert stored.expired(when) and stored.expired(when + timedelta(seconds=1))
    assert not stored.expired(when - timedelta(seconds=1))


def test_pair_with_parse_expiry_ttl_round_trip(alpha, beta):
    when = parse_expiry(ttl="2w")
    pairing.pair(alpha, token_of(beta), expires_at=when)
    stamp = when.strftime("%Y%m%d%H%M%S")
    assert f'expiry-time="{stamp}Z"' in key_line(alpha)


def test_pair_without_expiry_has_no_expiry_time(paired):
    assert "expiry-time" not in key_line(paired)
    assert row(paired).expires_at is None and not row(paired).expired()


# -- re-pairing -------------------------------------------------------------------

def test_repairing_the_same_key_keeps_permissions(paired, beta):
    change(paired, "beta", allow=False, apps=("wiki",))
    change(paired, "beta", allow=True, push=True, sources=("192.0.2.7",))
    granted = row(paired).permissions
    line = key_line(paired)

    result = pairing.pair(paired, token_of(beta))
    assert result.outcome == "unchanged"
    assert row(paired).permissions == granted
    assert key_line(paired) == line and 'from="192.0.2.7"' in line

    # --replace with the same key is still a re-pair: nothing is reset.
    pairing.pair(paired, token_of(beta), replace=True)
    assert row(paired).permissions == granted


def test_repairing_without_expiry_keeps_the_old_expiry(paired, beta):
    later = datetime.now(UTC) + timedelta(days=3)
    pairing.pair(paired, token_of(beta), expires_at=later)
    line = key_line(paired)
    assert "expiry-time=" in line
    # Pasting the same token again must not silently lift the expiry.
    result = pairing.pair(paired, token_of(beta))
    assert result.outcome == "unchanged" and key_line(paired) == line
    assert row(paired).expires_at == later.isoformat(timespec="seconds")


def test_replace_with_a_new_key_resets_permissions(paired, tmp_path):
    change(paired, "beta", allow=False, apps=("wiki",))
    change(paired, "beta", allow=True, push=True, sources=("192.0.2.7",))
    new_beta = make_instance(tmp_path / "beta-reinstalled", "beta")

    result = pairing.pair(paired, token_of(new_beta), replace=True)
    assert result.outcome == "replaced"
    stored = row(paired)
    assert stored.permissions == DEFAULT_PERMISSIONS
    assert stored.config["fingerprint"] == read_identity(new_beta.ssh.identity).fingerprint
    line = key_line(paired)
    assert "from=" not in line
    assert line == render_line("beta", read_identity(new_beta.ssh.identity), paired.peer_shell, paired.path)
    assert ak_text(paired) == FOREIGN + line + "\n"
