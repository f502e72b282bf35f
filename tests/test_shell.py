"""peer-shell: the forced command, run for real as sshd would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peerkit import __version__, audit, pairing
from peerkit.apps import archive_size
from peerkit.config import Config
from peerkit.errors import NoSuchApp, PeerRefused
from peerkit.state import PeerStore
from tests.instances import make_instance

PEER_SHELL = Path(sys.executable).parent / "peer-shell"
SSH_CONNECTION = "192.0.2.7 50123 192.0.2.1 22"


@pytest.fixture(scope="module")
def instance(tmp_path_factory) -> Config:
    """'alpha' serving 'beta', with two apps; shared by the module (tests only read it)."""
    root = tmp_path_factory.mktemp("shell")
    alpha = make_instance(root / "alpha", "alpha")
    beta = make_instance(root / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    app = alpha.apps_dir / "myapp"
    (app / "data").mkdir(parents=True)
    (app / "compose.yaml").write_text("services: {}\n")
    (app / "data" / "blob").write_bytes(os.urandom(200_000))
    (app / "link").symlink_to("data/blob")
    (alpha.apps_dir / "other").mkdir()
    (alpha.apps_dir / "Hidden").mkdir()
    return alpha


def peer_shell(cfg: Config | None, command: str | None, *argv: str, env: dict | None = None,
               ) -> subprocess.CompletedProcess:
    args = list(argv) if argv else ["--config", str(cfg.path), "beta"]
    full_env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "SSH_CONNECTION": SSH_CONNECTION,
                **(env or {})}
    if command is not None:
        full_env["SSH_ORIGINAL_COMMAND"] = command
    return subprocess.run([str(PEER_SHELL), *args], capture_output=True, env=full_env, timeout=60)


def events(cfg: Config) -> list[dict]:
    return audit.read_events(cfg.audit_log)


def test_ping(instance):
    before = len(events(instance))
    proc = peer_shell(instance, "ping")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout.count(b"\n") == 1
    reply = json.loads(proc.stdout)
    assert reply == {"ok": True, "peer": "alpha", "version": __version__, "features": reply["features"]}
    assert {"receive-app", "replace-key"} <= set(reply["features"])
    new = events(instance)[before:]
    assert len(new) == 1
    event = new[0]
    assert (event["peer"], event["verb"], event["outcome"]) == ("beta", "ping", "ok")
    assert (event["client"], event["client_port"]) == ("192.0.2.7", 50123)
    assert event["bytes"] == len(proc.stdout)


def test_list_apps(instance):
    proc = peer_shell(instance, "list-apps")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["peer"] == "alpha"
    assert reply["apps"] == [{"slug": name, "size_kb": archive_size(instance.apps_dir / name) // 1024}
                             for name in ("myapp", "other")]
    assert reply["domain"] is None
    assert events(instance)[-1]["verb"] == "list-apps"


def test_app_info_answers_ping_and_list_apps_for_one_app(instance):
    ping = json.loads(peer_shell(instance, "ping").stdout)
    listed = json.loads(peer_shell(instance, "list-apps").stdout)
    before = len(events(instance))
    proc = peer_shell(instance, "app-info myapp")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    reply = json.loads(proc.stdout)
    assert "app-info" in reply["features"]
    assert reply == {**ping, "domain": listed["domain"], "app": listed["apps"][0]}
    assert listed["apps"][0]["slug"] == "myapp"
    # Missing: an answer, not an error (the peer answered; the pull says "no such app").
    missing = peer_shell(instance, "app-info missing")
    assert missing.returncode == 0 and json.loads(missing.stdout) == {**reply, "app": None}
    new = events(instance)[before:]
    assert [(e["verb"], e["slug"], e["outcome"], e["bytes"]) for e in new] == [
        ("app-info", "myapp", "ok", len(proc.stdout)), ("app-info", "missing", "ok", len(missing.stdout))]


def test_app_info_of_an_app_not_offered_looks_like_a_missing_one(tmp_path):
    from peerkit.permissions import change

    alpha = make_instance(tmp_path / "alpha", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    for name in ("wiki", "blog"):
        (alpha.apps_dir / name).mkdir(parents=True)
        (alpha.apps_dir / name / "f").write_bytes(b"x" * 5000)
    change(alpha, "beta", allow=False, apps=("wiki",))
    hidden, missing, shown = (json.loads(peer_shell(alpha, f"app-info {slug}").stdout)
                              for slug in ("wiki", "nope", "blog"))
    assert hidden == missing and hidden["app"] is None
    assert shown["app"] == {"slug": "blog", "size_kb": archive_size(alpha.apps_dir / "blog") // 1024}


def test_with_app_info_answers_app_info_on_stderr_before_rsync_runs(instance, tmp_path):
    """A real rsync pull through peer-shell (as its remote shell): the answer comes first and disturbs nothing."""
    info = peer_shell(instance, "app-info myapp").stdout
    # rsync runs it as "<remote shell> HOST rsync --server --sender ...".
    remote = tmp_path / "remote-shell"
    remote.write_text(f'#!/bin/sh\nshift\nSSH_ORIGINAL_COMMAND="with-app-info $*" SSH_CONNECTION="{SSH_CONNECTION}" '
                      f'exec {PEER_SHELL} --config {instance.path} beta\n')
    remote.chmod(0o755)
    before = len(events(instance))
    dest = tmp_path / "copy"
    proc = subprocess.run(["rsync", "-rlptH", "--numeric-ids", "-e", str(remote), "peer:myapp/", f"{dest}/"],
                          capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})
    assert proc.returncode == 0, proc.stderr
    # rsync passes its remote shell's stderr on: exactly app-info's answer, nothing else.
    assert proc.stderr == info
    app = instance.apps_dir / "myapp"
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == sorted(p.relative_to(app) for p in app.rglob("*"))
    assert all((dest / p.relative_to(app)).read_bytes() == p.read_bytes() for p in app.rglob("*") if p.is_file())
    [event] = events(instance)[before:]
    assert (event["verb"], event["slug"], event.get("with_app_info"), event["outcome"]) == ("rsync", "myapp", True, "ok")


def test_an_rsync_pull_is_served_without_the_modules_it_does_not_need(instance, tmp_path):
    """peer-shell's imports are waited for by every pull: none of these (README, Benchmarks)."""
    remote = tmp_path / "remote-shell"
    remote.write_text(f'#!/bin/sh\nshift\nSSH_ORIGINAL_COMMAND="with-app-info $*" SSH_CONNECTION="{SSH_CONNECTION}" '
                      f'exec {sys.executable} -X importtime {PEER_SHELL} --config {instance.path} beta\n')
    remote.chmod(0o755)
    proc = subprocess.run(["rsync", "-rlptH", "--numeric-ids", "-e", str(remote), "peer:myapp/", f"{tmp_path}/copy/"],
                          capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]})
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    assert {"peerkit.shell", "peerkit.send", "json"} <= imported  # the probe sees the imports
    # (datetime comes with sqlite3, which reads peers.db.)
    unneeded = imported & {"subprocess", "shutil", "dataclasses", "socket", "yaml", "asyncio"}
    assert not unneeded, unneeded


