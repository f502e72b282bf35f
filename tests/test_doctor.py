"""peerkit doctor: one test per condition it checks, each condition built for real.

The instance lives under the test's HOME.  doctor looks the running user up
with ``pwd.getpwuid``; the tests hand it a passwd entry whose home is that
HOME (and whose shell each test chooses), so modes, owners and the login
shell are checked on files the test made, never on the real /root.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from peerkit import doctor, pairing
from peerkit.cli.main import run
from peerkit.config import Config, read_config
from peerkit.state import PeerStore
from tests.conftest import run_peerkit
from tests.support import sshd as harness
from tests.support import ci

VENV_PEER_SHELL = Path(sys.executable).parent / "peer-shell"
NOBODY = pwd.getpwnam("nobody").pw_uid if "nobody" in {p.pw_name for p in pwd.getpwall()} else 65534
HEALTHY_SSHD = "# test sshd_config\nPubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n"
# Every check doctor runs, in its order (the host-key probe last, when asked for).
CHECKS = ["sshd-authorized-keys-file", "sshd-pubkey-authentication", "mode-home", "mode-ssh-dir",
          "mode-authorized-keys", "mode-identity", "peer-shell", "login-shell", "key-lines-without-peer",
          "peers-without-key-line", "key-lines-current"]


class Env:
    """One instance ("alpha", with "beta" paired on it) and the passwd entry doctor sees."""

    def __init__(self, home: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.home = home
        self.tmp = tmp
        self.shell = "/bin/sh"
        # A copy of peer-shell the tests may delete or chmod.
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        self.peer_shell = bin_dir / "peer-shell"
        shutil.copy2(VENV_PEER_SHELL, self.peer_shell)
        os.chmod(self.peer_shell, 0o755)
        overrides = {"name": "alpha", "peer_shell": str(self.peer_shell),
                     "ssh": {"user": "tester", "host": "127.0.0.1", "port": harness.free_port(),
                             "host_keys": [], "connect_timeout": 5}}
        self.cfg: Config = pairing.init(home / ".config" / "peerkit" / "config.yaml", overrides).config
        beta_root = tmp / "beta"
        beta = pairing.init(beta_root / "config.yaml", {
            "name": "beta", "apps_dir": str(beta_root / "apps"), "backups_dir": str(beta_root / "backups"),
            "state_dir": str(beta_root / "state"), "peer_shell": str(self.peer_shell),
            "ssh": {"user": "peer", "host": "beta.example.test", "identity": str(beta_root / "id"),
                    "authorized_keys": str(beta_root / "ak"), "host_keys": []}}).config
        pairing.pair(self.cfg, pairing.our_token(beta)[0])
        self.sshd_config = tmp / "sshd_config"
        self.sshd_config.write_text(HEALTHY_SSHD)
        monkeypatch.setattr(doctor, "pwd", SimpleNamespace(getpwuid=lambda uid: self.passwd()))

    def passwd(self) -> pwd.struct_passwd:
        return pwd.struct_passwd(("tester", "x", os.geteuid(), os.getegid(), "doctor test", str(self.home),
                                  self.shell))

    @property
    def ak(self) -> Path:
        return self.cfg.ssh.authorized_keys

    def findings(self, *, probe: bool = False, sshd_config: Path | None = None) -> dict[str, doctor.Finding]:
        found = asyncio.run(doctor.diagnose(self.cfg, sshd_config=sshd_config or self.sshd_config, probe=probe))
        names = [f.check for f in found]
        assert len(names) == len(set(names)), names
        return {f.check: f for f in found}

    def bad(self, check: str, **kw) -> doctor.Finding:
        """Return ``check``'s finding after asserting it is a problem and every other finding is ok."""
        found = self.findings(**kw)
        finding = found[check]
        assert not finding.ok, finding
        assert not finding.warning, finding
        assert finding.fix, finding
        others = {name: f for name, f in found.items() if name != check and not f.ok}
        assert not others, others
        return finding


