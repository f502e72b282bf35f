"""Who may use the page: access token, cookie, CSRF, Origin, Host, headers; against a real `peerkit web`."""

from __future__ import annotations

import http.client
import json
import re

import pytest

from peerkit.state import PeerStore
from tests.web.conftest import make_node, start_web, stop_process

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
PAGES = ["/", "/static/app.js", "/static/app.css", "/static/favicon.svg", "/api/session", "/api/peers",
         "/api/token", "/api/peers/gamma/verify"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`peerkit web` for an instance that has paired one peer, gamma (no SSH needed here)."""
    base = tmp_path_factory.mktemp("access")
    beta, gamma = make_node(base / "beta", "beta"), make_node(base / "gamma", "gamma")
    beta.cli("pair", gamma.cli("token").stdout.strip())
    server = start_web(beta.config_path, beta.root / "home")
    yield beta, server
    stop_process(server.proc)


def request(server, method: str, path: str, *, headers: dict | None = None, body: bytes | None = None,
            cookie: str | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["Cookie"] = f"peerkit-web-{server.port}={cookie}"
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def csrf_token(server) -> str:
    page = request(server, "GET", "/", cookie=server.token)
    assert page.status == 200
    match = re.search(rb'<meta name="csrf-token" content="([A-Za-z0-9_-]+)">', page.body)
    assert match
    return match.group(1).decode()


def unpair(server, *, cookie: str | None, headers: dict) -> http.client.HTTPResponse:
    return request(server, "DELETE", "/api/peers/gamma", cookie=cookie, headers=headers)


def gamma_is_paired(beta) -> bool:
    with PeerStore(beta.config().db_path) as store:
        row = store.get("gamma")
    return row is not None and " peerkit:gamma" in (beta.root / "authorized_keys").read_text()


def test_the_printed_address_is_loopback_with_a_long_random_token(site):
    _, server = site
    assert server.url.startswith(f"http://127.0.0.1:{server.port}/?token=")
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", server.token)


@pytest.mark.parametrize("path", PAGES)
def test_without_the_token_everything_is_refused(site, path):
    _, server = site
    response = request(server, "GET", path)
    assert response.status == 403
    assert b"lp-peer" not in response.body and b"gamma" not in response.body
    assert response.getheader("Content-Security-Policy") == CSP


@pytest.mark.parametrize("path", PAGES)
def test_a_wrong_cookie_is_refused(site, path):
    _, server = site
    wrong = server.token[:-1] + ("A" if server.token[-1] != "A" else "B")
    assert request(server, "GET", path, cookie=wrong).status == 403
    assert request(server, "GET", path, cookie="").status == 403


def test_a_wrong_token_in_the_address_is_refused_without_a_cookie(site):
    _, server = site
    response = request(server, "GET", "/?token=" + "A" * 43)
    assert response.status == 403
    assert response.getheader("Set-Cookie") is None


def test_the_token_is_traded_for_a_strict_http_only_cookie(site):
    _, server = site
    response = request(server, "GET", f"//evil.example/?token={server.token}")
    assert response.status == 303
    # Always back to "/": never to a path taken from the request.
    assert response.getheader("Location") == "/"
    cookie = response.getheader("Set-Cookie")
    assert cookie.startswith(f"peerkit-web-{server.port}={server.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie


@pytest.mark.parametrize("path", PAGES)
def test_with_the_cookie_everything_is_served_with_strict_headers(site, path):
    _, server = site
    response = request(server, "GET", path, cookie=server.token)
    assert response.status == 200, response.body
    assert response.getheader("Content-Security-Policy") == CSP
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    assert response.getheader("Referrer-Policy") == "no-referrer"
    assert response.getheader("X-Frame-Options") == "DENY"
    assert response.getheader("Cache-Control") == "no-store"


def test_the_page_has_no_inline_script_or_style(site):
    _, server = site
    html = request(server, "GET", "/", cookie=server.token).body.decode()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert " style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)
    js = request(server, "GET", "/static/app.js", cookie=server.token).body.decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1.nip.io:{port}", "127.0.0.1:1",
                                  "localhost.evil.example:{port}", ""])
def test_a_foreign_host_header_is_refused_even_with_the_cookie(site, host):
    """DNS rebinding: another site's name pointed at 127.0.0.1."""
    _, server = site
    response = request(server, "GET", "/api/token", cookie=server.token,
                       headers={"Host": host.format(port=server.port)})
    assert response.status == 403
    assert b"lp-peer" not in response.body


def test_localhost_is_a_valid_host(site):
    _, server = site
    response = request(server, "GET", "/api/session", cookie=server.token,
                       headers={"Host": f"localhost:{server.port}"})
    assert response.status == 200 and json.loads(response.body)["instance"] == "beta"


@pytest.mark.parametrize("headers", [
    {},
    {"X-CSRF-Token": ""},
    {"X-CSRF-Token": "A" * 43},
], ids=["missing", "empty", "wrong"])
def test_a_state_change_without_the_csrf_token_is_refused_and_changes_nothing(site, headers):
    beta, server = site
    response = unpair(server, cookie=server.token, headers=headers)
    assert response.status == 403
    assert json.loads(response.body)["error"] == "forbidden"
    assert gamma_is_paired(beta)
    response = request(server, "POST", "/api/pair", cookie=server.token,
                       headers={**headers, "Content-Type": "application/json"},
                       body=json.dumps({"token": "lp-peer|v2|x"}).encode())
    assert response.status == 403


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
], ids=["other-site", "null-origin", "other-port", "cross-site", "same-site"])
def test_a_cross_origin_state_change_is_refused_even_with_the_csrf_token(site, headers):
    beta, server = site
    response = unpair(server, cookie=server.token, headers={"X-CSRF-Token": csrf_token(server), **headers})
    assert response.status == 403
    assert gamma_is_paired(beta)


