"""Trust set-up: initialise an instance, issue our token, pair and unpair peers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import authkeys, grammar
from .config import Config, locate, read_config, write_default_config
from .errors import (AuthorizedKeysError, BadName, ConfigError, KeyInUse, NoSuchPeer,
                     PeerExists, SelfPairing)
from .identity import ensure_identity, read_identity
from .keys import PublicKey, host_key_fingerprint, parse_public_key
from .state import KIND_DIRECT, Peer, PeerStore
from .token import Token, emit_token, parse_token


@dataclass
class InitResult:
    """What `peerkit init` did."""

    config: Config
    config_created: bool
    identity_created: bool
    fingerprint: str


def init(config_path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> InitResult:
    """Create the config, directories, identity and database if missing (idempotent)."""
    path = locate(config_path)
    created = write_default_config(path, overrides)
    cfg = read_config(path)
    for directory in (cfg.apps_dir, cfg.backups_dir, cfg.state_dir):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, key_created = ensure_identity(cfg.ssh.identity, f"peerkit:{cfg.name}")
    PeerStore(cfg.db_path).close()
    return InitResult(cfg, created, key_created, key.fingerprint)


def advertised_host_keys(cfg: Config) -> tuple[list[str], list[str]]:
    """Return (fingerprints, warnings) for the host keys our token advertises."""
    fps, warnings = [], []
    paths = list(cfg.ssh.host_keys)
    serve_key = cfg.serve_host_key.with_name(cfg.serve_host_key.name + ".pub")
    if serve_key.exists():
        paths.append(serve_key)  # `peerkit serve` has run here: pin its key too
    for path in paths:
        try:
            fp = host_key_fingerprint(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warnings.append(f"host key {path} not advertised: {exc}")
            continue
        if fp not in fps:
            fps.append(fp)
    return fps, warnings


def our_token(cfg: Config, version: str = "v2") -> tuple[str, list[str]]:
    """Return our pairing token and any warnings about it."""
    key = read_identity(cfg.ssh.identity)
    fps, warnings = advertised_host_keys(cfg) if version == "v2" else ([], [])
    if version == "v2" and not fps:
        warnings.append("no host key advertised: peers will trust the first host key they see")
    token = Token(version, cfg.name, cfg.ssh.user, cfg.ssh.host, cfg.ssh.port, key, tuple(fps))
    return emit_token(token), warnings


@dataclass
class PairResult:
    """What `peerkit pair` did."""

    peer: Peer
    outcome: str  # added, replaced or unchanged
    token: Token


def _check_peer_shell(cfg: Config) -> None:
    # A key line whose forced command does not exist fails closed, but the
    # operator would only find out when the peer calls; say it now.
    if not (cfg.peer_shell.is_file() and os.access(cfg.peer_shell, os.X_OK)):
        raise ConfigError(f"{cfg.path}: peer_shell {cfg.peer_shell} is not an executable file")


def peer_line(cfg: Config, peer: Peer) -> str:
    """Return ``peer``'s authorized_keys line from its record (key, from=, expiry)."""
    key = parse_public_key(peer.config["key"])
    options = []
    sources = peer.permissions.get("from") or []
    if sources:
        # sshd refuses the key from any other source address.
        options.append(f'from="{",".join(sources)}"')
    if peer.expires_at:
        # sshd refuses the key after this time, even if peerkit is not running.
        stamp = datetime.fromisoformat(peer.expires_at).astimezone(timezone.utc)
        options.append(f'expiry-time="{stamp.strftime("%Y%m%d%H%M%S")}Z"')
    return authkeys.render_line(peer.name, key, cfg.peer_shell, cfg.path, tuple(options))


def save_peer(cfg: Config, store: PeerStore, keys: authkeys.AuthorizedKeys, peer: Peer,
              previous: Peer | None) -> str:
    """Write ``peer``'s row and key line together (caller holds the authorized_keys lock)."""
    line = peer_line(cfg, peer)
    store.put(peer)
    outcome = keys.set_peer(peer.name, line)
    try:
        if outcome != "unchanged":
            authkeys.write_authorized_keys(cfg.ssh.authorized_keys, keys)
    except BaseException:
        # Leave no row that claims something the key file does not say.
        if previous is None:
            store.delete(peer.name)
        else:
            store.put(previous)
        raise
    return outcome


