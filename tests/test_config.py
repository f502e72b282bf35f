"""peerkit.config: where the file is, what init writes, and strict validation."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from peerkit import config, grammar
from peerkit.errors import ConfigError, NotInitialized


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- locate -----------------------------------------------------------------

def test_locate_default_is_under_home(isolated_home):
    assert config.locate() == isolated_home / ".config/peerkit/config.yaml"
    assert config.locate(None) == config.locate("")


def test_locate_env_beats_default(isolated_home, monkeypatch, tmp_path):
    monkeypatch.setenv("PEERKIT_CONFIG", str(tmp_path / "env.yaml"))
    assert config.locate() == tmp_path / "env.yaml"
    monkeypatch.setenv("PEERKIT_CONFIG", "~/from-env.yaml")
    assert config.locate() == isolated_home / "from-env.yaml"
    monkeypatch.setenv("PEERKIT_CONFIG", "")
    assert config.locate() == isolated_home / ".config/peerkit/config.yaml"


def test_locate_argument_beats_env(isolated_home, monkeypatch, tmp_path):
    monkeypatch.setenv("PEERKIT_CONFIG", str(tmp_path / "env.yaml"))
    assert config.locate(tmp_path / "arg.yaml") == tmp_path / "arg.yaml"
    assert config.locate("~/arg.yaml") == isolated_home / "arg.yaml"


def test_locate_relative_argument_is_made_absolute_against_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert config.locate("sub/../c.yaml") == tmp_path / "c.yaml"
    assert config.locate("c.yaml").is_absolute()


def test_read_config_follows_the_env_var(monkeypatch, tmp_path):
    path = _write(tmp_path / "x" / "peerkit.yaml", "name: from-env\n")
    monkeypatch.setenv("PEERKIT_CONFIG", str(path))
    cfg = config.read_config()
    assert (cfg.name, cfg.path) == ("from-env", path)
    assert config.read_config(_write(tmp_path / "arg.yaml", "name: from-arg\n")).name == "from-arg"


def test_missing_config_is_not_initialized(tmp_path):
    with pytest.raises(NotInitialized) as info:
        config.read_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in info.value.message


# -- paths ------------------------------------------------------------------

def test_home_and_relative_paths_resolve_against_home(isolated_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    path = _write(tmp_path / "c.yaml", "apps_dir: apps\nbackups_dir: ~/b\nstate_dir: /srv/state\n"
                                       "ssh:\n  identity: keys/id\n  authorized_keys: ~/.ssh/ak\n"
                                       "  host_keys: [hk.pub, /etc/ssh/h.pub, ~/h2.pub]\n")
    cfg = config.read_config(path)
    assert cfg.apps_dir == isolated_home / "apps"
    assert cfg.backups_dir == isolated_home / "b"
    assert cfg.state_dir == Path("/srv/state")
    assert cfg.db_path == Path("/srv/state/peers.db")
    assert cfg.ssh.identity == isolated_home / "keys/id"
    assert cfg.ssh.authorized_keys == isolated_home / ".ssh/ak"
    assert cfg.ssh.host_keys == (isolated_home / "hk.pub", Path("/etc/ssh/h.pub"), isolated_home / "h2.pub")
    assert config.resolve_path("x/y") == isolated_home / "x/y"
    assert config.resolve_path("~") == isolated_home


# -- defaults and init --------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "ssh:\n", "ssh: {}\n"])
def test_empty_file_gives_defaults(isolated_home, tmp_path, text):
    cfg = config.read_config(_write(tmp_path / "c.yaml", text))
    assert cfg.name == grammar.name_from_hostname(socket.gethostname())
    assert cfg.apps_dir == isolated_home / ".local/share/peerkit/apps"
    assert cfg.backups_dir == isolated_home / ".local/share/peerkit/backups"
    assert cfg.state_dir == isolated_home / ".local/state/peerkit"
    assert cfg.peer_shell == Path(config.default_peer_shell())
    assert cfg.ssh.port == 22
    assert cfg.ssh.identity == isolated_home / ".ssh/peerkit-peer"
    assert cfg.ssh.authorized_keys == isolated_home / ".ssh/authorized_keys"
    assert cfg.ssh.host_keys == (Path("/etc/ssh/ssh_host_ed25519_key.pub"),)
    assert grammar.is_user(cfg.ssh.user) and grammar.is_host(cfg.ssh.host)


def test_init_writes_defaults_with_mode_0600(isolated_home):
    path = config.locate()
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        assert config.write_default_config(path) is True
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("# peerkit instance configuration")
    cfg = config.read_config(path)
    assert cfg.apps_dir == isolated_home / ".local/share/peerkit/apps"
    assert cfg.ssh.port == 22
    # Written values are the ~-relative defaults, so the file moves with HOME.
    assert "~/.local/share/peerkit/apps" in path.read_text()
    # Nothing else is left beside it but the parsed form read_config keeps (yamlcache).
    assert sorted(p.name for p in path.parent.iterdir()) == [".config.yaml.parsed.json", "config.yaml"]


def test_init_is_idempotent_and_keeps_file_bytes(tmp_path):
    path = tmp_path / "cfg" / "config.yaml"
    assert config.write_default_config(path, {"name": "alpha", "ssh": {"port": 2222, "host": "a.example"}})
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert config.write_default_config(path, {"name": "beta"}) is False
    assert config.write_default_config(path) is False
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime
    cfg = config.read_config(path)
    assert (cfg.name, cfg.ssh.port, cfg.ssh.host) == ("alpha", 2222, "a.example")


def test_init_with_a_bad_override_writes_nothing(tmp_path):
    path = tmp_path / "cfg" / "config.yaml"
    with pytest.raises(ConfigError) as info:
        config.write_default_config(path, {"ssh": {"port": 70000}})
    assert "'ssh.port'" in info.value.message
    assert not path.exists()


def test_pairing_init_twice_keeps_config_bytes(tmp_path):
    from peerkit import pairing

    path = tmp_path / "inst" / "config.yaml"
    overrides = {"name": "alpha", "state_dir": str(tmp_path / "state"), "apps_dir": str(tmp_path / "apps"),
                 "backups_dir": str(tmp_path / "bk"), "ssh": {"identity": str(tmp_path / "id"), "host": "a.test"}}
    first = pairing.init(path, overrides)
    before = path.read_bytes()
    second = pairing.init(path, overrides)
    assert (first.config_created, second.config_created) == (True, False)
    assert (first.identity_created, second.identity_created) == (True, False)
    assert first.fingerprint == second.fingerprint
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- validation ---------------------------------------------------------------

BAD = {
    # unknown keys
    "unknown top-level key": ("colour: red\n", "colour"),
    "misspelt top-level key": ("apps-dir: /srv/apps\n", "apps-dir"),
    "unknown ssh key": ("ssh:\n  prot: 22\n", "ssh.prot"),
    # wrong types
    "port as string": ("ssh:\n  port: '22'\n", "ssh.port"),
    "port as bool": ("ssh:\n  port: true\n", "ssh.port"),
    "port as float": ("ssh:\n  port: 22.0\n", "ssh.port"),
    "host_keys not a list": ("ssh:\n  host_keys: /etc/ssh/ssh_host_ed25519_key.pub\n", "ssh.host_keys"),
    "host_keys item not a string": ("ssh:\n  host_keys: [5]\n", "ssh.host_keys[0]"),
    "name as int": ("name: 5\n", "name"),
    "name as list": ("name: [a]\n", "name"),
    "name null": ("name:\n", "name"),
    "apps_dir empty": ("apps_dir: ''\n", "apps_dir"),
    "apps_dir mapping": ("apps_dir: {a: 1}\n", "apps_dir"),
    "ssh not a mapping": ("ssh: 5\n", "ssh"),
    # bad values
    "name uppercase": ("name: Bad\n", "name"),
    "name leading dash": ("name: -x\n", "name"),
    "name too long": (f"name: {'a' * 64}\n", "name"),
    "port too big": ("ssh:\n  port: 70000\n", "ssh.port"),
    "port zero": ("ssh:\n  port: 0\n", "ssh.port"),
    "port negative": ("ssh:\n  port: -22\n", "ssh.port"),
    "peer_shell relative": ("peer_shell: bin/peer-shell\n", "peer_shell"),
    "peer_shell with space": ("peer_shell: /opt/peer shell\n", "peer_shell"),
    "peer_shell with double quote": ("peer_shell: '/opt/peer\"shell'\n", "peer_shell"),
    "peer_shell with single quote": ("peer_shell: \"/opt/peer'shell\"\n", "peer_shell"),
    "peer_shell with dollar": ("peer_shell: /opt/$(id)\n", "peer_shell"),
    "peer_shell with semicolon": ("peer_shell: /opt/x;id\n", "peer_shell"),
    "peer_shell with tilde": ("peer_shell: ~/bin/peer-shell\n", "peer_shell"),
    "user leading dash": ("ssh:\n  user: -x\n", "ssh.user"),
    "user with space": ("ssh:\n  user: a b\n", "ssh.user"),
    "host with space": ("ssh:\n  host: a b\n", "ssh.host"),
    "host leading dash": ("ssh:\n  host: -oProxyCommand=x\n", "ssh.host"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_names_the_key_and_the_file(tmp_path, case):
    text, key = BAD[case]
    path = _write(tmp_path / "dir" / "config.yaml", text)
    with pytest.raises(ConfigError) as info:
        config.read_config(path)
    message = info.value.message
    assert f"'{key}'" in message
    assert str(path) in message
    assert info.value.code == "bad-config" and info.value.exit_code == 10


@pytest.mark.parametrize("text", [
    "name: alpha\nname: beta\n",
    "ssh:\n  port: 22\n  port: 2222\n",
    "ssh:\n  port: 22\nssh:\n  port: 2222\n",
    "name: alpha\n'name': alpha\n",
])
def test_duplicate_keys_are_refused(tmp_path, text):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        config.read_config(path)
    assert "duplicate key" in info.value.message
    assert str(path) in info.value.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", "name: [unclosed\n", "\tname: x\n",
                                  "name: !!python/object:os.system x\n"])
def test_non_mapping_or_invalid_yaml_is_refused(tmp_path, text):
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        config.read_config(path)
    assert str(path) in info.value.message


def test_unreadable_config_is_a_config_error(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError):
        config.read_config(tmp_path / "dir.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError):
        config.read_config(tmp_path / "latin1.yaml")


def test_valid_values_near_the_edges_are_accepted(tmp_path):
    path = _write(tmp_path / "c.yaml", f"name: {'a' * 63}\npeer_shell: /opt/peer-kit_1.0/bin/peer-shell\n"
                                       "ssh:\n  port: 65535\n  user: _svc.user-1\n  host: '2001:db8::1'\n"
                                       "  host_keys: []\n")
    cfg = config.read_config(path)
    assert cfg.name == "a" * 63
    assert cfg.peer_shell == Path("/opt/peer-kit_1.0/bin/peer-shell")
    assert (cfg.ssh.port, cfg.ssh.user, cfg.ssh.host, cfg.ssh.host_keys) == (65535, "_svc.user-1", "2001:db8::1", ())
