"""`peerkit audit`: who called peer-shell, filtered by peer and time, over a real peer-shell log."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from peerkit import audit, pairing
from peerkit.cli.main import run
from peerkit.config import Config
from tests.instances import make_instance
from tests.conftest import run_peerkit

PEER_SHELL = Path(sys.executable).parent / "peer-shell"
UTC = timezone.utc
# (peer, command, client address) for each peer-shell call, in order.
FIRST = [("beta", "ping", "192.0.2.7"), ("gamma", "ping", "198.51.100.3"), ("beta", "list-apps", "192.0.2.7"),
         ("beta", "sh -c id", "192.0.2.7")]
SECOND = [("gamma", "stream-app blog", "198.51.100.3"), ("beta", "stream-app missing", "192.0.2.7"),
          ("delta", "ping", "203.0.113.5")]  # delta is not paired: refused, and logged


def call(cfg: Config, peer: str, command: str, client: str) -> subprocess.CompletedProcess:
    """Run the real peer-shell console script the way sshd runs it for ``peer``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "SSH_ORIGINAL_COMMAND": command,
           "SSH_CONNECTION": f"{client} 50123 192.0.2.1 22"}
    return subprocess.run([str(PEER_SHELL), "--config", str(cfg.path), peer], capture_output=True, env=env,
                          timeout=60)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """(alpha's config, the time between the two batches of calls) after real calls from two peers."""
    root = tmp_path_factory.mktemp("audit")
    alpha = make_instance(root / "alpha", "alpha")
    for name in ("beta", "gamma"):
        pairing.pair(alpha, pairing.our_token(make_instance(root / name, name))[0])
    blog = alpha.apps_dir / "blog"
    blog.mkdir(parents=True)
    (blog / "index.html").write_text("<h1>hi</h1>\n")
    for peer, command, client in FIRST:
        call(alpha, peer, command, client)
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    for peer, command, client in SECOND:
        call(alpha, peer, command, client)
    events = audit.read_events(alpha.audit_log)
    assert [(e["peer"], e["client"]) for e in events] == [(p, c) for p, _, c in FIRST + SECOND]
    return alpha, middle