@pytest.fixture
def env(isolated_home, tmp_path, monkeypatch) -> Env:
    return Env(isolated_home, tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def sshd_t(tmp_path_factory):
    """Return f(config, user) -> sshd's own effective settings (sshd -T), or None without sshd."""
    if os.geteuid() != 0 or not os.access(harness.SSHD, os.X_OK):
        return lambda *a: None
    key = tmp_path_factory.mktemp("hostkey") / "hk"
    harness.run_root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])

    def effective(config: Path, user: str) -> dict[str, str]:
        out = harness.run_root([harness.SSHD, "-T", "-f", str(config), "-h", str(key),
                                 "-C", f"user={user},host=client.test,addr=192.0.2.9"]).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    return effective


# -- the healthy baseline ----------------------------------------------------------

def test_healthy_instance_has_no_findings(env):
    found = env.findings()
    assert list(found) == CHECKS
    assert all(f.ok and f.fix is None and not f.warning for f in found.values()), found
    with_probe = env.findings(probe=True)
    assert list(with_probe) == CHECKS + ["advertised-host-key"]
    # Nothing listens on ssh.port: only the probe fails.
    assert [name for name, f in with_probe.items() if not f.ok] == ["advertised-host-key"]
    assert "cannot reach" in with_probe["advertised-host-key"].message


@pytest.mark.parametrize("setting", [
    None,  # sshd's default: .ssh/authorized_keys .ssh/authorized_keys2
    ".ssh/authorized_keys",
    "%h/.ssh/authorized_keys",
    "/etc/ssh/keys/%u .ssh/authorized_keys",
    '".ssh/authorized_keys2" "%h/.ssh/authorized_keys"',
])
def test_authorized_keys_file_settings_that_cover_ours(env, setting):
    env.sshd_config.write_text("PubkeyAuthentication yes\n" + (f"AuthorizedKeysFile {setting}\n" if setting else ""))
    assert env.findings()["sshd-authorized-keys-file"].ok


# -- sshd_config ---------------------------------------------------------------------

@pytest.mark.parametrize("setting", [".ssh/other_keys", "/etc/ssh/authorized_keys/%u", "none",
                                     ".ssh/authorized_keys2"])
def test_authorized_keys_file_not_covering_ours(env, sshd_t, setting):
    env.sshd_config.write_text(f"PubkeyAuthentication yes\nAuthorizedKeysFile {setting}\n"
                               "AuthorizedKeysFile .ssh/authorized_keys\n")  # the second is ignored: first wins
    finding = env.bad("sshd-authorized-keys-file")
    assert str(env.ak) in finding.message and str(env.sshd_config) in finding.fix
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["authorizedkeysfile"] == setting


def test_authorized_keys_file_set_in_an_include_file(env, sshd_t):
    conf_d = env.tmp / "sshd_config.d"
    conf_d.mkdir()
    (conf_d / "50-keys.conf").write_text("# central key store\nAuthorizedKeysFile /etc/ssh/authorized_keys/%u\n")
    (conf_d / "README").write_text("AuthorizedKeysFile .ssh/authorized_keys\n")  # not matched by the glob
    env.sshd_config.write_text(f"Include {conf_d}/*.conf\nAuthorizedKeysFile .ssh/authorized_keys\n")
    finding = env.bad("sshd-authorized-keys-file")
    assert "/etc/ssh/authorized_keys/%u" in finding.message
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["authorizedkeysfile"] == "/etc/ssh/authorized_keys/%u"
    # The same include setting ours is fine.
    (conf_d / "50-keys.conf").write_text("AuthorizedKeysFile %h/.ssh/authorized_keys\n")
    env.sshd_config.write_text(f"Include {conf_d}/*.conf\nAuthorizedKeysFile /nowhere/%u\n")
    assert env.findings()["sshd-authorized-keys-file"].ok


def test_match_block_is_not_read_as_global(env, sshd_t):
    # The Match block (in an included file, which ends it) names our file for
    # admins only; everyone else, this user included, gets the global setting.
    conf_d = env.tmp / "conf.d"
    conf_d.mkdir()
    (conf_d / "10-admins.conf").write_text("Match Group admins\n    AuthorizedKeysFile .ssh/authorized_keys\n")
    env.sshd_config.write_text(f"Include {conf_d}/*.conf\nAuthorizedKeysFile /srv/keys/%u\n")
    finding = env.bad("sshd-authorized-keys-file")
    assert "/srv/keys/%u" in finding.message
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["authorizedkeysfile"] == "/srv/keys/%u"
    # And in one file: a Match block that turns things off elsewhere changes nothing here.
    env.sshd_config.write_text("PubkeyAuthentication yes\nMatch Address 10.0.0.0/8\n"
                               "    AuthorizedKeysFile /srv/keys/%u\n    PubkeyAuthentication no\n")
    found = env.findings()
    assert found["sshd-authorized-keys-file"].ok and found["sshd-pubkey-authentication"].ok