def test_with_app_info_of_a_missing_or_hidden_app_answers_null_and_starts_nothing(tmp_path):
    from peerkit.permissions import change

    alpha = make_instance(tmp_path / "alpha", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    (alpha.apps_dir / "wiki").mkdir(parents=True)
    (alpha.apps_dir / "wiki" / "f").write_bytes(b"x" * 5000)
    change(alpha, "beta", allow=False, apps=("wiki",))
    hidden, missing = (peer_shell(alpha, f"with-app-info rsync --server --sender -lHtpre.iLsfxCIvu . {slug}/")
                       for slug in ("wiki", "nope"))
    # app-info's answer (app null), then the error: the same bytes for both.
    assert (hidden.returncode, hidden.stdout, hidden.stderr) == (missing.returncode, missing.stdout, missing.stderr)
    assert hidden.returncode == NoSuchApp.exit_code and hidden.stdout == b""
    first, second, rest = hidden.stderr.split(b"\n", 2)
    assert first + b"\n" == peer_shell(alpha, "app-info nope").stdout and json.loads(first)["app"] is None
    assert json.loads(second) == {"ok": False, "error": "no-such-app"} and rest == b""


def test_with_app_info_is_offered_with_rsync():
    from peerkit import shell

    features = shell._features()
    assert ("with-app-info" in features) == ("rsync" in features)


def test_stream_app_round_trips(instance, tmp_path):
    proc = peer_shell(instance, "stream-app myapp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-x", "-f", "-", "-C", str(dest)], input=proc.stdout, check=True,
                   env={"PATH": "/usr/bin:/bin"})
    app = instance.apps_dir / "myapp"
    assert (dest / "data" / "blob").read_bytes() == (app / "data" / "blob").read_bytes()
    assert (dest / "compose.yaml").read_text() == "services: {}\n"
    assert os.readlink(dest / "link") == "data/blob"
    event = events(instance)[-1]
    assert (event["verb"], event["slug"], event["outcome"], event["bytes"]) == (
        "stream-app", "myapp", "ok", len(proc.stdout))


