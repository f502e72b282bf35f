"""The web UI in real headless Chromium, against `peerkit web` for beta and a real alpha.

The tests run in file order, as an operator would: empty page, token, pair,
verify, apps, pulls, unpair.  Each one checks what the page shows and then
the state on disk (authorized_keys, the peer database, the app tree, the
backups).  Every screen is saved as a PNG under test-artifacts/web/.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from peerkit.install import app_lock
from peerkit.state import PeerStore
from tests import trees

PEER = "alpha-site"  # the override name the pair modal gives alpha


def expect(target):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


@pytest.fixture(scope="module")
def context(playwright_browser, web_server):
    """A browser context that opened the printed address once, so it holds the access cookie."""
    ctx = playwright_browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(30_000)
    page = ctx.new_page()
    page.goto(web_server.url)
    # The token went into an HttpOnly cookie and out of the address bar.
    assert page.url == web_server.base + "/"
    cookies = {c["name"]: c for c in ctx.cookies()}
    cookie = cookies[f"peerkit-web-{web_server.port}"]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    page.close()
    yield ctx
    ctx.close()


class Watch:
    """What a page did that it should not: script errors, CSP violations and browser dialogs (alert)."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, msg) -> None:
        # A refused request (400, 403) is logged by the browser on purpose in some tests;
        # anything else (a CSP violation above all) is a defect.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(msg.text)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def page(context, web_server):
    page = context.new_page()
    watch = Watch(page)
    page.goto(web_server.base + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    page.close()
    assert watch.errors == [], watch.errors
    assert watch.dialogs == [], watch.dialogs


def card(page, name: str):
    return page.locator(f'article.card[data-peer="{name}"]')


def beta_row(beta, name: str):
    with PeerStore(beta.config().db_path) as store:
        return store.get(name)


def key_lines(node, name: str) -> list[str]:
    path = Path(node.config().ssh.authorized_keys)
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if line.endswith(f" peerkit:{name}")]


def backups(beta, app: str) -> list[Path]:
    folder = Path(beta.config().backups_dir) / app
    return sorted(folder.iterdir()) if folder.exists() else []


# -- pairing ----------------------------------------------------------------------------------

def test_empty_state_and_show_token(page, web_instances, shots):
    _, beta = web_instances
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#empty h2")).to_have_text("No peers yet")
    expect(page.locator("#instance")).to_have_text("beta")
    shots(page, "01-empty-state", full_page=True)

    page.get_by_role("button", name="Show my token").click()
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    cli_token = beta.cli("token").stdout.strip()
    expect(page.locator("#token-text")).to_have_value(cli_token)
    expect(dialog.locator(".callout-warn")).to_contain_text("This token is a credential")
    expect(dialog.locator(".callout-warn")).to_be_visible()
    expect(page.locator("#token-fingerprint")).to_have_text(beta.cli_json("token")["fingerprint"])
    shots(page, "02-token-modal")
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_be_hidden()


def test_pair_with_token_and_override_name(page, web_instances, shots):
    alpha, beta = web_instances
    # Alpha lets beta in (its operator's half), then beta pairs alpha's token on the page.
    alpha.cli("pair", beta.cli("token").stdout.strip())
    alpha_token = alpha.cli("token").stdout.strip()

    page.get_by_role("button", name="Pair with token").first.click()
    dialog = page.locator("#pair-dialog")
    expect(dialog).to_be_visible()
    page.get_by_label("Their pairing token").fill(alpha_token)
    page.get_by_label("Name (optional)").fill(PEER)
    shots(page, "03-pair-modal")
    dialog.get_by_role("button", name="Pair", exact=True).click()

    result = dialog.locator('[data-state="result"]')
    expect(result).to_contain_text(f"Paired with {PEER}")
    code = beta.cli_json("verify", PEER)["verification_code"]
    expect(result.locator(".vcode")).to_have_attribute("data-code", code)
    shots(page, "04-pair-result")
    dialog.get_by_role("button", name="Done").click()

    expect(card(page, PEER)).to_be_visible()
    expect(card(page, PEER).locator(".peer-name")).to_have_text(PEER)
    expect(card(page, PEER).locator(".badge").first).to_have_text("Not contacted yet")
    expect(page.locator("#empty")).to_be_hidden()

    # On disk: one restricted key line with alpha's key, and a record.
    alpha_key = alpha.cli_json("token")
    [line] = key_lines(beta, PEER)
    assert line.startswith("restrict,command=")
    row = beta_row(beta, PEER)
    assert row is not None and row.config["fingerprint"] == alpha_key["fingerprint"]
    assert row.config["port"] == alpha.port and row.config["host"] == "127.0.0.1"
    assert row.status == "new"


