"""The instance's YAML configuration: locate, load, validate, write defaults.

One file per instance, found by ``--config``, else ``PEERKIT_CONFIG``, else
``~/.config/peerkit/config.yaml``.  Validation is strict: an unknown key, a
wrong type or a bad value is an error naming the key and the file, because a
typo in a trust tool's config should never silently fall back to a default.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, NamedTuple

from . import grammar, yamlcache
from .atomicfile import write_atomic
from .errors import ConfigError, NotInitialized

DEFAULT_PATH = "~/.config/peerkit/config.yaml"
ENV_VAR = "PEERKIT_CONFIG"

# Paths that end up inside an authorized_keys command="..." are run by the
# login shell, so they are limited to characters no shell interprets.
_SHELL_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+@%,-]*", re.ASCII)


# SSHSettings, HookSettings and Config (and command.Request,
# rsyncargs.RsyncRequest, state.Peer) are NamedTuples or plain classes, not
# dataclasses: peer-shell imports them on every SSH call, and `dataclasses`
# costs ~20 ms of its start-up (it imports inspect, and execs code per class).
class SSHSettings(NamedTuple):
    """How peers reach us: what our token advertises and which files sshd reads."""

    user: str
    host: str
    port: int
    identity: Path
    authorized_keys: Path
    host_keys: tuple[Path, ...]
    connect_timeout: int = 10


class HookSettings(NamedTuple):
    """Commands run around a transfer (None means "auto": docker compose if present)."""

    stop: tuple[tuple[str, ...], ...] | None = None
    start: tuple[tuple[str, ...], ...] | None = None
    post_restore: tuple[tuple[str, ...], ...] = ()
    pre_stream: tuple[tuple[str, ...], ...] = ()
    post_stream: tuple[tuple[str, ...], ...] = ()
    pre_backup: str = "tar"
    timeout: int = 600


class Config(NamedTuple):
    """A validated instance configuration (change a copy with ``cfg._replace(...)``)."""

    path: Path
    name: str
    apps_dir: Path
    backups_dir: Path
    state_dir: Path
    peer_shell: Path
    ssh: SSHSettings
    domain: str | None = None
    hooks: HookSettings = HookSettings()
    restic_repository: Path | None = None
    restic_password_file: Path | None = None
    url_rewrite_globs: tuple[str, ...] = ()
    max_app_bytes: int = 1 << 40
    sender_may_skip_backup: bool = False
    link_mbps: int | None = None
    # _validate always passes both; the shared defaults are read-only.
    serve: Mapping[str, Any] = MappingProxyType({})
    raw: Mapping[str, Any] = MappingProxyType({})  # the document as read, before defaults

    @property
    def db_path(self) -> Path:
        return self.state_dir / "peers.db"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "peer-shell.log"

    @property
    def serve_host_key(self) -> Path:
        """The embedded server's host key (generated on its first start)."""
        return self.state_dir / "ssh_host_ed25519_key"


def home() -> Path:
    """Return the current user's home directory."""
    return Path(os.path.expanduser("~"))


def resolve_path(value: str | os.PathLike) -> Path:
    """Resolve ``~`` and relative paths against the user's home."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else home() / path


def locate(explicit: str | os.PathLike | None = None) -> Path:
    """Return the config path from the argument, the environment or the default."""
    if explicit:
        return Path(os.path.abspath(os.path.expanduser(str(explicit))))
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    return resolve_path(DEFAULT_PATH)


def _default_host() -> str:
    """Return the name peers should dial: the FQDN unless it is only localhost."""
    import socket

    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn and not fqdn.startswith("localhost") else socket.gethostname()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _login_name() -> str:
    import getpass

    return getpass.getuser()


def default_peer_shell() -> str:
    """Return the absolute path of the peer-shell installed beside this Python."""
    beside = Path(sys.executable).parent / "peer-shell"
    return str(beside)


def _parse_yaml(text: str, path: Path) -> Any:
    """Return the YAML document in ``text``, refusing duplicate keys."""
    # Imported here: peer-shell mostly reads the parsed form from yamlcache.
    import yaml

    class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        """A safe YAML loader that refuses duplicate keys."""

    def no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        # A duplicate key silently overrides the first one in plain YAML; in a
        # trust config that hides what an operator thinks they configured.
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, no_duplicates)
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def import_config(text: str, path: Path) -> Config:
    """Parse and validate configuration text that was read from ``path``."""
    return _from_document(_parse_yaml(text, path), path)


def _from_document(data: Any, path: Path) -> Config:
    """Validate a parsed config document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return _validate(data, path)


