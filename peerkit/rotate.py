"""Key rotation: replace our identity on every reachable peer, then retire the old key.

Each peer swaps our old key line for the new key in one atomic write of its
authorized_keys, on a request authenticated by the old key (the
``replace-key`` verb), so a peer either accepts the new key or keeps the old
one.  We then check the new key really logs in, and only at the end replace
our own key pair.  Peers that could not be reached keep the old key, which no
longer exists here: they are listed with our new token to re-pair by hand.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import authkeys
from .atomicfile import fsync_dir
from .config import Config
from .errors import KeyInUse, PeerkitError, PeerRefused, ProtocolError
from .identity import ensure_identity, public_path, read_identity
from .keys import ED25519, PublicKey, decode_blob
from .state import PeerStore


def accept_new_key(cfg: Config, peer_name: str, b64: str) -> dict[str, Any]:
    """Peer-shell side of ``replace-key``: swap ``peer_name``'s key for the new one."""
    from .pairing import _check_conflicts, save_peer

    try:
        key = PublicKey(ED25519, decode_blob(ED25519, b64))
    except ValueError:
        raise PeerRefused("replace-key: malformed key") from None
    with authkeys.lock(cfg.ssh.authorized_keys), PeerStore(cfg.db_path) as store:
        keys = authkeys.read_authorized_keys(cfg.ssh.authorized_keys)
        current = store.get(peer_name)
        if current is None:
            raise PeerRefused(f"replace-key: {peer_name} is not paired")
        try:
            # The same checks as pairing: the new key must not already open
            # another door (another peer's line or an unrestricted line).
            _check_conflicts(keys, store, peer_name, key, replace=True)
        except KeyInUse as exc:
            raise PeerRefused(f"replace-key: {exc.detail}") from None
        updated = current.replace(config={**current.config, "key": key.line(),
                                          "fingerprint": key.fingerprint})
        save_peer(cfg, store, keys, updated, current)
    return {"ok": True, "peer": cfg.name, "fingerprint": key.fingerprint}


@dataclass
class RotateResult:
    """What `peerkit rotate-key` did."""

    old_fingerprint: str
    new_fingerprint: str
    peers: list[dict[str, Any]] = field(default_factory=list)
    token: str = ""


async def _rotate_one(cfg: Config, store: PeerStore, name: str, new: PublicKey,
                      next_identity: Path) -> dict[str, Any]:
    from .client import connect, ping

    peer = store.get(name)
    assert peer is not None
    try:
        conn = await connect(cfg, peer, store)
        async with conn:
            reply = await conn.call_json(f"replace-key {new.b64}")
        if reply.get("ok") is not True or reply.get("fingerprint") != new.fingerprint:
            raise ProtocolError(f"{name}: unexpected replace-key reply")
    except PeerkitError as exc:
        if exc.code == "refused" and await _accepts(cfg, store, peer, next_identity):
            # An interrupted earlier run had already moved this peer to the new key.
            return {"peer": name, "outcome": "rotated"}
        return {"peer": name, "outcome": "kept-old-key", "error": exc.code, "message": exc.message}
    try:
        check = await connect(cfg, peer, store, identity=next_identity)
        async with check:
            await ping(check)
    except PeerkitError as exc:
        return {"peer": name, "outcome": "rotated-unverified", "error": exc.code, "message": exc.message}
    return {"peer": name, "outcome": "rotated"}


async def _accepts(cfg: Config, store: PeerStore, peer: Any, identity: Path) -> bool:
    from .client import connect, ping

    try:
        check = await connect(cfg, peer, store, identity=identity)
        async with check:
            await ping(check)
    except PeerkitError:
        return False
    return True


async def rotate_key(cfg: Config, note: Callable[[str], None] | None = None) -> RotateResult:
    """Make a new identity, move every reachable peer to it, retire the old one."""
    from .pairing import our_token

    old = read_identity(cfg.ssh.identity)
    next_identity = cfg.ssh.identity.with_name(cfg.ssh.identity.name + ".next")
    # A complete pair left by an interrupted rotation may already be trusted
    # by the peers it reached: keep it (deleting it would lock them out).  A
    # lone half was never sent to anyone.
    if not (next_identity.exists() and public_path(next_identity).exists()):
        for leftover in (next_identity, public_path(next_identity)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    new, _ = ensure_identity(next_identity, f"peerkit:{cfg.name}")
    result = RotateResult(old.fingerprint, new.fingerprint)
    with PeerStore(cfg.db_path) as store:
        names = [p.name for p in store.all()]
        for name in names:
            outcome = await _rotate_one(cfg, store, name, new, next_identity)
            result.peers.append(outcome)
            if note is not None and outcome["outcome"] != "rotated":
                note(f"{name}: {outcome['outcome']} ({outcome.get('message')})")
    # Retire the old key: the new pair takes its place, private half first.
    os.rename(next_identity, cfg.ssh.identity)
    os.rename(public_path(next_identity), public_path(cfg.ssh.identity))
    fsync_dir(cfg.ssh.identity.parent)
    result.token, _ = our_token(cfg)
    return result