def run_here(*args: str) -> tuple[int, str, str]:
    """Run the CLI's entry point in this process (the subprocess tests below cover the script)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run(list(args))
    return status, out.getvalue(), err.getvalue()


def audit_json(cfg: Config, *args: str) -> list[dict]:
    status, out, err = run_here("audit", "--json", "--config", str(cfg.path), *args)
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True
    return result["events"]


def summary(events: list[dict]) -> list[tuple]:
    return [(e["peer"], e.get("verb"), e.get("slug"), e["outcome"]) for e in events]


ALL = [("beta", "ping", None, "ok"), ("gamma", "ping", None, "ok"), ("beta", "list-apps", None, "ok"),
       ("beta", None, None, "refused"), ("gamma", "stream-app", "blog", "ok"),
       ("beta", "stream-app", "missing", "no-such-app"), ("delta", "ping", None, "refused")]


def test_json_lists_every_call_with_its_details(log):
    alpha, _ = log
    events = audit_json(alpha)
    assert summary(events) == ALL
    assert events == audit.read_events(alpha.audit_log)
    stream = events[4]
    assert stream["client"] == "198.51.100.3" and stream["client_port"] == 50123
    assert stream["bytes"] > 512 and isinstance(stream["duration_ms"], float)
    assert events[3]["command"] == "sh -c id"
    assert "not paired" in events[6]["reason"]


def test_peer_filter(log):
    alpha, _ = log
    assert summary(audit_json(alpha, "--peer", "beta")) == [s for s in ALL if s[0] == "beta"]
    assert summary(audit_json(alpha, "--peer", "gamma")) == [s for s in ALL if s[0] == "gamma"]
    # An unpaired caller's attempts are there to be found too.
    assert summary(audit_json(alpha, "--peer", "delta")) == [("delta", "ping", None, "refused")]
    assert audit_json(alpha, "--peer", "nobody") == []


def test_since_an_iso_time(log):
    alpha, middle = log
    second = ALL[len(FIRST):]
    assert summary(audit_json(alpha, "--since", middle.isoformat())) == second
    # Z suffix, and the same instant in another zone.
    assert summary(audit_json(alpha, "--since", middle.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))) == second
    east = middle.astimezone(timezone(timedelta(hours=9)))
    assert summary(audit_json(alpha, "--since", east.isoformat())) == second
    # A bare date (UTC midnight) and a naive time (UTC).
    today = middle.date().isoformat()
    assert summary(audit_json(alpha, "--since", today)) == ALL
    naive = middle.replace(tzinfo=None).isoformat()
    assert summary(audit_json(alpha, "--since", naive)) == second
    future = (middle + timedelta(days=1)).isoformat()
    assert audit_json(alpha, "--since", future) == []


def test_since_and_peer_together(log):
    alpha, middle = log
    events = audit_json(alpha, "--peer", "beta", "--since", middle.isoformat())
    assert summary(events) == [("beta", "stream-app", "missing", "no-such-app")]


def test_since_a_span(log, tmp_path):
    alpha, _ = log
    assert summary(audit_json(alpha, "--since", "1h")) == ALL
    assert summary(audit_json(alpha, "--since", "30m")) == ALL
    # A copy of the log whose first batch happened three hours ago.
    old_cfg_root = tmp_path / "old"
    copy = make_instance(old_cfg_root, "alpha")
    lines = alpha.audit_log.read_text(encoding="ascii").splitlines()
    shifted = []
    for i, line in enumerate(lines):
        event = json.loads(line)
        if i < len(FIRST):
            when = datetime.fromisoformat(event["time"]) - timedelta(hours=3)
            event["time"] = when.isoformat(timespec="milliseconds")
        shifted.append(json.dumps(event, separators=(",", ":")))
    copy.audit_log.write_text("\n".join(shifted) + "\n", encoding="ascii")
    second = ALL[len(FIRST):]
    assert summary(audit_json(copy, "--since", "2h")) == second
    assert summary(audit_json(copy, "--since", "120m")) == second
    assert summary(audit_json(copy, "--since", "4h")) == ALL
    assert summary(audit_json(copy, "--since", "1d")) == ALL
    assert summary(audit_json(copy, "--since", "1w", "--peer", "gamma")) == [s for s in ALL if s[0] == "gamma"]
    assert summary(audit_json(copy, "--since", "2h", "--peer", "gamma")) == [("gamma", "stream-app", "blog", "ok")]


def test_human_output(log):
    alpha, _ = log
    proc = run_peerkit("audit", "--config", str(alpha.path), "--peer", "gamma")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert "gamma" in lines[0] and "198.51.100.3" in lines[0] and " ping " in lines[0] and " ok " in lines[0]
    assert "stream-app blog" in lines[1]
    proc = run_peerkit("audit", "--config", str(alpha.path), "--peer", "nobody")
    assert proc.stdout == "no calls\n"


def test_no_log_yet(tmp_path):
    fresh = make_instance(tmp_path / "fresh", "fresh")
    assert audit_json(fresh) == []
    assert audit_json(fresh, "--since", "1h", "--peer", "beta") == []


@pytest.mark.parametrize("since", ["yesterday", "7x", "7", "-1h", "0h", "2026-13-01", "1.5h", "", "now"])
def test_bad_since_is_a_usage_error(log, since):
    alpha, _ = log
    status, out, err = run_here("audit", "--json", "--config", str(alpha.path), "--since", since)
    assert status == 2, (out, err)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is False and result["error"] == "usage" and "--since" in result["message"]
    status, out, err = run_here("audit", "--config", str(alpha.path), "--since", since)
    assert status == 2 and out == "" and "--since" in err


def test_bad_since_from_the_installed_script(log):
    alpha, _ = log
    proc = run_peerkit("audit", "--json", "--config", str(alpha.path), "--since", "yesterday")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error"] == "usage"
    proc = run_peerkit("audit", "--config", str(alpha.path), "--since", "7x")
    assert proc.returncode == 2 and proc.stdout == "" and "--since" in proc.stderr
