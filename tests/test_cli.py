"""The peerkit command, run as a user runs it: output, --json, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_peerkit
from peerkit import pairing
from peerkit.cli.main import cli, run
from peerkit.config import read_config
from peerkit.token import parse_token


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr: {proc.stderr}"
    obj = json.loads(lines[-1])
    assert isinstance(obj, dict)
    return obj


@contextlib.contextmanager
def home_of(home: Path):
    """Make ``home`` the HOME of this process for the block."""
    old = os.environ["HOME"]
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        os.environ["HOME"] = old


class Instance:
    """One peerkit instance: its own HOME, driven through the CLI."""

    def __init__(self, home: Path, name: str) -> None:
        self.home, self.name = home, name
        home.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the real CLI in a subprocess."""
        return run_peerkit(*args, env={"HOME": str(self.home), **(env or {})})

    def run_here(self, *args: str) -> tuple[int, str, str]:
        """Run the same CLI entry point in this process (for big tables); return (status, out, err)."""
        out, err = io.StringIO(), io.StringIO()
        with home_of(self.home), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = run(list(args))
        return status, out.getvalue(), err.getvalue()

    def quick_init(self) -> None:
        """Initialise through the library (the CLI's init is tested on its own)."""
        with home_of(self.home):
            pairing.init(None, {"name": self.name, "ssh": {"host": f"{self.name}.example.test", "port": 2222,
                                                           "user": "peer"}})

    def quick_token(self, version: str = "v2") -> str:
        with home_of(self.home):
            return pairing.our_token(read_config(), version)[0]

    @property
    def config(self) -> Path:
        return self.home / ".config/peerkit/config.yaml"

    @property
    def authorized_keys(self) -> Path:
        return self.home / ".ssh/authorized_keys"

    def init(self) -> dict:
        proc = self.run("init", "--json", "--name", self.name, "--host", f"{self.name}.example.test",
                        "--port", "2222", "--user", "peer")
        assert proc.returncode == 0, proc.stderr
        return last_json(proc)

    def token(self, *args: str) -> str:
        proc = self.run("token", *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()


@pytest.fixture
def alpha(tmp_path) -> Instance:
    inst = Instance(tmp_path / "alpha-home", "alpha")
    inst.quick_init()
    return inst


@pytest.fixture
def beta(tmp_path) -> Instance:
    inst = Instance(tmp_path / "beta-home", "beta")
    inst.quick_init()
    return inst


# -- init ----------------------------------------------------------------------

def test_init_human_then_idempotent(tmp_path):
    inst = Instance(tmp_path / "h", "alpha")
    first = inst.run("init", "--name", "alpha", "--host", "alpha.example.test")
    assert first.returncode == 0, first.stderr
    assert f"wrote config   {inst.config}" in first.stdout
    assert "generated identity" in first.stdout and "peer name      alpha" in first.stdout
    assert inst.config.exists() and (inst.home / ".ssh/peerkit-peer").exists()
    before = inst.config.read_bytes()
    second = inst.run("init", "--name", "other")
    assert second.returncode == 0
    assert "kept config" in second.stdout and "kept identity" in second.stdout
    assert "already exists" in second.stderr
    assert inst.config.read_bytes() == before


def test_init_json(tmp_path):
    inst = Instance(tmp_path / "h", "alpha")
    out = inst.init()
    assert out["ok"] is True and out["name"] == "alpha"
    assert out["config"] == str(inst.config) and out["config_created"] is True
    assert out["identity_created"] is True
    keygen = subprocess.run(["ssh-keygen", "-lf", str(inst.home / ".ssh/peerkit-peer.pub")], capture_output=True,
                            text=True, check=True).stdout.split()[1]
    assert out["fingerprint"] == keygen
    status, stdout, _ = inst.run_here("init", "--json")
    again = json.loads(stdout.splitlines()[-1])
    assert status == 0
    assert (again["config_created"], again["identity_created"], again["fingerprint"]) == (False, False, keygen)


def test_init_with_bad_value_is_a_config_error(tmp_path):
    inst = Instance(tmp_path / "h", "alpha")
    status, out, _ = inst.run_here("init", "--json", "--name", "Bad_Name")
    assert status == 10
    out = json.loads(out.splitlines()[-1])
    assert out["ok"] is False and out["error"] == "bad-config" and "'name'" in out["message"]
    assert not inst.config.exists()


# -- token -----------------------------------------------------------------------

def test_token_prints_only_the_token(alpha):
    proc = alpha.run("token")
    assert proc.returncode == 0
    assert proc.stdout.count("\n") == 1
    tok = parse_token(proc.stdout)
    assert (tok.version, tok.name, tok.user, tok.host, tok.port) == ("v2", "alpha", "peer", "alpha.example.test", 2222)
    assert "credential" in proc.stderr
    assert proc.stdout.strip() not in proc.stderr


def test_token_v1_and_json(alpha):
    status, v1, _ = alpha.run_here("token", "--format", "v1")
    assert status == 0 and v1.count("\n") == 1
    assert v1.startswith("lp-peer|v1|alpha|peer|alpha.example.test|2222|")
    assert parse_token(v1).version == "v1"
    proc = alpha.run("token", "--json")
    out = last_json(proc)
    assert out["ok"] is True and out["format"] == "v2" and out["name"] == "alpha"
    assert parse_token(out["token"]).name == "alpha"
    assert proc.stdout.count("\n") == 1


def test_token_before_init_is_not_initialized(tmp_path):
    inst = Instance(tmp_path / "h", "x")
    status, out, err = inst.run_here("token")
    assert status == 11 and out == ""
    assert err.startswith("peerkit: error: ")
    proc = inst.run("token", "--json")
    assert proc.returncode == 11 and last_json(proc)["error"] == "not-initialized"


# -- pair, peers, unpair ------------------------------------------------------------

def test_pair_peers_unpair_human(alpha, beta):
    token = beta.quick_token()
    proc = alpha.run("pair", token)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("paired with beta (peer@beta.example.test:2222)")
    status, out, _ = alpha.run_here("pair", token)
    assert status == 0 and out.startswith("already paired with beta")
    lines = alpha.authorized_keys.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" peerkit:beta")
    peers = alpha.run("peers")
    assert peers.returncode == 0
    header, row = peers.stdout.splitlines()
    assert header.split() == ["NAME", "STATUS", "LAST", "SEEN", "ADDRESS", "EXPIRES", "MAY"]
    assert row.split() == ["beta", "new", "never", "peer@beta.example.test:2222", "never",
                           "all", "apps;", "no", "push"]
    proc = alpha.run("unpair", "beta")
    assert proc.returncode == 0
    assert proc.stdout == "unpaired beta: its key can no longer log in here\n"
    assert alpha.authorized_keys.read_text() == ""
    status, out, _ = alpha.run_here("peers")
    assert status == 0 and out.startswith("no peers yet")