def test_pair_refusal_is_in_plain_words(page, web_instances):
    alpha, beta = web_instances
    before = Path(beta.config().ssh.authorized_keys).read_bytes()
    token = alpha.cli("token").stdout.strip()
    mistyped = token[:-1] + ("0" if token[-1] != "0" else "1")
    page.get_by_role("button", name="Pair with token").first.click()
    dialog = page.locator("#pair-dialog")
    page.get_by_label("Their pairing token").fill(mistyped)
    dialog.get_by_role("button", name="Pair", exact=True).click()
    alert = dialog.locator('[role="alert"]')
    expect(alert).to_contain_text("Pairing failed.")
    expect(alert).to_contain_text("a character was changed or lost")
    expect(alert.locator(".code")).to_have_text("checksum-mismatch")
    dialog.get_by_role("button", name="Cancel").click()
    assert Path(beta.config().ssh.authorized_keys).read_bytes() == before


def test_card_shows_status_last_seen_permissions_and_expiry(page, web_instances, shots):
    c = card(page, PEER)
    expect(c.locator(".last-seen")).to_have_text("Never")
    expect(c.locator(".expires")).to_have_text("Never")
    expect(c.locator(".permissions")).to_contain_text("All apps")
    expect(c.locator(".permissions")).to_contain_text("No push")
    expect(c.locator(".address")).to_contain_text("@127.0.0.1:")
    c.get_by_role("button", name="Ping").click()
    expect(page.locator("#notice")).to_contain_text(f"{PEER} answered in")
    expect(card(page, PEER).locator(".badge").first).to_have_text("Online")
    expect(card(page, PEER).locator(".last-seen time")).to_contain_text("just now")
    shots(page, "05-card-list", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    shots(page, "05b-card-list-phone", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 860})
    _, beta = web_instances
    assert beta_row(beta, PEER).status == "ok" and beta_row(beta, PEER).last_seen


def test_verify_shows_the_cli_code(page, web_instances, shots):
    _, beta = web_instances
    card(page, PEER).get_by_role("button", name="Verify").click()
    dialog = page.locator("#verify-dialog")
    expect(dialog.locator("h2")).to_have_text(f"Verification code for {PEER}")
    code = beta.cli_json("verify", PEER)["verification_code"]
    expect(dialog.locator(".vcode")).to_have_attribute("data-code", code)
    expect(dialog.locator(".vcode span")).to_have_count(6)
    assert " ".join(dialog.locator(".vcode span").all_inner_texts()) == code
    shots(page, "06-verify")
    dialog.get_by_role("button", name="Done").click()


# -- apps and pulls ---------------------------------------------------------------------------

def open_apps(page):
    c = card(page, PEER)
    c.get_by_role("button", name="List apps").click()
    expect(c.locator("table.apps")).to_be_visible()
    return c


def test_list_apps_shows_the_live_inventory(page, web_instances, shots):
    _, beta = web_instances
    c = open_apps(page)
    listing = beta.cli_json("apps", PEER)
    slugs = [a["slug"] for a in listing["apps"]]
    assert slugs == ["nextcloud", "vaultwarden", "wiki"]
    expect(c.locator("tbody tr")).to_have_count(3)
    assert c.locator("tbody .app-slug").all_inner_texts() == slugs
    expect(c.locator(".drawer-head")).to_contain_text("domain alpha.example")
    expect(c.get_by_role("button", name="Hide apps")).to_have_attribute("aria-expanded", "true")
    for slug in slugs:
        expect(c.get_by_role("button", name=f"Pull {slug} from {PEER}")).to_be_visible()
    shots(page, "07-apps-drawer", full_page=True)
    c.get_by_role("button", name="Hide apps").click()
    expect(c.locator(".drawer")).to_be_hidden()


