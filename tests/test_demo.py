"""`peerkit demo`: two instances on this machine pair and move an app, without root or a system sshd.

The demo runs as an unprivileged user, as a newcomer would run it: a
throwaway system user when the tests run as root (tests/support), else the
user running the tests.  Both servers are `peerkit serve` processes the
demo starts; the tests make sure none is left behind (and, with --keep,
stop the ones the demo says it left running, by their pids).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import sshd as harness
from tests.trees import snapshot

BIN = Path(sys.executable).parent
PEERKIT = BIN / "peerkit"
CODE = re.compile(r"[0-9]{5}( [0-9]{5}){5}")


class Runner:
    """Runs commands as the unprivileged demo user; ``home`` is a directory it owns."""

    def __init__(self, home: Path, user: harness.ThrowawayUser | None) -> None:
        self.home = home
        self.user = user

    def env(self) -> dict[str, str]:
        if self.user is not None:
            return self.user.env(extra_path=[BIN])
        return {**{k: v for k, v in os.environ.items() if not k.startswith("PEERKIT_")},
                "HOME": str(self.home), "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin"}

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        if self.user is not None:
            return self.user.run(argv, env=self.env(), cwd=self.home, timeout=timeout, text=True)
        return subprocess.run(argv, env=self.env(), cwd=self.home, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    import shutil

    if os.geteuid() != 0 or not all(shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
                                    for tool in ("useradd", "usermod", "userdel")):
        # Not root (already unprivileged), or no way to make a user: as ourselves.
        home = tmp_path_factory.mktemp("demo-home")
        yield Runner(home, None)
        return
    # As root: a throwaway account, so the demo proves it needs no privilege.
    root = harness.make_root("peerkit-demo-")
    user = harness.ThrowawayUser.create(root)
    try:
        problem = harness.check_runs_as(user, PEERKIT)
        if problem:
            pytest.fail(problem, pytrace=False)
        yield Runner(user.home, user)
    finally:
        user.delete()
        shutil.rmtree(root, ignore_errors=True)


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (to find leftovers, never to kill by name)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def test_demo_runs_without_root_and_stops_its_servers(runner):
    base = runner.home / "demo-run"
    proc = runner.run([str(PEERKIT), "demo", "--small", "--json", "--dir", str(base)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["dir"] == str(base) and result["kept_running"] is False

    # The verification code both sides compute, and the app listing beta got from alpha.
    assert CODE.fullmatch(result["verification_code"])
    assert f"verification code: {result['verification_code']}  (the same on both sides)" in proc.stderr
    assert [app["slug"] for app in result["apps"]] == ["nextcloud", "vaultwarden", "wiki"]
    assert all(isinstance(app["size_kb"], int) and app["size_kb"] > 0 for app in result["apps"])

    # The pull: ok, a pre-backup of beta's older copy, the URLs rewritten.
    pull = result["pull"]
    assert (pull["peer"], pull["app"]) == ("alpha", "nextcloud")
    assert all(stage["outcome"] in ("ok", "skipped") for stage in pull["stages"]), pull["stages"]
    assert [s["name"] for s in pull["stages"]][-1] == "cleanup"
    backup = Path(pull["backup"])
    assert backup.is_file() and backup.is_relative_to(base / "beta" / "backups" / "nextcloud")
    assert sorted(pull["rewritten"]) == [".env", "docker-compose.yml"]

    # beta's nextcloud is alpha's, but for its domain in the rewritten files.
    alpha_tree = snapshot(base / "alpha" / "apps" / "nextcloud")
    beta_tree = snapshot(base / "beta" / "apps" / "nextcloud")
    assert sorted(alpha_tree) == sorted(beta_tree)
    assert len(alpha_tree) > 20 and pull["files"] > 20
    for rel, rec in alpha_tree.items():
        got = beta_tree[rel]
        if rel in pull["rewritten"]:
            text = (base / "alpha" / "apps" / "nextcloud" / rel).read_text()
            assert "alpha.example" in text
            assert (base / "beta" / "apps" / "nextcloud" / rel).read_text() == text.replace(
                "alpha.example", "beta.example")
            assert got["mode"] == rec["mode"]
        elif rec["type"] == "dir":
            # A rewrite replaces a file atomically, which touches its directory.
            assert {**got, "mtime": 0} == {**rec, "mtime": 0}, rel
        else:
            assert got == rec, rel
    assert beta_tree["data/ana/files/Shared/from-ben"] == {
        "type": "symlink", "target": "../../ben/files/Documents", "uid": alpha_tree["."]["uid"],
        "gid": alpha_tree["."]["gid"]}

    # Both servers are gone.
    assert processes_mentioning(str(base)) == []
    for name in ("alpha", "beta"):
        assert "peerkit serve: stopped" in (base / name / "serve.log").read_text()


def stop_kept_demo(base: Path, pids: list[int]) -> None:
    """Stop the servers a kept demo left running and check that none is left behind."""
    for pid in pids or processes_mentioning(str(base)):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while processes_mentioning(str(base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_mentioning(str(base)) == []


def test_demo_keep_leaves_both_servers_answering(runner):
    base = runner.home / "demo-keep"
    pids: list[int] = []
    try:
        proc = runner.run([str(PEERKIT), "demo", "--small", "--keep", "--dir", str(base)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        [stop_line] = [line for line in lines if line.startswith("Stop them with: kill ")]
        pids = [int(p) for p in stop_line.split()[4:]]
        assert len(pids) == 2
        assert sorted(pids) == sorted(processes_mentioning(str(base)))

        # The commands it prints, exactly: the ping runs as printed.
        beta_cfg, alpha_cfg = base / "beta" / "config.yaml", base / "alpha" / "config.yaml"
        expected = [f"   {PEERKIT} --config {beta_cfg} {rest}"
                    for rest in ("peers", "ping alpha", "apps alpha", "pull alpha wiki")]
        expected += [f"   {PEERKIT} --config {alpha_cfg} allow beta --push",
                     f"   {PEERKIT} --config {beta_cfg} push alpha nextcloud",
                     f"   {PEERKIT} --config {alpha_cfg} audit"]
        start = lines.index("The servers are still running. Try, as this user:")
        assert lines[start + 1:start + 1 + len(expected)] == expected
        ping = runner.run(shlex.split(expected[1]))
        assert ping.returncode == 0, ping.stderr
        assert ping.stdout.startswith("alpha is up: ")
        # And the other way: alpha's server is not the only one answering.
        back = runner.run([str(PEERKIT), "--config", str(alpha_cfg), "--json", "ping", "beta"])
        assert back.returncode == 0 and json.loads(back.stdout.splitlines()[-1])["remote_name"] == "beta"
    finally:
        stop_kept_demo(base, pids)
    for name in ("alpha", "beta"):
        assert "peerkit serve: stopped" in (base / name / "serve.log").read_text()


def test_demo_keep_json_lists_the_commands_to_try(runner):
    """With --json, a host dashboard gets the commands as argument lists, and each one runs."""
    base = runner.home / "demo-keep-json"
    pids: list[int] = []
    try:
        proc = runner.run([str(PEERKIT), "--json", "demo", "--small", "--keep", "--dir", str(base)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.splitlines()[-1])
        pids = [server["pid"] for server in result["servers"].values()]
        assert result["kept_running"] is True and sorted(pids) == sorted(processes_mentioning(str(base)))
        commands = result["try"]
        assert [argv[3:] for argv in commands] == [
            ["peers"], ["ping", "alpha"], ["apps", "alpha"], ["pull", "alpha", "wiki"],
            ["allow", "beta", "--push"], ["push", "alpha", "nextcloud"], ["audit"]]
        assert {argv[2] for argv in commands} == {str(base / "alpha" / "config.yaml"),
                                                 str(base / "beta" / "config.yaml")}
        apps = runner.run([*commands[2][:3], "--json", *commands[2][3:]])
        assert apps.returncode == 0, apps.stderr
        assert "wiki" in [a["slug"] for a in json.loads(apps.stdout.splitlines()[-1])["apps"]]
    finally:
        stop_kept_demo(base, pids)