@pytest.mark.parametrize("line", ["PubkeyAuthentication no", "pubkeyauthentication No", "  PubkeyAuthentication   no"])
def test_pubkey_authentication_off(env, sshd_t, line):
    env.sshd_config.write_text(f"# off\n{line}\nPubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n")
    finding = env.bad("sshd-pubkey-authentication")
    assert "PubkeyAuthentication no" in finding.message and str(env.sshd_config) in finding.fix
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["pubkeyauthentication"] == "no"


def test_sshd_config_missing(env):
    missing = env.tmp / "no-such-dir" / "sshd_config"
    found = env.findings(sshd_config=missing)
    finding = found["sshd-config"]
    assert not finding.ok and not finding.warning and str(missing) in finding.message and finding.fix
    # It replaces the two sshd checks; the rest still run.
    assert "sshd-authorized-keys-file" not in found and "sshd-pubkey-authentication" not in found
    assert all(f.ok for name, f in found.items() if name != "sshd-config")


# -- modes and owners ------------------------------------------------------------------

def _target(env: Env, label: str) -> Path:
    return {"home": env.home, "ssh-dir": env.ak.parent, "authorized-keys": env.ak}[label]


@pytest.mark.parametrize("label", ["home", "ssh-dir", "authorized-keys"])
@pytest.mark.parametrize("bits", [0o020, 0o002], ids=["group-writable", "world-writable"])
def test_writable_by_group_or_others(env, label, bits):
    path = _target(env, label)
    os.chmod(path, (os.stat(path).st_mode & 0o7777) | bits)
    finding = env.bad(f"mode-{label}")
    assert "writable by group or others" in finding.message and f"chmod go-w {path}" in finding.fix


@pytest.mark.parametrize("label", ["home", "ssh-dir", "authorized-keys"])
def test_owned_by_someone_else(env, label):
    if os.geteuid() != 0:
        pytest.skip("giving a file away (chown) needs root")
    path = _target(env, label)
    os.chown(path, NOBODY, -1)
    finding = env.bad(f"mode-{label}")
    assert f"owned by uid {NOBODY}" in finding.message and "chown tester" in finding.fix


def test_identity_private_key_readable_by_others(env):
    os.chmod(env.cfg.ssh.identity, 0o644)
    finding = env.bad("mode-identity")
    assert "0644" in finding.message and finding.fix == f"chmod 600 {env.cfg.ssh.identity}"


# -- peer-shell and the login shell -------------------------------------------------------

def test_peer_shell_missing(env):
    env.peer_shell.unlink()
    finding = env.bad("peer-shell")
    assert str(env.peer_shell) in finding.message and "is not" in finding.message


def test_peer_shell_not_executable(env):
    os.chmod(env.peer_shell, 0o644)
    assert env.bad("peer-shell")
    os.chmod(env.peer_shell, 0o755)
    env.peer_shell.unlink()
    env.peer_shell.mkdir()  # a directory is not an executable file either
    assert env.bad("peer-shell")


@pytest.mark.parametrize("shell", ["/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"])
def test_login_shell_that_refuses_commands(env, shell):
    env.shell = shell
    finding = env.bad("login-shell")
    assert shell in finding.message and finding.fix == "chsh -s /bin/sh tester"


@pytest.mark.parametrize("shell,rc", [("/bin/bash", ".bashrc"), ("/usr/bin/zsh", ".zshenv"),
                                      ("/usr/bin/fish", ".config/fish/config.fish"), ("/bin/tcsh", ".tcshrc")])
def test_login_shell_that_reads_an_rc_file_is_a_warning(env, shell, rc):
    env.shell = shell
    found = env.findings()
    finding = found["login-shell"]
    assert not finding.ok and finding.warning
    assert str(env.home / rc) in finding.message and finding.fix == "chsh -s /bin/sh tester"
    assert all(f.ok for name, f in found.items() if name != "login-shell")


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/dash", "", "/usr/bin/rbash-like"])
def test_login_shell_ok(env, shell):
    env.shell = shell
    assert env.findings()["login-shell"].ok