def test_pair_peers_unpair_json(alpha, beta):
    token = beta.quick_token()
    out = last_json(alpha.run("pair", "--json", token, "backup-site"))
    assert out["ok"] is True and out["outcome"] == "added"
    assert out["peer"]["name"] == "backup-site" and out["peer"]["remote_name"] == "beta"
    status, stdout, _ = alpha.run_here("--json", "pair", token, "backup-site")
    assert status == 0 and json.loads(stdout.splitlines()[-1])["outcome"] == "unchanged"
    status, stdout, _ = alpha.run_here("peers", "--json")
    peers = json.loads(stdout.splitlines()[-1])
    assert [(p["name"], p["authorized"], p["port"]) for p in peers["peers"]] == [("backup-site", True, 2222)]
    out = last_json(alpha.run("unpair", "--json", "backup-site"))
    assert out == {"ok": True, "peer": "backup-site", "key_removed": True, "row_removed": True}
    status, stdout, _ = alpha.run_here("peers", "--json")
    assert json.loads(stdout.splitlines()[-1]) == {"ok": True, "peers": []}


def test_pairing_both_ways(alpha, beta):
    assert alpha.run("pair", beta.quick_token()).returncode == 0
    assert beta.run_here("pair", alpha.quick_token("v1"))[0] == 0
    assert alpha.authorized_keys.read_text().rstrip().endswith("peerkit:beta")
    assert beta.authorized_keys.read_text().rstrip().endswith("peerkit:alpha")


def test_config_option_and_env_select_the_instance(alpha, tmp_path):
    elsewhere = Instance(tmp_path / "elsewhere", "nobody")  # a HOME without any instance
    for args, env in ((["--config", str(alpha.config), "peers", "--json"], None),
                      (["peers", "--json", "--config", str(alpha.config)], None),
                      (["peers", "--json"], {"PEERKIT_CONFIG": str(alpha.config)})):
        proc = elsewhere.run(*args, env=env)
        assert proc.returncode == 0, proc.stderr
        assert last_json(proc) == {"ok": True, "peers": []}
    assert elsewhere.run_here("peers")[0] == 11


# -- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("args,code,status", [
    (["pair", "garbage"], "not-a-token", 21),
    (["unpair", "nobody"], "no-such-peer", 30),
])
def test_errors_in_a_real_process(alpha, args, code, status):
    proc = alpha.run(*args, "--json")
    assert proc.returncode == status
    assert last_json(proc) == {"ok": False, "error": code, "message": proc.stderr[len("peerkit: error: "):].strip()}
    assert proc.stderr.startswith("peerkit: error: ") and proc.stderr.count("\n") == 1


