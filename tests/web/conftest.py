"""Fixtures for the web UI tests: real instances, a real `peerkit web`, real headless Chromium.

* ``web_instances``: alpha and beta, each behind its own `peerkit serve` on a
  free loopback port (as `peerkit demo` wires them); alpha has apps, beta an
  older nextcloud.  Nothing is paired: the tests pair through the page.
* ``web_server``: `peerkit web` for beta, a real subprocess on a free port;
  its first stdout line (``--json``) is the address with the access token.
* ``browser``/``page``: Debian's chromium driven by Playwright.  Without
  chromium or playwright these tests skip, except under ``CI=true`` where
  that is a failure: CI must never go green by skipping.

Screenshots go to ``$PEERKIT_ARTIFACTS`` (default ``test-artifacts/web/``).
"""

from __future__ import annotations

import getpass
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from peerkit import pairing
from peerkit.config import default_peer_shell
from peerkit.demo import Instance, make_sample_apps
from tests.support import ci

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Read at import: the autouse fixture clears PEERKIT_* before each test.
ARTIFACTS = Path(os.environ.get("PEERKIT_ARTIFACTS") or ROOT / "test-artifacts" / "web")


def unavailable(reason: str) -> None:
    ci.unavailable("web UI browser tests (chromium and playwright)", reason)


def child_env(home: Path) -> dict[str, str]:
    """The environment for peerkit processes: ours, without PEERKIT_*, with a throwaway HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERKIT_") and k != "SSH_ORIGINAL_COMMAND"}
    env["HOME"] = str(home)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node(Instance):
    """One peerkit instance of the web tests (the demo's kind), with its `peerkit serve` process."""

    extra: dict = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the real CLI against this instance."""
        proc = subprocess.run([sys.executable, "-m", "peerkit.cli", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=120, env=child_env(self.root / "home"))
        if check and proc.returncode != 0:
            raise AssertionError(f"peerkit {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> dict:
        proc = self.cli("--json", *args, check=False)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def set_hooks(self, **hooks) -> None:
        """Change this instance's hooks (the CLI reads the config afresh on every run)."""
        data = yaml.safe_load(self.config_path.read_text())
        data["hooks"].update(hooks)
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def make_node(root: Path, name: str) -> Node:
    """Write an instance whose every file lives under ``root`` and initialise it."""
    node = Node(name, root, free_port())
    (root / "home").mkdir(parents=True)
    data = {
        "name": name, "domain": node.domain,
        "apps_dir": str(root / "apps"), "backups_dir": str(root / "backups"), "state_dir": str(root / "state"),
        "peer_shell": default_peer_shell(),
        "ssh": {"user": getpass.getuser(), "host": "127.0.0.1", "port": node.port,
                "identity": str(root / "keys" / "peerkit-peer"),
                "authorized_keys": str(root / "authorized_keys"), "host_keys": []},
        "hooks": {"stop": [], "start": [], "post_restore": []},
    }
    node.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    os.chmod(node.config_path, 0o600)
    pairing.init(node.config_path)
    return node


def start_serve(node: Node) -> None:
    """Run `peerkit serve` for ``node`` on its port; wait until it accepts connections."""
    log = open(node.root / "serve.log", "ab")  # noqa: SIM115 - handed to the child
    node.server = subprocess.Popen(
        [sys.executable, "-m", "peerkit.cli", "--config", str(node.config_path), "serve",
         "--listen", "127.0.0.1", "--port", str(node.port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env(node.root / "home"))
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert node.server.poll() is None, (node.root / "serve.log").read_text()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", node.port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"peerkit serve for {node.name} did not start")


def stop_process(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class WebServer:
    """A running `peerkit web`: its process, the address it printed, and its parts."""

    proc: subprocess.Popen
    url: str
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.url.split("?token=", 1)[1]


def start_web(config_path: Path, home: Path, *extra: str) -> WebServer:
    """Start `peerkit web --port 0 --json` and read the address it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "peerkit.cli", "--config", str(config_path), "web",
                             "--port", "0", "--json", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(home))
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else b""
    if not line:
        proc.kill()
        raise AssertionError(f"peerkit web did not start: {proc.stderr.read().decode()}")
    first = json.loads(line)
    assert first["ok"] is True and first["event"] == "listening", first
    return WebServer(proc, first["url"], first["port"])


@pytest.fixture(scope="module")
def web_instances(tmp_path_factory: pytest.TempPathFactory):
    """(alpha, beta): two instances, each behind `peerkit serve`; alpha has three apps."""
    base = tmp_path_factory.mktemp("web")
    alpha, beta = make_node(base / "alpha", "alpha"), make_node(base / "beta", "beta")
    make_sample_apps(alpha.root / "apps", alpha.domain, scale=0.1)
    make_sample_apps(beta.root / "apps", beta.domain, scale=0.05, seed=3)
    for app in ("wiki", "vaultwarden"):
        shutil.rmtree(beta.root / "apps" / app)
    try:
        for node in (alpha, beta):
            start_serve(node)
        yield alpha, beta
    finally:
        for node in (alpha, beta):
            stop_process(node.server)


@pytest.fixture(scope="module")
def web_server(web_instances):
    """`peerkit web` for beta."""
    _, beta = web_instances
    server = start_web(beta.config_path, beta.root / "home")
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="package")
def playwright_browser():
    """Headless Debian chromium, driven by Playwright (never a downloaded browser).

    Package scope: Playwright's sync API runs an event loop in this thread
    while it is open, and tests outside tests/web call asyncio.run().
    """
    problems = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problems.append("the playwright package is not installed (pip install -e .[test])")
    if not os.access(CHROMIUM, os.X_OK):
        problems.append(f"{CHROMIUM} is missing (apt-get install chromium, or bin/setup --test as root)")
    if problems:
        unavailable("; ".join(problems))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Shots:
    """Save a PNG of each screen the tests go through."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, page, name: str, *, full_page: bool = False) -> Path:
        path = self.directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture(scope="session")
def shots() -> Shots:
    return Shots(ARTIFACTS)
