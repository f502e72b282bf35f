"""peerkit demo: two instances on this machine pair and move an app, in one command.

No root and no system sshd: each instance (``alpha`` and ``beta``) lives in a
temporary directory and runs ``peerkit serve`` on a free loopback port.
They exchange tokens, show the same verification code, ``beta`` lists
``alpha``'s apps and pulls one (with a pre-backup of its older copy), and the
demo says what happened and where everything is.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import random
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from . import client, pairing
from .config import Config, default_peer_shell, read_config
from .errors import PeerkitError
from .identity import read_identity
from .install import ProgressFn, Report
from .verify import verification_code

Say = Callable[[str], None]
NAMES = ("alpha", "beta")


@dataclass
class Instance:
    """One demo instance: its directory, config, port and server process."""

    name: str
    root: Path
    port: int
    server: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def domain(self) -> str:
        return f"{self.name}.example"

    def config(self) -> Config:
        return read_config(self.config_path)


@dataclass
class DemoResult:
    """What the demo did, for the closing summary."""

    base: Path
    instances: list[Instance]
    code: str = ""
    report: Report | None = None
    listing: list[dict] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_config(inst: Instance) -> None:
    root = inst.root
    data = {
        "name": inst.name, "domain": inst.domain,
        "apps_dir": str(root / "apps"), "backups_dir": str(root / "backups"), "state_dir": str(root / "state"),
        "peer_shell": default_peer_shell(),
        "ssh": {"user": getpass.getuser(), "host": "127.0.0.1", "port": inst.port,
                "identity": str(root / "keys" / "peerkit-peer"),
                "authorized_keys": str(root / "authorized_keys"), "host_keys": []},
        # No docker here: the demo's apps need no stop or start.
        "hooks": {"stop": [], "start": [], "post_restore": []},
    }
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    inst.config_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.chmod(inst.config_path, 0o600)


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def make_sample_apps(apps: Path, domain: str, *, scale: float = 1.0, seed: int = 7) -> None:
    """Create a few apps with realistic content (deterministic for a seed)."""
    rnd = random.Random(seed)
    cloud = apps / "nextcloud"
    _write(cloud / "docker-compose.yml",
           f"services:\n  app:\n    image: nextcloud:29\n    environment:\n"
           f"      - NEXTCLOUD_TRUSTED_DOMAINS=cloud.{domain}\n    volumes:\n      - ./data:/var/www/html/data\n")
    _write(cloud / ".env", f"OVERWRITEHOST=cloud.{domain}\nOVERWRITEPROTOCOL=https\n", 0o600)
    _write(cloud / "config" / "config.php",
           f"<?php\n$CONFIG = array (\n  'trusted_domains' => array ('cloud.{domain}'),\n"
           f"  'datadirectory' => '/var/www/html/data',\n);\n", 0o640)
    for user in ("ana", "ben"):
        for i in range(int(40 * scale)):
            _write(cloud / "data" / user / "files" / "Documents" / f"notes-{i:03d}.md",
                   f"# Notes {i}\n\n" + " ".join(rnd.choice(("plan", "budget", "trip", "garden", "meeting"))
                                                  for _ in range(200)) + "\n")
        for i in range(int(12 * scale)):
            _write(cloud / "data" / user / "files" / "Photos" / f"IMG_{1000 + i}.jpg",
                   rnd.randbytes(int(1_200_000 * scale)))
    (cloud / "data" / "ana" / "files" / "Shared").mkdir(parents=True, exist_ok=True)
    os.symlink("../../ben/files/Documents", cloud / "data" / "ana" / "files" / "Shared" / "from-ben")
    wiki = apps / "wiki"
    for i in range(int(60 * scale)):
        _write(wiki / "pages" / f"page-{i:03d}.md", f"# Page {i}\n\nSee [[page-{(i + 1) % 60:03d}]].\n")
    (wiki / "data").mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(wiki / "data" / "wiki.db") as db:
        db.execute("CREATE TABLE IF NOT EXISTS revisions (page TEXT, rev INTEGER, body TEXT)")
        db.executemany("INSERT INTO revisions VALUES (?, ?, ?)",
                       [(f"page-{i:03d}", r, f"revision {r}") for i in range(60) for r in range(5)])
    _write(wiki / ".env", f"WIKI_URL=https://wiki.{domain}\n", 0o600)
    vault = apps / "vaultwarden"
    _write(vault / "data" / "db.sqlite3", rnd.randbytes(int(400_000 * scale)), 0o600)
    _write(vault / "data" / "rsa_key.pem", "-----BEGIN PRIVATE KEY-----\n(demo)\n-----END PRIVATE KEY-----\n", 0o600)
    _write(vault / ".env", f"DOMAIN=https://vault.{domain}\n", 0o600)


def _start_server(inst: Instance) -> None:
    log = open(inst.root / "serve.log", "ab")  # noqa: SIM115 - handed to the child
    inst.server = subprocess.Popen(
        [sys.executable, "-m", "peerkit.cli", "--config", str(inst.config_path), "serve",
         "--listen", "127.0.0.1", "--port", str(inst.port)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if inst.server.poll() is not None:
            raise PeerkitError(f"peerkit serve for {inst.name} exited; see {inst.root / 'serve.log'}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", inst.port)) == 0:
                return
        time.sleep(0.05)
    raise PeerkitError(f"peerkit serve for {inst.name} did not start; see {inst.root / 'serve.log'}")


def stop(instances: list[Instance]) -> None:
    """Stop the demo's servers."""
    for inst in instances:
        if inst.server is not None and inst.server.poll() is None:
            inst.server.terminate()
            try:
                inst.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                inst.server.kill()
                inst.server.wait()


