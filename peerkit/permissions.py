"""Per-peer permissions and expiry: what a paired peer may do, and until when.

Permissions live in the peer's row and are enforced by peer-shell on every
call (apps, push); the source-address restriction is also written into the
key line as OpenSSH's ``from=``, and expiry as ``expiry-time=``, so sshd
enforces them before peer-shell even starts.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone

from . import authkeys, grammar
from .config import Config
from .errors import BadPermission, BadSlug
from .pairing import save_peer
from .state import Peer, PeerStore


def parse_source(text: str) -> str:
    """Return ``text`` as a normalised address or CIDR for ``from=``."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        # Only addresses: host name patterns depend on reverse DNS, which
        # whoever controls the source address also controls.
        raise BadPermission(f"{text[:80]!r} is not an IP address or CIDR block") from None
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def parse_expiry(expires: str | None = None, ttl: str | None = None,
                 now: datetime | None = None) -> datetime | None:
    """Return when access ends, from ``--expires DATE`` or ``--ttl 7d`` (UTC)."""
    if expires and ttl:
        raise BadPermission("give --expires or --ttl, not both")
    now = now or datetime.now(timezone.utc)
    if ttl:
        span = grammar.parse_duration(ttl)
        if span is None:
            raise BadPermission(f"--ttl {ttl[:40]!r}: use a number and m, h, d or w, e.g. 7d")
        when = now + span
    elif expires:
        try:
            when = datetime.fromisoformat(expires.replace("Z", "+00:00"))
        except ValueError:
            raise BadPermission(f"--expires {expires[:40]!r}: use YYYY-MM-DD or an ISO 8601 time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)  # a bare date: the start of that day, UTC
    else:
        return None
    when = when.astimezone(timezone.utc).replace(microsecond=0)
    if when <= now:
        raise BadPermission(f"{when.isoformat()} is already past")
    return when


def change(cfg: Config, name: str, *, allow: bool, apps: tuple[str, ...] = (), all_apps: bool = False,
           push: bool = False, sources: tuple[str, ...] = ()) -> Peer:
    """Grant (``allow``) or withdraw permissions of peer ``name``; return the updated peer."""
    from .client import get_peer

    for slug in apps:
        if not grammar.is_slug(slug):
            raise BadSlug(repr(slug[:80]))
    if not (apps or all_apps or push or sources):
        raise BadPermission("nothing to change: give --app, --all-apps, --push or --from")
    with authkeys.lock(cfg.ssh.authorized_keys), PeerStore(cfg.db_path) as store:
        current = get_peer(store, name)
        perms = {**current.permissions, "deny_apps": list(current.permissions["deny_apps"]),
                 "from": list(current.permissions["from"])}
        if isinstance(perms["apps"], list):
            perms["apps"] = list(perms["apps"])
        if all_apps:
            perms["apps"], perms["deny_apps"] = ("all" if allow else []), []
        for slug in apps:
            if allow:
                perms["deny_apps"] = [s for s in perms["deny_apps"] if s != slug]
                if perms["apps"] != "all" and slug not in perms["apps"]:
                    perms["apps"].append(slug)
            else:
                if perms["apps"] != "all":
                    perms["apps"] = [s for s in perms["apps"] if s != slug]
                elif slug not in perms["deny_apps"]:
                    perms["deny_apps"].append(slug)
        if push:
            perms["push"] = allow
        if sources:
            perms["from"] = _change_sources(perms["from"], sources, allow)
        for key in ("apps", "deny_apps"):
            if isinstance(perms[key], list):
                perms[key] = sorted(perms[key])
        updated = current.replace(permissions=perms)
        keys = authkeys.read_authorized_keys(cfg.ssh.authorized_keys)
        save_peer(cfg, store, keys, updated, current)
    return updated


def _change_sources(current: list[str], sources: tuple[str, ...], allow: bool) -> list[str]:
    if allow and "any" in sources:
        if len(sources) > 1:
            raise BadPermission("--from any lifts the restriction; give it alone")
        return []
    wanted = [parse_source(s) for s in sources]
    if allow:
        return sorted(set(current) | set(wanted))
    remaining = sorted(set(current) - set(wanted))
    # An empty from= list means "from anywhere": withdrawing the last address
    # must never silently widen access.
    if current and not remaining:
        raise BadPermission("that would leave no allowed source; use `peerkit unpair` or "
                            "`peerkit allow PEER --from any` to lift the restriction")
    if not current:
        raise BadPermission("this peer has no source restriction; use `peerkit allow PEER --from ADDR`")
    return remaining


def describe(peer: Peer) -> str:
    """Return the peer's permissions in a few words, for tables."""
    perms = peer.permissions
    apps = "all apps" if perms["apps"] == "all" else (", ".join(perms["apps"]) or "no apps")
    if perms["deny_apps"]:
        apps += " except " + ", ".join(perms["deny_apps"])
    parts = [apps, "push" if perms["push"] else "no push"]
    if perms["from"]:
        parts.append("from " + ", ".join(perms["from"]))
    return "; ".join(parts)
