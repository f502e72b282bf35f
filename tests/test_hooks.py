"""The operator's hooks: which commands run, and how (peerkit.hooks)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from peerkit.config import import_config
from peerkit.errors import HookFailed
from peerkit.hooks import COMPOSE_FILES, commands_for, hook_env, run_hook

# A hook that records how it was called: argv, cwd and environment.
RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["PEERKIT_APP_DIR"] + "/calls.jsonl", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}) + "\\n")
print("recorded", *sys.argv[1:])
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    path = tmp_path / "apps" / "web"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def recorder(tmp_path: Path) -> str:
    path = tmp_path / "bin" / "record-hook"
    path.parent.mkdir()
    path.write_text(RECORDER)
    path.chmod(0o755)
    return str(path)


def calls(app_dir: Path) -> list[dict]:
    path = app_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def run(commands, app_dir: Path, timeout: float = 30, hook: str = "stop"):
    return run_hook(hook, tuple(tuple(c) for c in commands), app="web", app_dir=app_dir,
                    peer="alice", timeout=timeout)


def test_commands_run_in_order_in_the_app_dir(app_dir: Path, recorder: str) -> None:
    runs = run([[recorder, "first"], [recorder, "second"], [recorder, "third"]], app_dir)
    seen = calls(app_dir)
    assert [c["argv"] for c in seen] == [["first"], ["second"], ["third"]]
    for c in seen:
        assert c["cwd"] == str(app_dir)
        assert c["env"]["PEERKIT_APP"] == "web"
        assert c["env"]["PEERKIT_APP_DIR"] == str(app_dir)
        assert c["env"]["PEERKIT_PEER"] == "alice"
    assert [(r.hook, r.argv, r.exit_status) for r in runs] == [
        ("stop", [recorder, "first"], 0), ("stop", [recorder, "second"], 0), ("stop", [recorder, "third"], 0)]
    assert runs[1].output == "recorded second\n"
    assert all(r.duration_ms >= 0 for r in runs)


def test_environment_is_scrubbed(app_dir: Path, recorder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-aws")
    monkeypatch.setenv("PEERKIT_PASSPHRASE", "hunter2-peerkit")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("LANG", "C.UTF-8")
    run([[recorder]], app_dir)
    env = calls(app_dir)[0]["env"]
    for name in ("AWS_SECRET_ACCESS_KEY", "PEERKIT_PASSPHRASE", "SSH_AUTH_SOCK", "LD_PRELOAD"):
        assert name not in env
    assert "hunter2" not in json.dumps(env)
    assert env["LANG"] == "C.UTF-8"
    assert env["HOME"] == os.environ["HOME"]
    assert env["PATH"] == os.environ["PATH"]
    assert hook_env("web", app_dir, "alice")["PEERKIT_PEER"] == "alice"


def test_default_path_when_none_is_set(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    assert hook_env("web", app_dir, "alice")["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_no_shell_arguments_are_literal(app_dir: Path, recorder: str) -> None:
    nasty = ["$(touch pwned1)", "; touch pwned2", "`touch pwned3`", "a b  c", "*", "$HOME",
             "| touch pwned4", "&& touch pwned5", "'quoted'", '"dq"', "\\n", "--x=1"]
    (app_dir / "some-file").write_text("for the * glob\n")
    run([[recorder, *nasty]], app_dir)
    assert calls(app_dir)[0]["argv"] == nasty
    leaked = [p for p in app_dir.parent.parent.rglob("pwned*")] + [p for p in Path.cwd().glob("pwned*")]
    assert leaked == []


def test_failure_stops_the_hook_and_reports(app_dir: Path, recorder: str, tmp_path: Path) -> None:
    failing = script(tmp_path, "failing", "echo to-stdout\necho to-stderr >&2\nexit 3\n")
    with pytest.raises(HookFailed) as info:
        run([[recorder, "before"], [failing, "arg"], [recorder, "after"]], app_dir)
    assert [c["argv"] for c in calls(app_dir)] == [["before"]]  # "after" never ran
    runs = info.value.runs
    assert [r.argv for r in runs] == [[recorder, "before"], [failing, "arg"]]
    assert runs[0].exit_status == 0
    assert runs[1].exit_status == 3
    assert "to-stdout" in runs[1].output and "to-stderr" in runs[1].output
    assert "3" in str(info.value)


def test_killed_by_signal_is_a_failure(app_dir: Path, tmp_path: Path) -> None:
    suicide = script(tmp_path, "suicide", "kill -TERM $$\n")
    with pytest.raises(HookFailed) as info:
        run([[suicide]], app_dir)
    assert info.value.runs[0].exit_status == -signal.SIGTERM


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_timeout_kills_the_hook_and_its_children(app_dir: Path, tmp_path: Path, recorder: str) -> None:
    # The child does not hold the output pipe, so only a process-group kill stops it.
    hanging = script(tmp_path, "hanging", "sleep 30 >/dev/null 2>&1 &\necho $! > child.pid\necho started\n"
                                         "exec sleep 30\n")
    started = time.monotonic()
    child = None
    try:
        with pytest.raises(HookFailed) as info:
            run([[hanging], [recorder, "after"]], app_dir, timeout=1)
        elapsed = time.monotonic() - started
        child = int((app_dir / "child.pid").read_text())
        assert elapsed < 5
        deadline = time.monotonic() + 3
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child), "the hook's child survived the timeout"
    finally:
        if child is not None and not _gone(child):
            os.kill(child, signal.SIGKILL)
    run_ = info.value.runs[-1]
    assert run_.exit_status is None
    assert "started" in run_.output
    assert "timed out" in str(info.value)
    assert calls(app_dir) == []


def test_timeout_with_child_holding_the_output(app_dir: Path, tmp_path: Path) -> None:
    # Here the child keeps stdout open: killing only the hook would leave
    # run_hook waiting for the pipe for 30 s.
    hanging = script(tmp_path, "hanging", "sleep 30 &\nexec sleep 30\n")
    started = time.monotonic()
    with pytest.raises(HookFailed):
        run([[hanging]], app_dir, timeout=1)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("argv0", ["peerkit-no-such-command-xyz", "/nonexistent/peerkit/stop.sh",
                                   "not-executable"])
def test_command_not_found(app_dir: Path, recorder: str, tmp_path: Path, argv0: str) -> None:
    if argv0 == "not-executable":
        path = tmp_path / "plain.txt"
        path.write_text("not a program\n")
        path.chmod(0o644)
        argv0 = str(path)
    with pytest.raises(HookFailed) as info:
        run([[argv0, "x"], [recorder, "after"]], app_dir)
    assert calls(app_dir) == []
    assert info.value.runs[-1].argv == [argv0, "x"]
    assert info.value.runs[-1].exit_status is None
    assert argv0 in str(info.value)


def test_no_commands_is_a_no_op(app_dir: Path) -> None:
    assert run([], app_dir) == []


def test_missing_app_dir_runs_in_its_parent(tmp_path: Path, recorder: str) -> None:
    gone = tmp_path / "apps" / "gone"
    gone.parent.mkdir()
    # The recorder writes into PEERKIT_APP_DIR, which does not exist: use cwd instead.
    pwd = script(tmp_path, "pwd-hook", "pwd > \"$PEERKIT_APP_DIR.cwd\"\n")
    run([[pwd]], gone, hook="post_restore")
    assert Path(f"{gone}.cwd").read_text().strip() == str(gone.parent)


# -- commands_for ----------------------------------------------------------

@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_auto_uses_docker_compose_when_there_is_a_compose_file(app_dir: Path, compose: str) -> None:
    (app_dir / compose).write_text("services: {}\n")
    assert commands_for("stop", None, app_dir) == (("docker", "compose", "down"),)
    assert commands_for("start", None, app_dir) == (("docker", "compose", "up", "-d"),)
    assert commands_for("post_restore", None, app_dir) == ()


def test_auto_without_compose_file_runs_nothing(app_dir: Path) -> None:
    (app_dir / "Dockerfile").write_text("FROM scratch\n")
    (app_dir / "compose.yaml").mkdir()  # a directory is not a compose file
    assert commands_for("stop", None, app_dir) == ()
    assert commands_for("start", None, app_dir) == ()


def _hooks(app_dir: Path, yaml: str):
    cfg = import_config("name: here\nssh: {user: peer, host: here.example}\nhooks:\n" + yaml,
                        app_dir.parent / "config.yaml")
    return cfg.hooks


def test_configured_commands_win(app_dir: Path) -> None:
    (app_dir / "compose.yaml").write_text("services: {}\n")
    hooks = _hooks(app_dir, "  stop: [systemctl, stop, web]\n"
                            "  start: [[make, start], [curl, -fsS, http://localhost/]]\n")
    assert commands_for("stop", hooks.stop, app_dir) == (("systemctl", "stop", "web"),)
    assert commands_for("start", hooks.start, app_dir) == (("make", "start"), ("curl", "-fsS", "http://localhost/"))


def test_empty_list_disables_the_hook(app_dir: Path) -> None:
    (app_dir / "compose.yaml").write_text("services: {}\n")
    hooks = _hooks(app_dir, "  stop: []\n  start: auto\n")
    assert commands_for("stop", hooks.stop, app_dir) == ()
    assert commands_for("start", hooks.start, app_dir) == (("docker", "compose", "up", "-d"),)
