"""CLI commands that set up trust: init, token, pair, unpair, peers.

Each command imports ``pairing`` itself: every `peerkit` run registers these
commands, and `ping` or `pull` would otherwise load it (and keys, authkeys,
token) for nothing, ~14 ms of their start-up.
"""

from __future__ import annotations

import click

from ..config import read_config
from .main import Context, common_options


@click.command(epilog="""\b
Examples:
  peerkit init
  peerkit init --name alpha --host alpha.example.org --port 2222""")
@click.option("--name", help="This instance's peer name (default: from the host name).")
@click.option("--host", help="Host name or address our token advertises.")
@click.option("--port", type=int, help="SSH port our token advertises.")
@click.option("--user", help="Login name our token advertises.")
@common_options
def init(obj: Context, name: str | None, host: str | None, port: int | None, user: str | None) -> None:
    """Create the config, identity key and state (safe to run again)."""
    overrides: dict = {}
    if name:
        overrides["name"] = name
    ssh = {k: v for k, v in (("host", host), ("port", port), ("user", user)) if v is not None}
    if ssh:
        overrides["ssh"] = ssh
    from .. import pairing
    result = pairing.init(obj.config, overrides)
    cfg = result.config
    if not result.config_created and overrides:
        obj.note(f"note: {cfg.path} already exists; edit it to change settings")

    def human() -> None:
        verb = "wrote" if result.config_created else "kept"
        click.echo(f"{verb} config   {cfg.path}")
        verb = "generated" if result.identity_created else "kept"
        click.echo(f"{verb} identity {cfg.ssh.identity} ({result.fingerprint})")
        click.echo(f"peer name      {cfg.name}")
        click.echo("next: `peerkit token` and send it to the other operator")

    obj.emit({"config": str(cfg.path), "config_created": result.config_created,
              "identity": str(cfg.ssh.identity), "identity_created": result.identity_created,
              "name": cfg.name, "fingerprint": result.fingerprint}, human)


@click.command(epilog="""\b
Examples:
  peerkit token              # v2: pins our sshd host keys
  peerkit token --format v1  # for LibrePortal shell peers""")
@click.option("--format", "version", type=click.Choice(["v1", "v2"]), default="v2", show_default=True,
              help="Token format.")
@common_options
def token(obj: Context, version: str) -> None:
    """Print this instance's pairing token (only the token, on stdout)."""
    from ..identity import read_identity
    from ..verify import fingerprint_groups

    cfg = read_config(obj.config)
    from .. import pairing
    text, warnings = pairing.our_token(cfg, version)
    fingerprint = read_identity(cfg.ssh.identity).fingerprint
    for warning in warnings:
        obj.note(f"warning: {warning}")
    obj.note("This token is a credential: whoever pairs it lets this instance's key in. "
             "Send it over a channel you trust.")
    obj.note(f"Our half, to compare by phone before pairing: {fingerprint_groups(fingerprint)}")
    obj.emit({"token": text, "format": version, "name": cfg.name, "fingerprint": fingerprint}, text)


@click.command(epilog="""\b
Examples:
  peerkit pair 'lp-peer|v2|beta|…'
  peerkit pair "$(cat beta.token)" backup-site
  peerkit pair --replace 'lp-peer|v2|beta|…'   # beta has a new key""")
@click.argument("token_text", metavar="TOKEN")
@click.argument("name", required=False)
@click.option("--replace", is_flag=True, help="Replace the key of an already paired peer of that name.")
@click.option("--expires", metavar="DATE", help="End access at DATE (YYYY-MM-DD, start of day UTC, or ISO time).")
@click.option("--ttl", metavar="SPAN", help="End access after SPAN, e.g. 12h, 7d, 2w.")
@common_options
def pair(obj: Context, token_text: str, name: str | None, replace: bool, expires: str | None,
         ttl: str | None) -> None:
    """Authorize a peer's key to call peer-shell here, from its TOKEN.

    NAME overrides the peer name the token carries.  Pairing is one-way:
    the other operator runs `peerkit pair` with our token for the way back.
    """
    from ..identity import read_identity
    from ..permissions import parse_expiry
    from ..verify import verification_code

    cfg = read_config(obj.config)
    from .. import pairing
    result = pairing.pair(cfg, token_text, name, replace=replace, expires_at=parse_expiry(expires, ttl))
    peer, tok = result.peer, result.token
    code = verification_code(read_identity(cfg.ssh.identity).fingerprint, tok.fingerprint)
    if not tok.host_key_fingerprints:
        obj.note(f"note: this {tok.version} token pins no host key; the first connection to "
                 f"{peer.name} will record its host key and every later one must match")

    def human() -> None:
        what = {"added": "paired with", "replaced": "re-keyed", "unchanged": "already paired with"}
        click.echo(f"{what[result.outcome]} {peer.name} ({tok.user}@{tok.host}:{tok.port})")
        click.echo(f"  key        {tok.fingerprint}")
        pins = ", ".join(tok.host_key_fingerprints) or "none (trust on first use)"
        click.echo(f"  host keys  {pins}")
        if peer.expires_at:
            click.echo(f"  expires    {peer.expires_at}")
        click.echo(f"  verify     {code}")
        click.echo(f"Read the verify code to {peer.name}'s operator: their `peerkit verify` must show the same.")
        click.echo(f"{peer.name} can now call peer-shell here. For the way back, "
                   f"its operator runs: peerkit pair <your token>")

    obj.emit({"peer": peer.to_json(), "outcome": result.outcome, "verification_code": code}, human)


@click.command(epilog="Example: peerkit unpair beta")
@click.argument("name")
@common_options
def unpair(obj: Context, name: str) -> None:
    """Revoke a peer: remove its key line and its record."""
    cfg = read_config(obj.config)
    from .. import pairing
    result = pairing.unpair(cfg, name)
    obj.emit({"peer": result.name, "key_removed": result.key_removed, "row_removed": result.row_removed},
             f"unpaired {result.name}: its key can no longer log in here")


@click.command(epilog="Example: peerkit peers --json")
@common_options
def peers(obj: Context) -> None:
    """List paired peers."""
    cfg = read_config(obj.config)
    from .. import pairing
    rows = pairing.list_peers(cfg)

    def human() -> None:
        if not rows:
            click.echo("no peers yet: `peerkit pair TOKEN`")
            return
        from ..permissions import describe
        from ..state import Peer

        header = ("NAME", "STATUS", "LAST SEEN", "ADDRESS", "EXPIRES", "MAY")
        table = [header] + [
            (r["name"], r["status"] if r["authorized"] else f"{r['status']} (key line missing)",
             r["last_seen"] or "never", f"{r['user']}@{r['host']}:{r['port']}", r["expires_at"] or "never",
             describe(Peer(r["name"], permissions=r["permissions"])))
            for r in rows]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        for row in table:
            click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())

    obj.emit({"peers": rows}, human)


COMMANDS = [init, token, pair, unpair, peers]