# -- key lines and rows ------------------------------------------------------------------

def test_key_line_without_peer_row(env):
    with PeerStore(env.cfg.db_path) as store:
        assert store.delete("beta")
    finding = env.bad("key-lines-without-peer")
    assert "beta" in finding.message and finding.fix == "peerkit unpair beta"


@pytest.mark.parametrize("how", ["damaged", "held by another process"])
def test_a_peer_database_it_cannot_use_is_a_finding_not_a_crash(env, how):
    import sqlite3

    writer = None
    if how == "damaged":
        env.cfg.db_path.write_bytes(b"not a database\n" * 512)
    else:  # doctor waits for it as every command does (10 s), then reports it
        writer = sqlite3.connect(env.cfg.db_path, isolation_level=None)
        writer.execute("BEGIN EXCLUSIVE")
    try:
        found = env.findings()
    finally:
        if writer is not None:
            writer.close()
    finding = found["peer-rows"]
    assert not finding.ok
    assert ("not a database" if how == "damaged" else "database is locked") in finding.message


def test_peer_row_without_key_line(env):
    text = env.ak.read_text()
    kept = [line for line in text.splitlines() if not line.endswith(" peerkit:beta")]
    assert len(kept) == len(text.splitlines()) - 1
    env.ak.write_text("".join(line + "\n" for line in kept))
    finding = env.bad("peers-without-key-line")
    assert "beta" in finding.message and "--replace" in finding.fix


@pytest.mark.parametrize("edit", [
    ("{peer_shell} --config", "/usr/local/bin/peer-shell --config"),  # another peer-shell
    ("--config {config}", "--config /etc/peerkit/old.yaml"),          # another config
    ("restrict,", ""),                                                  # no restrict
    ("restrict,", "no-pty,"),
], ids=["peer-shell", "config", "no-restrict", "no-pty-instead-of-restrict"])
def test_key_line_with_a_stale_command(env, edit):
    old, new = (s.format(peer_shell=env.cfg.peer_shell, config=env.cfg.path) for s in edit)
    text = env.ak.read_text()
    assert text.count(old) == 1
    env.ak.write_text(text.replace(old, new))
    os.chmod(env.ak, 0o600)
    finding = env.bad("key-lines-current")
    assert "beta" in finding.message


def test_key_line_current_after_permission_changes(env):
    # from= and expiry-time= are options of a current line, not staleness.
    from peerkit.permissions import change

    change(env.cfg, "beta", allow=True, sources=("192.0.2.7",))
    assert 'from="192.0.2.7"' in env.ak.read_text()
    assert all(f.ok for f in env.findings().values())


# -- the advertised host key ------------------------------------------------------------------

def test_advertised_host_key_against_a_real_sshd(env, tmp_path, monkeypatch):
    problems = harness.missing_prerequisites()
    if problems:
        ci.unavailable("the advertised host key check against sshd", "; ".join(problems))
    root = harness.make_root("peerkit-doctor-")
    try:
        with harness.Sshd(root / "sshd", ["nobody"]) as server:
            ed25519_pub = server.host_keys["ed25519"].with_name("ssh_host_ed25519_key.pub")
            other = tmp_path / "other_host_key"
            harness.run_root(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])

            def with_host_keys(*paths: Path) -> None:
                text = env.cfg.path.read_text()
                data = text.replace(f"port: {env.cfg.ssh.port}", f"port: {server.port}")
                data = data.replace("host_keys: []", "host_keys: [" + ", ".join(str(p) for p in paths) + "]")
                env.cfg.path.write_text(data)
                env.cfg = read_config(env.cfg.path)
                assert env.cfg.ssh.port == server.port and list(env.cfg.ssh.host_keys) == list(paths)

            with_host_keys(ed25519_pub)
            found = env.findings(probe=True)
            assert all(f.ok for f in found.values()), found
            [fp] = [f for f in server.host_key_fingerprints() if f in found["advertised-host-key"].message]
            assert fp

            env.cfg.path.write_text(env.cfg.path.read_text().replace(str(ed25519_pub), str(other) + ".pub"))
            env.cfg = read_config(env.cfg.path)
            finding = env.bad("advertised-host-key", probe=True)
            assert fp in finding.message and "our token advertises SHA256:" in finding.message
            assert "ssh.host_keys" in finding.fix
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the CLI ------------------------------------------------------------------------------------