REFUSED = [
    (None, "refused", 42),
    ("", "refused", 42),
    ("sh", "refused", 42),
    ("/bin/sh -c id", "refused", 42),
    ("internal-sftp", "refused", 42),
    ("scp -f /etc/passwd", "refused", 42),
    ("ping;id", "refused", 42),
    ("ping\nid", "refused", 42),
    ("ping ", "refused", 42),
    ("pіng", "refused", 42),
    ("stream-app myapp extra", "refused", 42),
    ("x" * 5000, "refused", 42),
    ("stream-app ../x", "bad-slug", 51),
    ("stream-app -rf", "bad-slug", 51),
    ("stream-app Hidden", "bad-slug", 51),
    ("stream-app missing", "no-such-app", 50),
    ("app-info", "refused", 42),
    ("app-info myapp other", "refused", 42),
    ("app-info myapp --zstd", "refused", 42),
    ("app-info ../x", "bad-slug", 51),
    ("app-info Hidden", "bad-slug", 51),
]


@pytest.mark.parametrize("command,code,status", REFUSED)
def test_refused_requests(instance, command, code, status):
    before = len(events(instance))
    proc = peer_shell(instance, command)
    assert proc.returncode == status
    assert proc.stdout == b""
    assert proc.stderr.count(b"\n") == 1
    assert json.loads(proc.stderr) == {"ok": False, "error": code}
    new = events(instance)[before:]
    assert len(new) == 1
    assert new[0]["outcome"] == code and new[0]["peer"] == "beta"
    if code != "no-such-app":  # refused before a request exists: the raw command is logged, bounded
        assert new[0]["command"] == audit.clean(command)


def test_unpaired_peer_is_refused(instance):
    before = len(events(instance))
    proc = peer_shell(instance, "ping", "--config", str(instance.path), "gamma")
    assert proc.returncode == 42 and proc.stdout == b""
    assert json.loads(proc.stderr) == {"ok": False, "error": "refused"}
    (event,) = events(instance)[before:]
    assert event["peer"] == "gamma" and event["outcome"] == "refused"