def read_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration file."""
    return config_from_text(*read_config_text(path))


def read_config_text(path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return where the configuration file is and its text."""
    cfg_path = locate(path)
    try:
        return cfg_path, cfg_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotInitialized(f"no configuration at {cfg_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg_path}: cannot read: {exc}") from None


def config_from_text(cfg_path: Path, text: str) -> Config:
    """Parse (through yamlcache) and validate ``text``, read from ``cfg_path``."""
    return _from_document(yamlcache.load(cfg_path, text, lambda t: _parse_yaml(t, cfg_path)), cfg_path)


def write_default_config(path: Path, overrides: dict[str, Any] | None = None) -> bool:
    """Write a default config at ``path`` unless one exists; return True if written."""
    import yaml

    if path.exists():
        return False
    data = defaults()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    _validate(data, path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = "# peerkit instance configuration; see README.md for every key.\n"
    text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    write_atomic(path, text.encode("utf-8"), mode=0o600)
    return True


# -- validation ------------------------------------------------------------

def _want_str(key: str, value: Any, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: key '{key}' must be a non-empty string")
    return value


def _want_path(key: str, value: Any, path: Path) -> Path:
    return resolve_path(_want_str(key, value, path))


def _want_name(key: str, value: Any, path: Path) -> str:
    text = _want_str(key, value, path)
    if not grammar.is_name(text):
        raise ConfigError(f"{path}: key '{key}' must match [a-z0-9][a-z0-9-]{{0,62}}, got {text!r}")
    return text


def _want_user(key: str, value: Any, path: Path) -> str:
    text = _want_str(key, value, path)
    if not grammar.is_user(text):
        raise ConfigError(f"{path}: key '{key}' is not a valid login name: {text!r}")
    return text


def _want_host(key: str, value: Any, path: Path) -> str:
    text = _want_str(key, value, path)
    if not grammar.is_host(text):
        raise ConfigError(f"{path}: key '{key}' is not a valid host name or address: {text!r}")
    return text


def _want_port(key: str, value: Any, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: key '{key}' must be an integer")
    if not 1 <= value <= 65535:
        raise ConfigError(f"{path}: key '{key}' must be between 1 and 65535, got {value}")
    return value


def _want_exe_path(key: str, value: Any, path: Path) -> Path:
    text = _want_str(key, value, path)
    if not _SHELL_SAFE_PATH.fullmatch(text):
        raise ConfigError(
            f"{path}: key '{key}' must be an absolute path of letters, digits and "
            f"'_./+@%,-' (it is run by sshd through the login shell), got {text!r}")
    return Path(text)


def _want_path_list(key: str, value: Any, path: Path) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: key '{key}' must be a list of paths")
    return tuple(_want_path(f"{key}[{i}]", item, path) for i, item in enumerate(value))


def _want_domain(key: str, value: Any, path: Path) -> str | None:
    if value is None:
        return None
    text = _want_str(key, value, path)
    if ":" in text or "." not in text or not grammar.is_host(text):
        raise ConfigError(f"{path}: key '{key}' must be a DNS name such as example.org, got {text!r}")
    return text.lower()


def _want_positive_int(key: str, value: Any, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: key '{key}' must be a positive integer")
    return value


def _want_bool(key: str, value: Any, path: Path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: key '{key}' must be true or false")
    return value


def _want_optional_positive_int(key: str, value: Any, path: Path) -> int | None:
    return None if value is None else _want_positive_int(key, value, path)


def _want_command(key: str, value: Any, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ConfigError(f"{path}: key '{key}' must be a command as a list of non-empty strings")
    return tuple(value)


def _want_hook(key: str, value: Any, path: Path) -> tuple[tuple[str, ...], ...] | None:
    """A hook is "auto", an empty list, one command, or a list of commands."""
    if value == "auto":
        return None
    if value is None or value == []:
        return ()
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return tuple(_want_command(f"{key}[{i}]", v, path) for i, v in enumerate(value))
    return (_want_command(key, value, path),)


def _want_choice(*choices: str) -> Callable[[str, Any, Path], str]:
    def check(key: str, value: Any, path: Path) -> str:
        if value not in choices:
            raise ConfigError(f"{path}: key '{key}' must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _want_optional_path(key: str, value: Any, path: Path) -> Path | None:
    return None if value is None else _want_path(key, value, path)


def _want_glob_list(key: str, value: Any, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: key '{key}' must be a list of file name patterns")
    return tuple(value)


_Validator = Callable[[str, Any, Path], Any]
_Rule = tuple[_Validator, Callable[[], Any]]

DEFAULT_REWRITE_GLOBS = [".env", "*.env", "docker-compose.yml", "compose.yaml", "compose.yml"]

# key -> (validator, default) or a nested section.  Defaults are callables so
# that loading a complete config (peer-shell does, on every SSH call) never
# pays for a DNS look-up it does not need.
_SCHEMA: dict[str, Any] = {
    "name": (_want_name, lambda: grammar.name_from_hostname(_hostname())),
    "domain": (_want_domain, lambda: None),
    "apps_dir": (_want_path, lambda: "~/.local/share/peerkit/apps"),
    "backups_dir": (_want_path, lambda: "~/.local/share/peerkit/backups"),
    "state_dir": (_want_path, lambda: "~/.local/state/peerkit"),
    "peer_shell": (_want_exe_path, default_peer_shell),
    "ssh": {
        "user": (_want_user, _login_name),
        "host": (_want_host, lambda: _default_host()),
        "port": (_want_port, lambda: 22),
        "identity": (_want_path, lambda: "~/.ssh/peerkit-peer"),
        "authorized_keys": (_want_path, lambda: "~/.ssh/authorized_keys"),
        "host_keys": (_want_path_list, lambda: ["/etc/ssh/ssh_host_ed25519_key.pub"]),
        "connect_timeout": (_want_positive_int, lambda: 10),
    },
    "hooks": {
        "stop": (_want_hook, lambda: "auto"),
        "start": (_want_hook, lambda: "auto"),
        "post_restore": (_want_hook, lambda: []),
        # Run by peer-shell around stream-app and rsync sends (the source
        # owner's choice, e.g. pause a container or dump a database).
        "pre_stream": (_want_hook, lambda: []),
        "post_stream": (_want_hook, lambda: []),
        "pre_backup": (_want_choice("tar", "restic"), lambda: "tar"),
        "timeout": (_want_positive_int, lambda: 600),
    },
    "restic": {
        "repository": (_want_optional_path, lambda: None),
        "password_file": (_want_optional_path, lambda: None),
    },
    "url_rewrite": {
        "globs": (_want_glob_list, lambda: list(DEFAULT_REWRITE_GLOBS)),
    },
    "serve": {
        # The embedded server (`peerkit serve`); it listens on ssh.port.
        "listen": (_want_host, lambda: "0.0.0.0"),
        "max_connections": (_want_positive_int, lambda: 64),
        "max_sessions_per_peer": (_want_positive_int, lambda: 4),
        "auth_timeout": (_want_positive_int, lambda: 30),
        "max_auth_failures": (_want_positive_int, lambda: 10),
    },
    "receive": {
        # Whether a pushing peer's --no-pre-backup is honoured; by default
        # every push is backed up first, whatever the sender asks.
        "sender_may_skip_backup": (_want_bool, lambda: False),
    },
    "transfer": {
        # Link speed for --compress auto; null means measured per peer.
        "link_mbps": (_want_optional_positive_int, lambda: None),
    },
    "limits": {
        # The hard cap on what a peer may send for one app, whatever it advertises.
        "max_app_bytes": (_want_positive_int, lambda: 1 << 40),
    },
}


def defaults() -> dict[str, Any]:
    """Return the default configuration as plain YAML-ready data."""
    def build(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: build(v) if isinstance(v, dict) else v[1]() for k, v in schema.items()}
    return build(_SCHEMA)


def _section(data: Any, schema: dict[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: key '{prefix.rstrip('.')}' must be a mapping")
    for key in data:
        if key not in schema:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}'")
    out: dict[str, Any] = {}
    for key, rule in schema.items():
        if isinstance(rule, dict):
            out[key] = _section(data.get(key), rule, f"{prefix}{key}.", path)
        else:
            check, default = rule
            out[key] = check(prefix + key, data[key] if key in data else default(), path)
    return out


def _validate(data: dict, path: Path) -> Config:
    v = _section(data, _SCHEMA, "", path)
    return Config(
        path=path, name=v["name"], domain=v["domain"], apps_dir=v["apps_dir"],
        backups_dir=v["backups_dir"], state_dir=v["state_dir"], peer_shell=v["peer_shell"],
        ssh=SSHSettings(**v["ssh"]), hooks=HookSettings(**v["hooks"]),
        restic_repository=v["restic"]["repository"], restic_password_file=v["restic"]["password_file"],
        url_rewrite_globs=v["url_rewrite"]["globs"], max_app_bytes=v["limits"]["max_app_bytes"],
        sender_may_skip_backup=v["receive"]["sender_may_skip_backup"], link_mbps=v["transfer"]["link_mbps"],
        serve=v["serve"],
        raw=data)