def _errors(alpha: Instance, beta: Instance) -> list[tuple[list[str], str, int]]:
    token = beta.quick_token()
    body, _ = token.rsplit("|", 1)
    return [
        (["pair", "garbage"], "not-a-token", 21),
        (["pair", ""], "not-a-token", 21),
        (["pair", "lp-peer|v9|x"], "unsupported-version", 22),
        (["pair", body + "|" + "0" * 16], "checksum-mismatch", 25),
        (["pair", token.replace("|beta|", "|Beta|", 1)], "checksum-mismatch", 25),
        (["pair", alpha.quick_token()], "self-pairing", 34),
        (["pair", token, "Bad"], "bad-name", 33),
        (["unpair", "nobody"], "no-such-peer", 30),
        (["unpair", "../x"], "bad-name", 33),
    ]


def test_errors_with_json_and_exit_codes(alpha, beta):
    for args, code, status in _errors(alpha, beta):
        got, out, err = alpha.run_here(*args, "--json")
        assert got == status, (args, out, err)
        obj = json.loads(out.splitlines()[-1])
        assert obj == {"ok": False, "error": code, "message": obj["message"]} and obj["message"], args
        got, out, err = alpha.run_here(*args)
        assert got == status and out == ""
        assert err.startswith("peerkit: error: ") and err.count("\n") == 1
    assert not alpha.authorized_keys.exists()


def test_key_conflicts_exit_codes(alpha, beta, tmp_path):
    assert alpha.run_here("pair", beta.quick_token())[0] == 0
    impostor = Instance(tmp_path / "impostor", "beta")
    impostor.quick_init()
    proc = alpha.run("pair", "--json", impostor.quick_token())
    assert proc.returncode == 31 and last_json(proc)["error"] == "peer-exists"
    status, out, _ = alpha.run_here("pair", "--json", beta.quick_token(), "beta-two")
    assert status == 32 and json.loads(out.splitlines()[-1])["error"] == "key-in-use"
    status, out, _ = alpha.run_here("pair", "--json", "--replace", impostor.quick_token())
    assert status == 0 and json.loads(out.splitlines()[-1])["outcome"] == "replaced"


def test_usage_error_in_a_real_process(alpha):
    proc = alpha.run("pair")
    assert proc.returncode == 2 and proc.stdout == "" and "Usage:" in proc.stderr
    proc = alpha.run("pair", "--json")
    assert proc.returncode == 2
    out = last_json(proc)
    assert out["ok"] is False and out["error"] == "usage" and out["message"]


@pytest.mark.parametrize("args", [["pair"], ["frobnicate"], ["init", "--port", "abc"], ["token", "--format", "v3"],
                                  ["unpair"], ["peers", "extra"], ["--no-such-option"]])
def test_usage_errors_exit_2(alpha, args):
    status, out, err = alpha.run_here(*args)
    assert status == 2
    assert out == ""
    assert "Usage:" in err or "Error" in err
    status, out, err = alpha.run_here(*args, "--json")
    assert status == 2
    obj = json.loads(out.splitlines()[-1])
    assert obj["ok"] is False and obj["error"] == "usage" and obj["message"]


def test_group_help_in_a_real_process():
    proc = run_peerkit("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: peerkit") and "Example" in proc.stdout
    for name in ("init", "token", "pair", "unpair", "peers"):
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_help_shows_an_example(tmp_path, command):
    status, out, _ = Instance(tmp_path / "h", "x").run_here(command, "--help")
    assert status == 0
    assert out.startswith(f"Usage: peerkit {command}")
    assert "Example" in out


def test_trust_commands_are_registered():
    assert {"init", "token", "pair", "unpair", "peers"} <= set(cli.commands)


def test_version(tmp_path):
    from peerkit import __version__

    status, out, _ = Instance(tmp_path / "h", "x").run_here("--version")
    assert status == 0 and out == f"peerkit, version {__version__}\n"


# -- start-up: the CLI is imported without garbage collection, and runs with it ---------------------

@pytest.mark.parametrize("command, connects", [("pull", True), ("push", True), ("ping", True), ("apps", True),
                                               ("peers", False), ("token", False), (None, False)])
def test_the_cli_loads_with_the_collector_off_and_runs_with_it_on(command, connects):
    code = ("import gc, sys; from peerkit.cli import launch; launch.load(%r); "
            "print(gc.isenabled(), gc.get_freeze_count() > 10000, 'asyncssh' in sys.modules, "
            "'peerkit.cli.main' in sys.modules)" % command)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    # Back on (serve, web and the agent run for days); what the imports made frozen; asyncssh only
    # for the commands that connect (the others would pay 45 ms for nothing).
    assert out == ["True", "True", str(connects), "True"]


def test_what_the_cli_preloads_are_its_commands():
    from peerkit.cli import launch
    from peerkit.cli.main import cli

    assert set(launch.PRELOAD) <= set(cli.commands)