def test_key_line_without_row_is_refused(tmp_path):
    alpha = make_instance(tmp_path / "alpha", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    assert peer_shell(alpha, "ping").returncode == 0
    with PeerStore(alpha.db_path) as store:
        store.delete("beta")
    proc = peer_shell(alpha, "ping")
    assert proc.returncode == 42 and proc.stdout == b""
    assert json.loads(proc.stderr) == {"ok": False, "error": "refused"}


def test_a_peers_db_it_cannot_read_refuses_the_peer_and_the_audit_log_says_why(tmp_path):
    import sqlite3

    busy = make_instance(tmp_path / "busy", "alpha")
    broken = make_instance(tmp_path / "broken", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    for cfg in (busy, broken):
        pairing.pair(cfg, pairing.our_token(beta)[0])
    broken.db_path.write_bytes(b"not a database\n" * 512)
    writer = sqlite3.connect(busy.db_path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        # peer-shell waits up to 10 s for a writer: started first, checked last.
        waiting = subprocess.Popen([str(PEER_SHELL), "--config", str(busy.path), "beta"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={"PATH": "/usr/bin:/bin", "SSH_CONNECTION": SSH_CONNECTION,
                                        "SSH_ORIGINAL_COMMAND": "ping"})
        answers = [peer_shell(broken, "ping")]
        out, err = waiting.communicate(timeout=60)
        answers.append(subprocess.CompletedProcess(waiting.args, waiting.returncode, out, err))
    finally:
        writer.close()
    # Fail closed, and the peer hears what an unknown peer hears: nothing about our state.
    for proc in answers:
        assert (proc.returncode, proc.stdout, proc.stderr) == (42, b"", b'{"ok": false, "error": "refused"}\n')
    # The operator reads why: not an unpairing, but a database that could not be read.
    (broken_event,) = events(broken)
    assert broken_event["outcome"] == "refused"
    assert "cannot check the pairing" in broken_event["reason"] and "not a database" in broken_event["reason"]
    (busy_event,) = events(busy)
    assert busy_event["outcome"] == "refused" and "peers.db is busy" in busy_event["reason"]


@pytest.mark.parametrize("broken, outcome", [("_greeting", "failed"), ("parse_command", "refused")])
def test_an_unforeseen_error_is_audited_and_the_peer_hears_only_its_code(pair_here, broken, outcome):
    # A bug, injected: before the request is accepted (parse_command) and while serving it (_greeting).
    script = ("import peerkit.shell as shell\n"
              "def broken(*args):\n"
              "    raise RuntimeError('boom in /srv/secret/path')\n"
              f"shell.{broken} = broken\n"
              "shell.run()\n")
    proc = subprocess.run([sys.executable, "-c", script, "--config", str(pair_here.path), "beta"],
                          capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "SSH_CONNECTION": SSH_CONNECTION,
                               "SSH_ORIGINAL_COMMAND": "ping"})
    # No traceback on the channel: it would show the peer our paths and code.
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr == f'{{"ok": false, "error": "{outcome}"}}\n'.encode()
    (event,) = events(pair_here)
    assert event["outcome"] == outcome
    assert event["reason"] == "internal error: RuntimeError: boom in /srv/secret/path at <string>:3"
    assert ("command" in event) == (outcome == "refused")


@pytest.mark.parametrize("argv", [
    [],
    ["beta"],
    ["--config", "beta"],
    ["--config", "relative/config.yaml", "beta"],
    ["--config", "{cfg}", "Beta"],
    ["--config", "{cfg}", "-beta"],
    ["--config", "{cfg}", "../beta"],
    ["--config", "{cfg}", "beta", "extra"],
    ["--conf", "{cfg}", "beta"],
    ["-c", "ping"],
])
def test_bad_forced_command_arguments_are_refused(instance, argv):
    before = len(events(instance))
    args = [a.replace("{cfg}", str(instance.path)) for a in argv]
    proc = subprocess.run([str(PEER_SHELL), *args], capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "ping"})
    assert proc.returncode == 42
    assert proc.stdout == b""
    assert proc.stderr == b'{"ok": false, "error": "refused"}\n'
    assert len(events(instance)) == before


@pytest.mark.parametrize("config_text", [None, "name: [unclosed\n", "colour: red\n", "ssh:\n  port: '22'\n"])
def test_config_problems_are_not_disclosed(tmp_path, config_text):
    cfg_path = tmp_path / "secret-dir" / "config.yaml"
    if config_text is not None:
        cfg_path.parent.mkdir()
        cfg_path.write_text(config_text)
    proc = subprocess.run([str(PEER_SHELL), "--config", str(cfg_path), "beta"], capture_output=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "ping"})
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert proc.stderr == b'{"ok": false, "error": "refused"}\n'


def test_stderr_never_contains_paths(instance):
    for command in ("stream-app missing", "stream-app ../../etc", "nope", "ping"):
        for peer in ("beta", "gamma"):
            proc = peer_shell(instance, command, "--config", str(instance.path), peer)
            for secret in (str(instance.path), str(instance.apps_dir), str(instance.state_dir), "config", "/"):
                assert secret.encode() not in proc.stderr


def test_hostile_command_leaves_one_ascii_audit_line(instance):
    before = instance.audit_log.read_bytes()
    proc = peer_shell(instance, 'x\n{"forged":1}\x1b[2J')
    assert proc.returncode == 42
    new = instance.audit_log.read_bytes()[len(before):]
    assert new.count(b"\n") == 1 and new.isascii()
    assert "forged" not in json.loads(new)


def test_version_and_help():
    proc = subprocess.run([str(PEER_SHELL), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"peer-shell {__version__}\n"
    proc = subprocess.run([str(PEER_SHELL), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: peer-shell")


# -- in-process, as `peerkit serve` runs it: shell.Cache -------------------------------------

def serve_in_process(cfg: Config, command: str, cache) -> tuple[int, bytes, bytes]:
    from peerkit import shell

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with open(os.devnull, "rb") as stdin:
        try:
            status = shell.serve(str(cfg.path), "beta", command, {"SSH_CONNECTION": SSH_CONNECTION},
                                 stdin.fileno(), out_w, err_w, cache=cache)
        finally:
            os.close(out_w)
            os.close(err_w)
            with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
                got = out.read(), err.read()
    return status, *got


@pytest.fixture
def pair_here(tmp_path) -> Config:
    alpha = make_instance(tmp_path / "alpha", "alpha")
    beta = make_instance(tmp_path / "beta", "beta")
    pairing.pair(alpha, pairing.our_token(beta)[0])
    return alpha


def test_the_cache_parses_the_config_again_only_when_its_text_changed(pair_here):
    from peerkit import shell

    cache = shell.Cache()
    first = cache.config(str(pair_here.path))
    assert cache.config(str(pair_here.path)) is first
    text = pair_here.path.read_text()
    pair_here.path.write_text(text.replace("name: alpha", "name: alpha-two"))
    changed = cache.config(str(pair_here.path))
    assert changed is not first and changed.name == "alpha-two"
    status, out, _ = serve_in_process(pair_here, "ping", cache)
    assert status == 0 and json.loads(out)["peer"] == "alpha-two"


def test_the_cache_keeps_one_connection_and_sees_every_change_at_the_next_request(pair_here):
    from peerkit import shell

    cache = shell.Cache()
    assert serve_in_process(pair_here, "ping", cache)[0] == 0
    (store,) = cache._local.stores.values()
    assert serve_in_process(pair_here, "ping", cache)[0] == 0
    assert list(cache._local.stores.values()) == [store]  # the same connection
    # Revoked: refused at the very next request, through that connection.
    with PeerStore(pair_here.db_path) as rw:
        saved = rw.get("beta")
        rw.db.execute("DELETE FROM peers WHERE name = 'beta'")
        rw.db.commit()
    status, out, err = serve_in_process(pair_here, "ping", cache)
    assert (status, out, json.loads(err)) == (PeerRefused.exit_code, b"", {"ok": False, "error": "refused"})
    # A database replaced by another file (a restore) is opened again, not read through the old one.
    copy = pair_here.db_path.with_name("copy.db")
    with PeerStore(copy) as rw:
        rw.put(saved)
    os.replace(copy, pair_here.db_path)
    assert serve_in_process(pair_here, "ping", cache)[0] == 0
    assert list(cache._local.stores.values()) != [store]


def test_the_event_loops_cache_defers_a_request_that_would_wait_for_a_writer(pair_here):
    import sqlite3

    from peerkit import shell

    before = len(events(pair_here))
    writer = sqlite3.connect(pair_here.db_path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(shell.Deferred):
            serve_in_process(pair_here, "ping", shell.Cache(in_loop=True))
        # Nothing was said or recorded: the worker thread that takes it over does both.
        assert len(events(pair_here)) == before
        # Any other cache waits for the writer, as peer-shell always has (here: up to 10 s).
        import threading
        threading.Timer(0.3, lambda: writer.execute("ROLLBACK")).start()
        status, out, _ = serve_in_process(pair_here, "ping", shell.Cache())
        assert status == 0 and json.loads(out)["ok"] is True
    finally:
        writer.close()
    assert len(events(pair_here)) == before + 1