def test_cli_exit_16_with_problems(env):
    proc = run_peerkit("doctor", "--json", "--no-probe", "--config", str(env.cfg.path),
                       "--sshd-config", str(env.tmp / "missing_sshd_config"))
    assert proc.returncode == 16, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["error"] == "problems-found"
    assert result["problems"] >= 1
    bad = [f for f in result["findings"] if not f["ok"] and not f["warning"]]
    assert "sshd-config" in [f["check"] for f in bad]
    assert "advertised-host-key" not in [f["check"] for f in result["findings"]]


def test_cli_exit_0_with_only_warnings(env, capsys):
    env.shell = "/bin/bash"
    status = run(["doctor", "--json", "--no-probe", "--config", str(env.cfg.path),
                  "--sshd-config", str(env.sshd_config)])
    out = capsys.readouterr().out
    assert status == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] is True and "error" not in result
    assert (result["problems"], result["warnings"]) == (0, 1)
    [warning] = [f for f in result["findings"] if not f["ok"]]
    assert warning["check"] == "login-shell" and warning["warning"] is True


def test_cli_human_output(env, capsys):
    os.chmod(env.cfg.ssh.identity, 0o640)
    env.shell = "/bin/bash"
    status = run(["doctor", "--no-probe", "--config", str(env.cfg.path), "--sshd-config", str(env.sshd_config)])
    out = capsys.readouterr().out
    assert status == 16
    lines = out.splitlines()
    assert any(l.startswith("BAD   mode-identity") for l in lines)
    assert any(l.startswith("warn  login-shell") for l in lines)
    assert any(l.startswith("ok    peer-shell") for l in lines)
    assert f"fix: chmod 600 {env.cfg.ssh.identity}" in out
    assert lines[-1] == "1 problem(s), 1 warning(s)"


def test_cli_usage_error_for_a_directory_as_sshd_config(env, tmp_path):
    proc = run_peerkit("doctor", "--json", "--no-probe", "--config", str(env.cfg.path),
                       "--sshd-config", str(tmp_path))
    assert proc.returncode == 2
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error"] == "usage"


@pytest.mark.parametrize("line", ["PubkeyAuthentication=no", "PubkeyAuthentication = no",
                                  "pubkeyauthentication\t=\tno", "PubkeyAuthentication= no"])
def test_keyword_equals_value_syntax(env, sshd_t, line):
    # sshd reads `Keyword=value` too; a doctor that did not would miss this.
    env.sshd_config.write_text(f"{line}\nAuthorizedKeysFile .ssh/authorized_keys\n")
    finding = env.bad("sshd-pubkey-authentication")
    assert "PubkeyAuthentication no" in finding.message
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["pubkeyauthentication"] == "no"


def test_match_all_applies_to_everyone(env, sshd_t):
    # `Match all` is not conditional: what it sets overrides the global value.
    env.sshd_config.write_text("PubkeyAuthentication yes\nAuthorizedKeysFile .ssh/authorized_keys\n"
                               "Match User nobody-here\n    PubkeyAuthentication yes\n"
                               "Match all\n    AuthorizedKeysFile /srv/keys/%u\n")
    finding = env.bad("sshd-authorized-keys-file")
    assert "/srv/keys/%u" in finding.message
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["authorizedkeysfile"] == "/srv/keys/%u"


def test_include_inside_a_conditional_match_is_not_global(env, sshd_t):
    conf_d = env.tmp / "admins.d"
    conf_d.mkdir()
    (conf_d / "keys.conf").write_text("PubkeyAuthentication no\n")
    env.sshd_config.write_text("AuthorizedKeysFile .ssh/authorized_keys\n"
                               f"Match Group admins\n    Include {conf_d}/*.conf\n")
    assert env.findings()["sshd-pubkey-authentication"].ok
    seen = sshd_t(env.sshd_config, "tester")
    if seen is not None:
        assert seen["pubkeyauthentication"] == "yes"