def start_pull(page, app: str, *, backup: bool = True, rewrite: bool = True):
    c = open_apps(page)
    c.get_by_role("button", name=f"Pull {app} from {PEER}").click()
    dialog = page.locator("#pull-dialog")
    expect(dialog.locator("h2")).to_have_text(f"Pull {app} from {PEER}")
    # Both safety toggles are on by default.
    expect(page.locator("#pull-backup")).to_be_checked()
    expect(page.locator("#pull-rewrite")).to_be_checked()
    if not backup:
        dialog.locator("label.toggle", has_text="Pre-backup").click()
        expect(page.locator("#pull-backup")).not_to_be_checked()
    if not rewrite:
        dialog.locator("label.toggle", has_text="URL rewrite").click()
        expect(page.locator("#pull-rewrite")).not_to_be_checked()
    return dialog


def pull_state(page, web_server, dialog) -> dict:
    job = dialog.get_attribute("data-job")
    response = page.request.get(f"{web_server.base}/api/pulls/{job}")
    assert response.status == 200
    return response.json()


def test_pull_with_both_toggles_on(page, web_instances, web_server, shots):
    alpha, beta = web_instances
    source = alpha.root / "apps" / "nextcloud"
    local = beta.root / "apps" / "nextcloud"
    assert (local / ".env").read_text() != (source / ".env").read_text()
    before = backups(beta, "nextcloud")
    # A slow start hook holds the pull after the transfer, so the screen can be caught mid-way.
    beta.set_hooks(start=["/bin/sleep", "1.5"])
    try:
        dialog = start_pull(page, "nextcloud")
        shots(page, "08-pull-modal")
        dialog.get_by_role("button", name="Start pull").click()
        expect(page.locator("#pull-progress")).to_be_visible()
        expect(page.locator("#pull-stage")).to_have_text("Transferred; verifying, swapping and starting…")
        expect(page.locator("#pull-bytes")).to_contain_text("100%")
        shots(page, "09-pull-in-progress")
        result = page.locator("#pull-result")
        expect(result).to_contain_text(f"Pulled nextcloud from {PEER}", timeout=60_000)
    finally:
        beta.set_hooks(start=[])
    expect(page.locator("#pull-bar")).to_be_visible()
    assert page.locator("#pull-bar").evaluate("bar => bar.value === bar.max")
    assert int(dialog.get_attribute("data-progress-events")) >= 1
    expect(result).to_contain_text("Rewritten in .env, docker-compose.yml")
    shots(page, "10-pull-result")

    state = pull_state(page, web_server, dialog)
    assert state["progress_events"] >= 1 and state["progress"]["stage"] == "transfer"
    assert state["result"]["ok"] is True

    # On disk: a new pre-backup, shown on the page; the tree is alpha's with our domain.
    after = backups(beta, "nextcloud")
    [new] = sorted(set(after) - set(before))
    expect(result.locator("code")).to_have_text(str(new))
    # The rewrite replaces two files in place, which also touches the app directory's mtime.
    rewritten = {".env", "docker-compose.yml", "."}
    got, want = trees.snapshot(local), trees.snapshot(source)
    assert trees.diff({k: v for k, v in got.items() if k not in rewritten},
                      {k: v for k, v in want.items() if k not in rewritten}) == []
    for name in rewritten - {"."}:
        text = (source / name).read_text()
        assert "alpha.example" in text
        assert (local / name).read_text() == text.replace("alpha.example", "beta.example")
    dialog.get_by_role("button", name="Close", exact=True).click()


def test_pull_with_both_toggles_off(page, web_instances, shots):
    alpha, beta = web_instances
    source = alpha.root / "apps" / "nextcloud"
    local = beta.root / "apps" / "nextcloud"
    before = backups(beta, "nextcloud")
    assert before, "the previous test left a pre-backup"
    dialog = start_pull(page, "nextcloud", backup=False, rewrite=False)
    shots(page, "11-pull-modal-toggles-off")
    dialog.get_by_role("button", name="Start pull").click()
    result = page.locator("#pull-result")
    expect(result).to_contain_text(f"Pulled nextcloud from {PEER}", timeout=60_000)
    expect(result).to_contain_text("None: turned off for this pull")
    expect(result).to_contain_text("Kept as they were")
    assert int(dialog.get_attribute("data-progress-events")) >= 1
    shots(page, "12-pull-result-toggles-off")
    dialog.get_by_role("button", name="Close", exact=True).click()
    # On disk: no new backup, and the tree is exactly alpha's (URLs kept).
    assert backups(beta, "nextcloud") == before
    assert trees.diff(trees.snapshot(local), trees.snapshot(source)) == []
    assert "alpha.example" in (local / ".env").read_text()


