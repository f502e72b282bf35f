"""peerkit.web.runner and jobs: the CLI as a subprocess, its JSON, its progress, its failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import textwrap
from pathlib import Path

import pytest

from peerkit.web.jobs import PullJobs, pull_args
from peerkit.web.runner import Cli


def run(coro):
    """Run a coroutine on a fresh loop in its own thread (Playwright's sync API may own this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def stand_in(tmp_path: Path, body: str) -> list[str]:
    """A stand-in CLI: a Python script that gets the same arguments as the real one."""
    script = tmp_path / "cli.py"
    script.write_text("import json, sys, time\nargs = sys.argv[1:]\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_arguments_are_a_list_with_config_json_and_the_double_dash(tmp_path):
    cli = Cli(tmp_path / "c.yaml", ["peerkit"])
    assert cli.argv("apps", "--", "beta") == ["peerkit", "--config", str(tmp_path / "c.yaml"), "--json",
                                             "apps", "--", "beta"]


@pytest.mark.parametrize("backup, rewrite, flags", [
    (True, True, []), (False, True, ["--no-pre-backup"]), (True, False, ["--keep-urls"]),
    (False, False, ["--no-pre-backup", "--keep-urls"]),
])
def test_pull_arguments_follow_the_toggles(backup, rewrite, flags):
    assert pull_args("beta", "wiki", pre_backup=backup, rewrite_urls=rewrite) == ["pull", *flags, "--", "beta", "wiki"]


def test_the_last_json_line_is_the_result_and_stderr_becomes_remarks(tmp_path):
    cli = Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        print("not json")
        print(json.dumps({"ok": True, "args": args}))
        print("note: remark one", file=sys.stderr)
        print("peerkit: error: not a remark", file=sys.stderr)
    """))
    out = run(cli.run("peers"))
    assert out.status == 0
    assert out.result == {"ok": True, "args": ["--config", str(tmp_path / "c.yaml"), "--json", "peers"]}
    assert out.to_json()["remarks"] == ["note: remark one"]


def test_an_error_result_and_its_status(tmp_path):
    cli = Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        print(json.dumps({"ok": False, "error": "no-such-peer", "message": "nope"}))
        sys.exit(30)
    """))
    out = run(cli.run("apps", "--", "x"))
    assert (out.status, out.result["error"]) == (30, "no-such-peer")


@pytest.mark.parametrize("body", [
    "sys.exit(3)",
    "print('[1, 2]')",
    "print(json.dumps({'no': 'ok field'}))",
], ids=["silent", "not-an-object", "no-ok"])
def test_no_usable_result_is_an_error(tmp_path, body):
    out = run(Cli(tmp_path / "c.yaml", stand_in(tmp_path, body)).run("peers"))
    assert out.result["ok"] is False and out.result["error"] == "error"


def test_a_success_with_a_failing_status_is_a_failure(tmp_path):
    out = run(Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        print(json.dumps({"ok": True}))
        sys.exit(1)
    """)).run("ping", "--all"))
    assert out.result["ok"] is False


def test_a_cli_that_hangs_is_killed(tmp_path):
    out = run(Cli(tmp_path / "c.yaml", stand_in(tmp_path, "time.sleep(60)")).run("peers", timeout=0.5))
    assert out.status == -1 and out.result["ok"] is False and "within 0.5 s" in out.result["message"]


def test_a_big_answer_and_a_chatty_stderr_do_not_block(tmp_path):
    out = run(Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        sys.stderr.write("x" * (3 << 20))
        print(json.dumps({"ok": True, "blob": "y" * (2 << 20)}))
    """)).run("peers", timeout=60))
    assert out.result["ok"] is True and len(out.result["blob"]) == 2 << 20


def test_a_pull_job_keeps_the_latest_progress_and_the_result(tmp_path):
    cli = Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        for done in (0, 50, 100):
            print(json.dumps({"event": "progress", "stage": "transfer", "bytes": done, "total": 100}), flush=True)
            time.sleep(0.05)
        print(json.dumps({"ok": True, "event": "result", "app": args[-1], "peer": args[-2], "args": args}))
    """))

    async def go():
        jobs = PullJobs(cli)
        job = await jobs.start("beta", "wiki", pre_backup=False, rewrite_urls=True)
        seen, versions = -1, []
        while not job.done:
            seen = await job.wait_change(seen, 10)
            versions.append(seen)
        await job.task
        return job, versions

    job, versions = run(go())
    assert job.progress == {"stage": "transfer", "bytes": 100, "total": 100}
    assert job.progress_events == 3
    assert job.result["ok"] is True and job.result["event"] == "result"
    assert job.result["args"][-5:] == ["pull", "--no-pre-backup", "--", "beta", "wiki"]
    assert versions == sorted(versions) and versions[-1] == job.version
    assert json.loads(json.dumps(job.to_json()))["done"] is True


def test_stopping_the_server_stops_running_pulls_with_sigterm(tmp_path):
    cli = Cli(tmp_path / "c.yaml", stand_in(tmp_path, """
        import signal
        def bye(*_):
            print(json.dumps({"ok": False, "event": "result", "error": "interrupted", "message": "stopped"}))
            sys.exit(130)
        signal.signal(signal.SIGTERM, bye)
        print(json.dumps({"event": "progress", "stage": "transfer", "bytes": 1, "total": 10}), flush=True)
        time.sleep(60)
    """))

    async def go():
        jobs = PullJobs(cli)
        job = await jobs.start("beta", "wiki", pre_backup=True, rewrite_urls=True)
        seen = 0
        while job.progress is None:  # the stand-in has set its handler
            seen = await job.wait_change(seen, 10)
        await jobs.stop()
        return job

    job = run(go())
    assert job.result["error"] == "interrupted" and job.proc.returncode == 130