def run(base: Path | None, say: Say, progress: ProgressFn | None = None, *, keep: bool = False,
        scale: float = 1.0) -> DemoResult:
    """Run the whole demo; leave the servers running only with ``keep``."""
    base = Path(tempfile.mkdtemp(prefix="peerkit-demo-")) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    instances = [Instance(name, base / name, _free_port()) for name in NAMES]
    alpha, beta = instances
    result = DemoResult(base, instances)
    try:
        say(f"1. Two instances in {base}: alpha on 127.0.0.1:{alpha.port}, beta on 127.0.0.1:{beta.port}")
        for inst in instances:
            _write_config(inst)
            pairing.init(inst.config_path)
        make_sample_apps(alpha.root / "apps", alpha.domain, scale=scale)
        make_sample_apps(beta.root / "apps", beta.domain, scale=scale * 0.25, seed=3)
        for app in ("wiki", "vaultwarden"):
            shutil.rmtree(beta.root / "apps" / app)
        say("   alpha has nextcloud, wiki and vaultwarden; beta has an older, smaller nextcloud")
        for inst in instances:
            _start_server(inst)
        say("2. Each runs `peerkit serve` (an SSH server that only serves peer-shell)")
        tokens = {inst.name: pairing.our_token(inst.config())[0] for inst in instances}
        pairing.pair(beta.config(), tokens["alpha"])
        pairing.pair(alpha.config(), tokens["beta"])
        say("3. They exchanged tokens and paired both ways:")
        say(f"   alpha's token: {tokens['alpha'][:60]}…")
        codes = {inst.name: verification_code(read_identity(inst.config().ssh.identity).fingerprint,
                                              read_identity(other.config().ssh.identity).fingerprint)
                 for inst, other in ((alpha, beta), (beta, alpha))}
        result.code = codes["alpha"]
        same = "the same on both sides" if codes["alpha"] == codes["beta"] else "DIFFERENT (a swapped token!)"
        say(f"   verification code: {codes['alpha']}  ({same})")
        listing = asyncio.run(client.peer_apps(beta.config(), "alpha"))
        result.listing = listing["apps"]
        say("4. beta lists alpha's apps over SSH:")
        for app in listing["apps"]:
            say(f"     {app['slug']:<14} {app['size_kb']:>8,} KiB")
        say("5. beta pulls nextcloud from alpha (pre-backup, staged transfer, atomic swap, URL rewrite):")
        from .pull import pull_app

        result.report = asyncio.run(pull_app(beta.config(), "alpha", "nextcloud", progress=progress))
        return result
    finally:
        if not keep:
            stop(instances)


def try_commands(result: DemoResult, peerkit: str = "peerkit") -> list[list[str]]:
    """Return the commands to try against a kept demo, as argument lists."""
    alpha, beta = result.instances
    on_alpha = [peerkit, "--config", str(alpha.config_path)]
    on_beta = [peerkit, "--config", str(beta.config_path)]
    return [on_beta + ["peers"], on_beta + ["ping", "alpha"], on_beta + ["apps", "alpha"],
            on_beta + ["pull", "alpha", "wiki"], on_alpha + ["allow", "beta", "--push"],
            on_beta + ["push", "alpha", "nextcloud"], on_alpha + ["audit"]]


def summary(result: DemoResult, *, keep: bool, peerkit: str = "peerkit") -> list[str]:
    """Return the closing lines: what happened, where the files are, what to try."""
    alpha, beta = result.instances
    report = result.report
    lines = []
    if report is not None:
        lines.append(f"   pulled {report.files} files ({report.bytes:,} bytes) into {beta.root / 'apps' / 'nextcloud'}")
        lines.append(f"   pre-backup of beta's old copy: {report.backup}")
        lines.append(f"   URLs rewritten alpha.example -> beta.example in: {', '.join(report.rewritten) or 'none'}")
    lines += [
        "Where things are:",
        f"   configs        {alpha.config_path}  {beta.config_path}",
        f"   apps           {alpha.root / 'apps'}  {beta.root / 'apps'}",
        f"   audit log      {alpha.root / 'state' / 'peer-shell.log'}  (every call beta made to alpha)",
        f"   transfer log   {beta.root / 'state' / 'transfers.log'}",
    ]
    if keep:
        pids = " ".join(str(i.server.pid) for i in result.instances if i.server is not None)
        lines.append("The servers are still running. Try, as this user:")
        lines += ["   " + shlex.join(argv) for argv in try_commands(result, peerkit)]
        lines.append(f"Stop them with: kill {pids}")
    else:
        lines.append("The servers are stopped; run `peerkit demo --keep` to try the CLI against them.")
    return lines
