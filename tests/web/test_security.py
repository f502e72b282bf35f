"""peerkit.web.security: the bind rule, the Host check, the Origin check, secret comparison."""

from __future__ import annotations

import pytest

from peerkit.errors import NotLoopback
from peerkit.web import security


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_need_nothing(address):
    security.check_listen(address, explicit=False)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.10", "2001:db8::1", "example.org"])
def test_other_binds_need_an_explicit_listen(address):
    with pytest.raises(NotLoopback) as info:
        security.check_listen(address, explicit=False)
    assert info.value.code == "not-loopback" and "--listen" in info.value.message
    security.check_listen(address, explicit=True)


@pytest.mark.parametrize("host, listen, ok", [
    ("127.0.0.1:8765", "127.0.0.1", True),
    ("localhost:8765", "127.0.0.1", True),
    ("LOCALHOST:8765", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.1", False),            # no port: not what a browser sends to us
    ("127.0.0.1:8766", "127.0.0.1", False),
    ("127.0.0.2:8765", "127.0.0.1", False),
    ("evil.example:8765", "127.0.0.1", False),    # DNS rebinding
    ("127.0.0.1.nip.io:8765", "127.0.0.1", False),
    ("[::1]:8765", "::1", True),
    ("[::1]:8765", "127.0.0.1", False),
    ("[::1:8765", "::1", False),
    ("192.0.2.10:8765", "192.0.2.10", True),
    ("evil.example:8765", "192.0.2.10", False),
    ("192.0.2.10:8765", "0.0.0.0", True),
    ("[2001:db8::1]:8765", "::", True),
    ("evil.example:8765", "0.0.0.0", False),
    ("admin.example.org:8765", "admin.example.org", True),
    ("", "127.0.0.1", False),
    (None, "127.0.0.1", False),
    ("127.0.0.1:+8765", "127.0.0.1", False),
    ("127.0.0.1:８７６５", "127.0.0.1", False),
])
def test_host_header(host, listen, ok):
    assert security.host_allowed(host, listen, 8765) is ok


@pytest.mark.parametrize("origin, site, ok", [
    (None, None, True),                      # older clients send neither; the CSRF token still guards
    ("http://127.0.0.1:8765", None, True),
    ("http://127.0.0.1:8765", "same-origin", True),
    (None, "same-origin", True),
    ("http://127.0.0.1:9999", None, False),  # another port: same site, other origin
    ("https://127.0.0.1:8765", None, False),
    ("null", None, False),
    ("http://evil.example", None, False),
    (None, "same-site", False),
    (None, "cross-site", False),
    (None, "none", False),
])
def test_origin(origin, site, ok):
    assert security.origin_allowed(origin, site, "127.0.0.1:8765") is ok


def test_secrets_are_long_random_and_compared_exactly():
    a, b = security.new_secret(), security.new_secret()
    assert a != b and len(a) >= 43
    assert security.same_secret(a, a)
    assert not security.same_secret(a[:-1], a)
    assert not security.same_secret(a + "x", a)
    assert not security.same_secret("", a)
    assert not security.same_secret(None, a)
    assert not security.same_secret("é" * 43, a)


def test_every_response_header_is_strict():
    csp = security.HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert security.HEADERS["X-Content-Type-Options"] == "nosniff"