def test_pull_of_a_busy_app_says_so(page, web_instances, shots):
    _, beta = web_instances
    local = beta.root / "apps" / "wiki"
    assert not local.exists()
    with app_lock(beta.config(), "wiki"):
        dialog = start_pull(page, "wiki")
        dialog.get_by_role("button", name="Start pull").click()
        alert = page.locator("#pull-result [role=alert]")
        expect(alert).to_contain_text("Another peerkit command is busy with this app", timeout=60_000)
        expect(alert.locator(".code")).to_have_text("busy")
        expect(alert).to_contain_text("failed at the Lock stage")
        shots(page, "13-pull-busy")
    dialog.get_by_role("button", name="Close", exact=True).click()
    assert not local.exists()


# -- unpair -----------------------------------------------------------------------------------

def test_unpair_asks_first_then_revokes(page, web_instances, shots):
    _, beta = web_instances
    c = card(page, PEER)
    c.get_by_role("button", name="Unpair").click()
    dialog = page.locator("#unpair-dialog")
    expect(dialog.locator("h2")).to_have_text(f"Unpair {PEER}?")
    expect(dialog).to_contain_text("removed from authorized_keys at once")
    shots(page, "14-unpair-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(card(page, PEER)).to_be_visible()
    assert len(key_lines(beta, PEER)) == 1 and beta_row(beta, PEER) is not None

    card(page, PEER).get_by_role("button", name="Unpair").click()
    dialog.get_by_role("button", name=f"Unpair {PEER}").click()
    expect(card(page, PEER)).to_have_count(0)
    expect(page.locator("#notice")).to_contain_text(f"Unpaired {PEER}")
    expect(page.locator("#empty")).to_be_visible()
    shots(page, "15-after-unpair", full_page=True)
    assert key_lines(beta, PEER) == []
    assert beta_row(beta, PEER) is None


# -- hostile text -----------------------------------------------------------------------------

HOSTILE = '<img src=x onerror="window.__pwned=1;alert(1)"><script>window.__pwned=1</script>'


def test_a_hostile_peer_record_is_shown_as_text(page, web_instances, shots):
    """A record written by something else (an older tool, a hand edit) can hold any text."""
    _, beta = web_instances
    config = {"host": "<b>evil</b>.example", "port": 22, "user": "<i>root</i>", "fingerprint": "SHA256:x",
              "key": "ssh-ed25519 AAAA"}
    with sqlite3.connect(beta.config().db_path) as db:
        db.execute("INSERT INTO peers (name, kind, config_json, status, last_seen, created_at, permissions_json,"
                   " expires_at) VALUES (?, 'direct-ssh-direct', ?, ?, NULL, ?, ?, NULL)",
                   (HOSTILE, json.dumps(config), "<u>ok</u>", "2026-01-01T00:00:00+00:00",
                    json.dumps({"apps": ["<img src=y onerror=alert(2)>"], "deny_apps": [], "push": False,
                                "from": []})))
    try:
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        c = page.locator("article.card").first
        expect(c.locator(".peer-name")).to_have_text(HOSTILE)
        expect(c.locator(".address")).to_have_text("<i>root</i>@<b>evil</b>.example:22")
        expect(c.locator(".badge").first).to_have_text("<u>ok</u>")
        expect(c.locator(".permissions")).to_contain_text("Apps: <img src=y onerror=alert(2)>")
        # Acting on it is refused by the server's own name check, in plain words.
        c.get_by_role("button", name="List apps").click()
        expect(c.locator(".drawer [role=alert] .code")).to_have_text("bad-name")
        shots(page, "16-hostile-record", full_page=True)
        assert page.locator("img, script:not([src]), b, i, u").count() == 0
        assert page.evaluate("window.__pwned") is None
    finally:
        with sqlite3.connect(beta.config().db_path) as db:
            db.execute("DELETE FROM peers WHERE name = ?", (HOSTILE,))
