"""CLI commands for the trust lifecycle: verify, allow, deny, rotate-key, doctor, audit."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import click

from .. import grammar
from ..config import read_config
from ..errors import PeersBehind, ProblemsFound
from .main import Context, common_options


@click.command(epilog="Example: peerkit verify beta")
@click.argument("peer")
@common_options
def verify(obj: Context, peer: str) -> None:
    """Show the verification code shared with PEER (both operators must see the same)."""
    from ..client import get_peer
    from ..identity import read_identity
    from ..state import PeerStore
    from ..verify import verification_code

    cfg = read_config(obj.config)
    with PeerStore(cfg.db_path) as store:
        row = get_peer(store, peer)
    ours = read_identity(cfg.ssh.identity).fingerprint
    code = verification_code(ours, row.config["fingerprint"])
    obj.emit({"peer": peer, "verification_code": code, "our_fingerprint": ours,
              "peer_fingerprint": row.config["fingerprint"]},
             f"{code}\n(read it aloud with {peer}'s operator: a different code means a swapped token)")


def _permission_command(allow: bool):
    verb = "allow" if allow else "deny"
    examples = ("peerkit allow beta --app wiki --app blog\n  peerkit allow beta --push\n"
                "  peerkit allow beta --from 203.0.113.7 --from 2001:db8::/64\n  peerkit allow beta --from any"
                if allow else
                "peerkit deny beta --app wiki\n  peerkit deny beta --all-apps\n  peerkit deny beta --push\n"
                "  peerkit deny beta --from 203.0.113.7")

    @click.command(verb, epilog=f"\b\nExamples:\n  {examples}")
    @click.argument("peer")
    @click.option("--app", "apps", multiple=True, metavar="SLUG", help=f"{verb.title()} this app (repeatable).")
    @click.option("--all-apps", is_flag=True, help="Every app." if allow else "No app at all.")
    @click.option("--push", is_flag=True, help=f"{verb.title()} pushing apps to us.")
    @click.option("--from", "sources", multiple=True, metavar="ADDR",
                  help="Source address or CIDR the key may be used from (repeatable; 'any' lifts it)."
                  if allow else "Remove a source address or CIDR (repeatable).")
    @common_options
    def command(obj: Context, peer: str, apps: tuple[str, ...], all_apps: bool, push: bool,
                sources: tuple[str, ...]) -> None:
        from ..permissions import change, describe

        cfg = read_config(obj.config)
        updated = change(cfg, peer, allow=allow, apps=apps, all_apps=all_apps, push=push, sources=sources)
        obj.emit({"peer": peer, "permissions": updated.permissions},
                 f"{peer} may now: {describe(updated)} (effective on its next call)")

    command.help = (f"{'Grant' if allow else 'Withdraw'} permissions of PEER; enforced by peer-shell "
                    f"on its next call (--from also by sshd).")
    return command


allow = _permission_command(True)
deny = _permission_command(False)


@click.command("rotate-key", epilog="Example: peerkit rotate-key --json")
@common_options
def rotate_key(obj: Context) -> int:
    """Replace our identity key on every reachable peer, then retire the old one.

    Peers that cannot be reached keep the old key and are listed with our new
    token, to re-pair by hand; then the exit code is 17 (peers-behind).
    """
    from ..rotate import rotate_key as rotate

    cfg = read_config(obj.config)
    result = asyncio.run(rotate(cfg, obj.note))
    behind = [p for p in result.peers if p["outcome"] == "kept-old-key"]
    unconfirmed = [p for p in result.peers if p["outcome"] == "rotated-unverified"]

    def human() -> None:
        click.echo(f"new key {result.new_fingerprint} (was {result.old_fingerprint})")
        for p in result.peers:
            click.echo(f"  {p['peer']:<24} {p['outcome']}" + (f"  ({p['error']})" if p.get("error") else ""))
        if behind:
            click.echo("These peers still trust the retired key; ask their operators to run:")
            click.echo(f"  peerkit pair --replace '{result.token}' {cfg.name}")
        if unconfirmed:
            click.echo("These peers took the new key but did not answer with it; check with: "
                       + ", ".join(f"peerkit ping {p['peer']}" for p in unconfirmed))

    payload: dict = {"old_fingerprint": result.old_fingerprint, "new_fingerprint": result.new_fingerprint,
                     "peers": result.peers, "token": result.token}
    # A script must not read "rotated" as "every peer follows": say so in the exit code.
    lagging = bool(behind or unconfirmed)
    if lagging:
        payload["error"] = PeersBehind.code
    obj.emit(payload, human, ok=not lagging)
    return PeersBehind.exit_code if lagging else 0


@click.command(epilog="""\b
Examples:
  peerkit doctor
  peerkit doctor --no-probe --sshd-config /etc/ssh/sshd_config""")
@click.option("--sshd-config", type=click.Path(dir_okay=False, path_type=Path),
              default="/etc/ssh/sshd_config", show_default=True, help="The sshd configuration to check.")
@click.option("--probe/--no-probe", default=True, help="Connect to our sshd to compare its host key.")
@common_options
def doctor(obj: Context, sshd_config: Path, probe: bool) -> int:
    """Check what makes pairing silently fail or leak, and say how to fix each."""
    from ..doctor import diagnose

    cfg = read_config(obj.config)
    findings = asyncio.run(diagnose(cfg, sshd_config=sshd_config, probe=probe))
    problems = [f for f in findings if not f.ok and not f.warning]
    warnings = [f for f in findings if not f.ok and f.warning]

    def human() -> None:
        for f in findings:
            mark = "ok  " if f.ok else ("warn" if f.warning else "BAD ")
            click.echo(f"{mark}  {f.check:<28} {f.message}")
            if f.fix:
                click.echo(f"      {'':<28} fix: {f.fix}")
        click.echo(f"{len(problems)} problem(s), {len(warnings)} warning(s)")

    result = {"findings": [vars(f) for f in findings], "problems": len(problems), "warnings": len(warnings)}
    if problems:
        result["error"] = ProblemsFound.code
    obj.emit(result, human, ok=not problems)
    return ProblemsFound.exit_code if problems else 0


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    span = grammar.parse_duration(text)
    if span is not None:
        return datetime.now(timezone.utc) - span
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("use a time (2026-11-01, 2026-11-01T12:00Z) or a span (30m, 12h, 7d)",
                                 param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@click.command(epilog="""\b
Examples:
  peerkit audit --since 24h
  peerkit audit --peer beta --since 2026-11-01 --json""")
@click.option("--peer", help="Only this peer's calls.")
@click.option("--since", metavar="WHEN", help="Only calls since a time or a span ago (30m, 12h, 7d).")
@common_options
def audit(obj: Context, peer: str | None, since: str | None) -> None:
    """Show who called peer-shell, when, from where, what, and how it went."""
    from .. import audit as audit_log

    cfg = read_config(obj.config)
    events = audit_log.query(cfg.audit_log, peer=peer, since=_since(since))

    def human() -> None:
        if not events:
            click.echo("no calls")
        for e in events:
            what = " ".join(str(x) for x in (e.get("verb") or "?", e.get("slug") or "") if x)
            click.echo(f"{e.get('time', '?'):<29} {str(e.get('peer')):<16} {str(e.get('client')):<16} "
                       f"{what:<28} {str(e.get('outcome')):<12} {e.get('bytes', 0):>12,} B")

    obj.emit({"events": events}, human)


COMMANDS = [verify, allow, deny, rotate_key, doctor, audit]
