"""Tests for the benchmark harness's own helpers (the benchmarks themselves are a separate command)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerkit.bench import run
from tests.support import ci
from tests.support import sshd as harness

REPO = Path(__file__).resolve().parents[1]


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "PAGES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def filesystem_type(path: Path) -> str:
    return subprocess.run(["stat", "--file-system", "--format=%T", str(path)],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux fincore not installed")
def test_evict_drops_a_discarded_tree_from_the_page_cache_and_follows_no_link(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) == "tmpfs":
        pytest.skip("tmpfs pages have no other copy: nothing can drop them")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(1 << 20))
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    files = [tree / "a.bin", tree / "d" / "b.bin"]
    for f in files:
        f.write_bytes(os.urandom(4 << 20))  # dirty: evict must write them out first
    (tree / "d" / "link").symlink_to(outside)
    assert all(resident_pages(f) > 0 for f in [*files, outside])
    assert run.evict(tree) == 2
    assert [resident_pages(f) for f in files] == [0, 0]
    assert resident_pages(outside) > 0, "a symlink led evict out of the tree"
    assert [f.stat().st_size for f in files] == [4 << 20, 4 << 20]


# -- stopping a run ---------------------------------------------------------------------------

@pytest.fixture
def own_signal_handlers():
    """Put back the handlers a test replaced (pytest's own SIGINT one among them)."""
    saved = {sig: signal.getsignal(sig) for sig in run.StopSignals.HANDLED}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_is_noted_and_raised_at_the_next_check_but_never_during_the_clean_up(own_signal_handlers,
                                                                                   capsys) -> None:
    signals = run.StopSignals()
    signals.install()
    signals.check()  # nothing asked yet
    os.kill(os.getpid(), signal.SIGTERM)  # the handler only takes note: no exception here
    os.kill(os.getpid(), signal.SIGHUP)
    assert "SIGTERM: stopping" in capsys.readouterr().err
    with pytest.raises(run.Stopped) as caught:
        signals.check()
    assert caught.value.signum == signal.SIGTERM and str(caught.value) == "stopped by SIGTERM"
    with pytest.raises(run.Stopped):
        signals.check()  # again at every later check, until the clean-up
    signals.cleaning = True
    signals.check()
    os.kill(os.getpid(), signal.SIGINT)
    assert "SIGINT: already stopping; still removing what the run made" in capsys.readouterr().err
    assert signals.stopped().signum == signal.SIGTERM  # the first one decides the exit status


def test_a_signal_ignored_at_start_stays_ignored(own_signal_handlers) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # how `bench &` from a script starts
    run.StopSignals().install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize("when", ["== ping", "[ping] run 1/"], ids=["while-making-the-instances", "mid-case"])
def test_sigterm_stops_a_run_reports_what_was_not_run_and_removes_everything_it_made(tmp_path: Path,
                                                                                     when: str) -> None:
    problems = harness.missing_prerequisites()
    if problems:
        ci.unavailable("the benchmark's clean-up on SIGTERM", "; ".join(problems))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "peerkit.bench", "--quick", "--cases", "ping,forced-command",
                             "--runs", "50", "--out", str(out)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root: Path | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("working in "):
                root = Path(line.split()[2])
            if when in line:
                break
        else:
            pytest.fail(f"the run ended before {when!r}: {proc.wait()} {proc.stderr.read()[-2000:]}")
        assert root is not None and root.is_dir()
        if when.startswith("[ping]"):  # sshd, two accounts, two paired instances: all made
            assert len([pw for pw in pwd.getpwall() if pw.pw_dir.startswith(f"{root}/")]) == 2
            assert _processes_mentioning(str(root)), "no sshd or server of the run found"
        proc.send_signal(signal.SIGTERM)
        _rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM: removing" in err
    assert not root.exists()
    assert not [pw.pw_name for pw in pwd.getpwall() if pw.pw_dir.startswith(f"{root}/")]
    assert not _processes_mentioning(str(root))
    table = (out / "results.md").read_text()
    for case in ("ping", "forced-command"):
        assert f"| {case} — not run: stopped by SIGTERM |" in table


# -- the wait after a full-size run's clean-up ----------------------------------------------------

def test_a_full_size_run_waits_out_the_settle_period_after_the_last_clean_up(tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    assert run.settle_wait(1_000_000.0, marker, 300) == 0  # none recorded
    marker.touch()
    os.utime(marker, (1_000_000, 1_000_000))
    assert run.settle_wait(1_000_100.0, marker, 300) == 200
    assert run.settle_wait(1_000_300.0, marker, 300) == 0
    assert run.settle_wait(1_005_000.0, marker, 300) == 0
    # A clean-up "in the future" (the clock set back since) waits the period, not more.
    assert run.settle_wait(999_000.0, marker, 300) == 300


def test_the_clean_up_is_recorded_and_the_next_full_size_run_waits_stoppably(tmp_path: Path, monkeypatch,
                                                                           own_signal_handlers, capsys) -> None:
    monkeypatch.setattr(run, "CLEANED", tmp_path / "cleaned")
    run.mark_cleaned()
    assert 299 <= run.settle_wait(time.time()) <= 300
    signals = run.StopSignals()
    monkeypatch.setattr(run, "STOP", signals)
    signals.install()
    os.kill(os.getpid(), signal.SIGTERM)  # noted now, raised at the wait's first check
    with pytest.raises(run.Stopped):
        run.wait_after_cleanup()
    out = capsys.readouterr().out
    assert "waiting 300 s: the last full-size run deleted its data sets 0 s ago" in out and "--no-wait" in out


def test_main_waits_before_making_anything_and_a_quick_run_or_no_wait_does_not(tmp_path: Path, monkeypatch,
                                                                              own_signal_handlers, capsys) -> None:
    problems = harness.missing_prerequisites()
    if problems:
        ci.unavailable("the benchmark's start", "; ".join(problems))
    monkeypatch.setattr(run, "CLEANED", tmp_path / "cleaned")
    run.mark_cleaned()
    made: list[Path] = []

    # Instead of making the accounts and servers (the SIGTERM test above runs
    # the real ones): what matters here is whether main got that far.
    def env_stopped_at_once(root: Path) -> None:
        made.append(root)
        shutil.rmtree(root)  # what Env.close() would remove
        raise run.Stopped(signal.SIGTERM)

    monkeypatch.setattr(run, "Env", env_stopped_at_once)
    out = tmp_path / "out"
    argv = ["--cases", "ping,full-small", "--runs", "1", "--out", str(out)]
    signals = run.StopSignals()
    monkeypatch.setattr(run, "STOP", signals)
    signals.install()
    os.kill(os.getpid(), signal.SIGTERM)  # noted now, raised at the wait's first check
    assert run.main(argv) == 128 + signal.SIGTERM
    assert "waiting 300 s" in capsys.readouterr().out and made == []  # stopped while waiting
    assert "| ping — not run: stopped by SIGTERM |" in (out / "results.md").read_text()
    # --no-wait, --quick and cases that make no data sets go straight on.
    for extra in (["--no-wait"], ["--quick"], ["--cases", "ping,forced-command,fanout"]):
        made.clear()
        monkeypatch.setattr(run, "STOP", run.StopSignals())
        assert run.main(argv + extra) == 128 + signal.SIGTERM
        assert "waiting" not in capsys.readouterr().out and len(made) == 1, extra
    assert run.DATA_CASES < set(run.CASES)


def test_the_clean_up_record_follows_no_symlink(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "someone-elses"
    target.write_text("x")
    os.utime(target, (1_000_000, 1_000_000))
    monkeypatch.setattr(run, "CLEANED", tmp_path / "cleaned")
    os.symlink(target, run.CLEANED)
    run.mark_cleaned()  # refused quietly: the next run only misses its wait
    assert target.stat().st_mtime == 1_000_000
    assert run.settle_wait(time.time()) == 0  # the symlink's target, cleaned long ago


def test_help_shows_examples_and_the_wait() -> None:
    proc = subprocess.run([sys.executable, "-m", "peerkit.bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bin/peerkit-bench --quick" in proc.stdout and "--no-wait" in proc.stdout