def pair(cfg: Config, token_text: str, name: str | None = None, *, replace: bool = False,
         expires_at: datetime | None = None) -> PairResult:
    """Authorize the key in ``token_text`` to run peer-shell as peer ``name``."""
    token = parse_token(token_text)
    peer_name = name or token.name
    if not grammar.is_name(peer_name):
        raise BadName(repr(peer_name[:80]))
    ours = read_identity(cfg.ssh.identity)
    # Authorizing our own key would let anyone holding it (us) in as a peer
    # and usually means the operator pasted the wrong token.
    if ours.blob == token.key.blob:
        raise SelfPairing()
    _check_peer_shell(cfg)
    peer_config = {
        "host": token.host, "port": token.port, "user": token.user,
        "fingerprint": token.fingerprint, "key": token.key.line(),
        "host_key_fingerprints": list(token.host_key_fingerprints),
        "token_version": token.version, "remote_name": token.name,
    }
    with authkeys.lock(cfg.ssh.authorized_keys), PeerStore(cfg.db_path) as store:
        keys = authkeys.read_authorized_keys(cfg.ssh.authorized_keys)
        _check_conflicts(keys, store, peer_name, token.key, replace)
        existing = store.get(peer_name)
        peer = Peer(peer_name, KIND_DIRECT, peer_config,
                    expires_at=expires_at.isoformat(timespec="seconds") if expires_at else None)
        if existing is not None:
            peer.created_at = existing.created_at
            # Re-pairing keeps what the operator granted; a new key starts over.
            if existing.config.get("fingerprint") == token.fingerprint:
                peer.status, peer.last_seen = existing.status, existing.last_seen
                peer.permissions = existing.permissions
                # Re-pairing without a new expiry must not silently lift the old one.
                if expires_at is None:
                    peer.expires_at = existing.expires_at
                recorded = existing.config.get("host_key")
                # The host key seen earlier stays pinned unless the new token
                # pins other keys (the peer re-keyed its sshd).
                if recorded and existing.config.get("host") == token.host and (
                        not token.host_key_fingerprints
                        or host_key_fingerprint(recorded) in token.host_key_fingerprints):
                    peer.config["host_key"] = recorded
        outcome = save_peer(cfg, store, keys, peer, existing)
    return PairResult(peer, outcome, token)


def _check_conflicts(keys: authkeys.AuthorizedKeys, store: PeerStore, name: str,
                     key: PublicKey, replace: bool) -> None:
    for _, entry in keys.entries():
        if entry.b64 != key.b64:
            continue
        if entry.peer is None:
            # sshd uses the first line that matches a key: an existing line
            # for the same key without our restrictions would shadow ours
            # and hand the peer whatever that line allows.
            raise KeyInUse("the key is already in authorized_keys outside peerkit; remove that line first")
        if entry.peer != name:
            # One key, one peer: otherwise audit logs and permissions lie.
            raise KeyInUse(f"already authorized as peer {entry.peer}")
    current = keys.peers().get(name)
    row = store.get(name)
    other_key = (current is not None and current.b64 != key.b64) or (
        row is not None and row.config.get("fingerprint") != key.fingerprint)
    # A second token under a known name may be an impostor: replacing a
    # peer's key takes an explicit --replace.
    if other_key and not replace:
        raise PeerExists(name)


@dataclass
class UnpairResult:
    """What `peerkit unpair` did."""

    name: str
    key_removed: bool
    row_removed: bool


def unpair(cfg: Config, name: str) -> UnpairResult:
    """Revoke ``name``: remove its key line first, then its row."""
    if not grammar.is_name(name):
        raise BadName(repr(name[:80]))
    ak_path = cfg.ssh.authorized_keys
    with authkeys.lock(ak_path), PeerStore(cfg.db_path) as store:
        keys = authkeys.read_authorized_keys(ak_path)
        key_removed = keys.remove_peer(name)
        if key_removed:
            authkeys.write_authorized_keys(ak_path, keys)
        row_removed = store.delete(name)
    if not (key_removed or row_removed):
        raise NoSuchPeer(name)
    return UnpairResult(name, key_removed, row_removed)


def list_peers(cfg: Config) -> list[dict[str, Any]]:
    """Return every peer with whether its key line is present."""
    try:
        keys = authkeys.read_authorized_keys(cfg.ssh.authorized_keys).peers()
    except (OSError, AuthorizedKeysError):
        keys = {}
    with PeerStore(cfg.db_path) as store:
        peers = store.all()
    out = []
    for peer in peers:
        item = peer.to_json()
        item["authorized"] = peer.name in keys
        out.append(item)
    return out
