"""CLI commands that talk to peers: ping, apps, pull."""

from __future__ import annotations

import asyncio
from typing import Callable

import click

from ..config import read_config
from ..errors import PeerkitError
from .main import Context, common_options
from .progress import Progress


def transfer_options(func: Callable) -> Callable:
    """Options shared by pull and push, plus --config and --json."""
    func = click.option("--progress/--no-progress", "show_progress", default=None,
                        help="Force the progress bar on or off (default: on when stderr is a terminal).")(func)
    func = click.option("--compress", type=click.Choice(["auto", "zstd", "none"]), default="auto",
                        show_default=True,
                        help="Compress the stream with zstd (auto: when the link is slower than the CPU).")(func)
    func = click.option("--incremental", is_flag=True,
                        help="Move only what changed (rsync; falls back to a full copy).")(func)
    return common_options(func)


@click.command(epilog="""\b
Examples:
  peerkit ping beta
  peerkit ping --all --json""")
@click.argument("peer", required=False)
@click.option("--all", "everyone", is_flag=True, help="Ping every paired peer, 64 at a time.")
@common_options
def ping(obj: Context, peer: str | None, everyone: bool) -> int:
    """Check that PEER answers; record its status, last-seen time and the features it offers."""
    if bool(peer) == everyone:
        raise click.UsageError("name one PEER or use --all")
    from .. import client  # asyncssh is heavy: only commands that connect load it

    cfg = read_config(obj.config)
    if everyone:
        results = asyncio.run(client.ping_all(cfg, obj.note))

        def table() -> None:
            for r in results:
                state = f"ok  {r['rtt_ms']} ms  peerkit {r['version']}" if r["ok"] else r["error"]
                click.echo(f"{r['peer']:<24} {state}")
            if not results:
                click.echo("no peers yet")

        obj.emit({"peers": results}, table)
        return 0 if all(r["ok"] for r in results) else 1
    result = asyncio.run(client.ping_peer(cfg, peer, obj.note))
    obj.emit(result, f"{peer} is up: {result['rtt_ms']} ms round trip, peer-shell {result['version']}")
    return 0


@click.command(epilog="Example: peerkit apps beta")
@click.argument("peer")
@common_options
def apps(obj: Context, peer: str) -> None:
    """List the apps PEER lets us pull, live from its peer-shell."""
    from .. import client

    cfg = read_config(obj.config)
    result = asyncio.run(client.peer_apps(cfg, peer, obj.note))

    def human() -> None:
        if not result["apps"]:
            click.echo(f"{peer} offers no apps")
        for app in result["apps"]:
            click.echo(f"{app['slug']:<40} {app['size_kb']:>12,} KiB")

    obj.emit(result, human)


@click.command(epilog="""\b
Examples:
  peerkit pull beta nextcloud
  peerkit pull beta nextcloud --no-pre-backup --keep-urls
  peerkit pull beta nextcloud --incremental
  peerkit pull beta nextcloud --json   # progress events, then the result
  peerkit pull beta:nextcloud          # the PEER:APP form systemd timers use""")
@click.argument("peer")
@click.argument("app", required=False)
@click.option("--no-pre-backup", is_flag=True, help="Skip the snapshot of the local app before replacing it.")
@click.option("--keep-urls", is_flag=True, help="Do not rewrite the peer's domain to ours.")
@transfer_options
def pull(obj: Context, peer: str, app: str, no_pre_backup: bool, keep_urls: bool, incremental: bool,
         compress: str, show_progress: bool | None) -> None:
    """Copy APP from PEER into the local apps directory, safely.

    The local app changes only by an atomic swap after the whole transfer
    has arrived and been verified; a failure afterwards puts it back.
    """
    from ..pull import pull_app

    peer, app = _peer_app(peer, app)
    cfg = read_config(obj.config)
    progress = Progress(as_json=obj.json, show_bar=show_progress)
    try:
        report = asyncio.run(pull_app(cfg, peer, app, pre_backup=not no_pre_backup, keep_urls=keep_urls,
                                      incremental=incremental, compress=compress, progress=progress,
                                      note=obj.note))
    except PeerkitError:
        progress.close()
        raise
    progress.close()

    def human() -> None:
        click.echo(f"pulled {app} from {peer}: {report.files} files, {report.bytes:,} bytes")
        if report.backup:
            click.echo(f"  pre-backup   {report.backup}")
        if report.rewritten:
            click.echo(f"  URLs         rewritten in {', '.join(report.rewritten)}")
        click.echo("  stages       " + ", ".join(
            f"{s.name} {s.outcome}" + (f" ({s.detail})" if s.detail else "") for s in report.stages))
        for text in report.notes:
            click.echo(f"  note         {text}")

    obj.emit({"event": "result", **report.to_json()}, human)


def _peer_app(peer: str, app: str | None) -> tuple[str, str]:
    """Accept `PEER APP` or `PEER:APP`."""
    if app is None:
        if peer.count(":") != 1:
            raise click.UsageError("give PEER APP, or PEER:APP")
        peer, app = peer.split(":")
    return peer, app


@click.command(epilog="""\b
Examples:
  peerkit push beta nextcloud
  peerkit push beta nextcloud --incremental
  peerkit push beta nextcloud --json   # progress events, then the result""")
@click.argument("peer")
@click.argument("app")
@click.option("--no-pre-backup", is_flag=True,
              help="Ask the peer to skip its pre-backup (it decides; by default it backs up anyway).")
@click.option("--keep-urls", is_flag=True, help="Ask the peer not to rewrite our domain to its own.")
@transfer_options
def push(obj: Context, peer: str, app: str, no_pre_backup: bool, keep_urls: bool, incremental: bool,
         compress: str, show_progress: bool | None) -> None:
    """Copy our APP to PEER, which installs it by its own rules.

    PEER must have granted us push (`peerkit allow <us> --push` on its side).
    It backs up its copy, receives into staging, checks, swaps atomically and
    runs its hooks, rolling back on failure; our app is only read.
    """
    from ..push import push_app

    cfg = read_config(obj.config)
    progress = Progress(as_json=obj.json, show_bar=show_progress)
    try:
        report = asyncio.run(push_app(cfg, peer, app, pre_backup=not no_pre_backup, keep_urls=keep_urls,
                                      incremental=incremental, compress=compress, progress=progress,
                                      note=obj.note))
    finally:
        progress.close()

    def human() -> None:
        click.echo(f"pushed {app} to {peer}: {report.files} files, {report.bytes:,} bytes sent")
        for text in report.notes:
            click.echo(f"  note         {text}")

    obj.emit({"event": "result", **report.to_json()}, human)


COMMANDS = [ping, apps, pull, push]
