"""Every string the page shows from the CLI is text, never markup: a stand-in CLI answers with HTML.

The real CLI validates peer names, slugs, hosts and domains, so hostile
markup cannot reach the page through pairing; here a stand-in for the CLI
puts it in every field the page renders (peers, apps, domain, ping version,
verification code, token, progress stage, error code and message, stderr
remarks) and the page, served by the real aiohttp app, must show it as
literal text, create no element from it and run none of it.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading

import pytest

HOSTILE = '<img src=x onerror="window.__pwned=1;alert(1)"><script>window.__pwned=1</script><b>bold</b>'

FAKE_CLI = textwrap.dedent('''\
    import json, sys
    HOSTILE = {hostile!r}
    args = sys.argv[1:]
    verb = args[args.index("--json") + 1]
    peer = {{"name": "evil", "kind": "direct-ssh-direct", "host": HOSTILE, "user": HOSTILE, "port": HOSTILE,
             "status": HOSTILE, "last_seen": HOSTILE, "created_at": "2026-01-01T00:00:00+00:00",
             "permissions": {{"apps": [HOSTILE], "deny_apps": [HOSTILE], "push": False, "from": [HOSTILE]}},
             "expires_at": HOSTILE, "authorized": True}}
    out = {{
        "peers": {{"ok": True, "peers": [peer]}},
        "apps": {{"ok": True, "peer": "evil", "domain": HOSTILE,
                  "apps": [{{"slug": HOSTILE, "size_kb": 1}}, {{"slug": "wiki", "size_kb": 2}}]}},
        "ping": {{"ok": True, "peer": "evil", "version": HOSTILE, "rtt_ms": HOSTILE}},
        "verify": {{"ok": True, "peer": "evil", "verification_code": HOSTILE, "our_fingerprint": HOSTILE,
                    "peer_fingerprint": HOSTILE}},
        "token": {{"ok": True, "token": HOSTILE, "format": HOSTILE, "name": HOSTILE, "fingerprint": HOSTILE}},
        "unpair": {{"ok": False, "error": HOSTILE, "message": HOSTILE}},
        "pull": {{"ok": False, "event": "result", "error": HOSTILE, "message": HOSTILE, "app": HOSTILE,
                  "stages": [{{"name": HOSTILE, "outcome": "failed", "detail": HOSTILE}}]}},
    }}[verb]
    if verb == "pull":
        print(json.dumps({{"event": "progress", "stage": HOSTILE, "bytes": 5, "total": 10}}), flush=True)
    print(HOSTILE, file=sys.stderr)
    print(json.dumps(out))
    sys.exit(0 if out["ok"] else 1)
''')


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    """The real web app on a free port, running a stand-in CLI; its instance name is hostile too."""
    from peerkit.web.app import serve

    base = tmp_path_factory.mktemp("hostile")
    script = base / "fake_cli.py"
    script.write_text(FAKE_CLI.format(hostile=HOSTILE))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    found: dict = {}

    def ready(url: str, _address: str, port: int) -> None:
        found.update(url=url, port=port)
        started.set()

    def run() -> None:
        try:
            loop.run_until_complete(serve(base / "config.yaml", HOSTILE, port=0, ready=ready, stop=stop,
                                          command=[sys.executable, str(script)]))
        except BaseException as exc:  # noqa: BLE001 - reported by the fixture below
            found["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30) and "error" not in found, found
    yield found["url"], found["port"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


@pytest.fixture
def page(playwright_browser, fake_site):
    url, port = fake_site
    context = playwright_browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    # Nothing ran: no alert, no flag, no element made of the text.
    assert dialogs == [] and errors == []
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img, b, script:not([src])").count() == 0
    context.close()


def expect(target):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(target)


def test_peers_apps_ping_and_verify_show_markup_as_text(page, shots):
    expect(page.locator("#instance")).to_have_text(HOSTILE)
    card = page.locator('article.card[data-peer="evil"]')
    expect(card.locator(".address")).to_have_text(f"{HOSTILE}@{HOSTILE}:{HOSTILE}")
    expect(card.locator(".badge").first).to_have_text(HOSTILE)
    expect(card.locator(".last-seen")).to_have_text(HOSTILE)
    expect(card.locator(".permissions")).to_contain_text(f"Apps: {HOSTILE}")
    expect(card.locator(".permissions")).to_contain_text(f"Except {HOSTILE}")

    card.get_by_role("button", name="List apps").click()
    expect(card.locator("tbody .app-slug").first).to_have_text(HOSTILE)
    expect(card.locator(".drawer-head")).to_contain_text(f"domain {HOSTILE}")

    card.get_by_role("button", name="Ping").click()
    expect(page.locator("#notice")).to_contain_text(f"(peerkit {HOSTILE})")
    shots(page, "17-hostile-cli-output", full_page=True)

    page.locator('article.card[data-peer="evil"]').get_by_role("button", name="Verify").click()
    dialog = page.locator("#verify-dialog")
    expect(dialog.locator(".vcode")).to_have_attribute("data-code", HOSTILE)
    expect(dialog.locator(".kv")).to_contain_text(HOSTILE)
    dialog.get_by_role("button", name="Done").click()


def test_token_and_unpair_errors_show_markup_as_text(page):
    page.get_by_role("button", name="Show my token").click()
    expect(page.locator("#token-text")).to_have_value(HOSTILE)
    expect(page.locator("#token-fingerprint")).to_have_text(HOSTILE)
    page.locator("#token-dialog").get_by_role("button", name="Done").click()

    page.locator('article.card[data-peer="evil"]').get_by_role("button", name="Unpair").click()
    page.get_by_role("button", name="Unpair evil").click()
    alert = page.locator("#unpair-dialog [role=alert]")
    expect(alert.locator(".code")).to_have_text(HOSTILE)
    expect(alert).to_contain_text("peerkit reported a problem.")
    expect(alert.locator(".notes")).to_have_text(HOSTILE)


def test_pull_progress_and_failure_show_markup_as_text(page, shots):
    card = page.locator('article.card[data-peer="evil"]')
    card.get_by_role("button", name="List apps").click()
    # A hostile slug never reaches the CLI: the server refuses it.
    card.locator("tbody tr").first.get_by_role("button").click()
    expect(page.locator("#pull-title")).to_have_text(f"Pull {HOSTILE} from evil")
    page.get_by_role("button", name="Start pull").click()
    expect(page.locator("#pull-result [role=alert] .code")).to_have_text("bad-slug")
    page.locator("#pull-dialog").get_by_role("button", name="Close", exact=True).click()

    card.get_by_role("button", name="Pull wiki from evil").click()
    page.get_by_role("button", name="Start pull").click()
    alert = page.locator("#pull-result [role=alert]")
    expect(alert.locator(".code")).to_have_text(HOSTILE)
    expect(alert).to_contain_text(f"failed at the {HOSTILE} stage")
    expect(page.locator("#pull-result .stages")).to_contain_text(HOSTILE)
    expect(page.locator("#pull-bytes")).to_have_text("5 B of 10 B · 50%")
    shots(page, "18-hostile-pull-failure")