def test_a_state_change_without_the_cookie_is_refused(site):
    beta, server = site
    assert unpair(server, cookie=None, headers={"X-CSRF-Token": csrf_token(server)}).status == 403
    assert gamma_is_paired(beta)


def test_names_are_checked_before_the_cli_runs(site):
    beta, server = site
    headers = {"X-CSRF-Token": csrf_token(server), "Content-Type": "application/json",
               "Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"}
    response = request(server, "POST", "/api/pair", cookie=server.token, headers=headers,
                       body=json.dumps({"token": "lp-peer|v2|x", "name": "<b>x</b>"}).encode())
    assert response.status == 400 and json.loads(response.body)["error"] == "bad-name"
    response = request(server, "POST", "/api/pulls", cookie=server.token, headers=headers,
                       body=json.dumps({"peer": "gamma", "app": "--delete"}).encode())
    assert response.status == 400 and json.loads(response.body)["error"] == "bad-slug"
    response = request(server, "POST", "/api/pulls", cookie=server.token, headers=headers,
                       body=json.dumps({"peer": "gamma", "app": "wiki", "pre_backup": "no"}).encode())
    assert response.status == 400
    response = request(server, "POST", "/api/pair", cookie=server.token, headers=headers,
                       body=json.dumps({"token": "x" * 5000}).encode())
    assert response.status == 400
    response = request(server, "POST", "/api/pair", cookie=server.token, headers=headers,
                       body=b"x" * 200_000)
    assert response.status == 413
    assert gamma_is_paired(beta)


def test_the_same_request_with_every_check_passed_does_change_state(site):
    """The refusals above are the checks' doing: with them satisfied, unpair works."""
    beta, server = site
    headers = {"X-CSRF-Token": csrf_token(server), "Origin": f"http://127.0.0.1:{server.port}",
               "Sec-Fetch-Site": "same-origin"}
    response = unpair(server, cookie=server.token, headers=headers)
    assert response.status == 200
    body = json.loads(response.body)
    assert body["ok"] is True and body["key_removed"] is True and body["row_removed"] is True
    assert not gamma_is_paired(beta)
    response = unpair(server, cookie=server.token, headers=headers)
    assert json.loads(response.body)["error"] == "no-such-peer"
