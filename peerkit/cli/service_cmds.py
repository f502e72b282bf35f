"""CLI commands that run services: serve, web, demo, agent, systemd install."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ..config import read_config
from .main import Context, common_options
from .progress import Progress


@click.command(epilog="""\b
Examples:
  peerkit serve                         # listen on serve.listen, port ssh.port
  peerkit serve --listen 127.0.0.1 --port 2222""")
@click.option("--listen", metavar="ADDR", help="Address to listen on (default: serve.listen).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: ssh.port; 0 picks a free one).")
@common_options
def serve(obj: Context, listen: str | None, port: int | None) -> None:
    """Run the embedded SSH server: only paired peers, only peer-shell.

    For hosts where the system sshd cannot be used. It reads the same
    authorized_keys lines and honours their from=, expiry-time= and
    command= options; pty, shell, sftp, environment and every kind of
    forwarding are refused. Stop it with Ctrl-C or SIGTERM.
    """
    from ..server import Limits, serve_forever

    cfg = read_config(obj.config)
    s = cfg.serve
    limits = Limits(max_connections=s["max_connections"], max_sessions_per_peer=s["max_sessions_per_peer"],
                    auth_timeout=s["auth_timeout"], max_auth_failures=s["max_auth_failures"])
    address = listen or s["listen"]

    def ready(bound: int) -> None:
        obj.note(f"peerkit serve: listening on {address}:{bound} as {cfg.name} "
                 f"(host key {cfg.serve_host_key}.pub)")

    asyncio.run(serve_forever(cfg, listen=address, port=cfg.ssh.port if port is None else port,
                              limits=limits, ready=ready))
    obj.emit({"stopped": True}, "peerkit serve: stopped")


@click.command(epilog="""\b
Examples:
  peerkit web                      # http://127.0.0.1:8765/?token=...
  peerkit web --port 0 --json      # a free port; the address as JSON
  peerkit web --listen 192.0.2.10  # beyond this machine, on purpose""")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port (0 picks a free one).")
@click.option("--listen", metavar="ADDR",
              help="Address to listen on (default: 127.0.0.1); required for any non-loopback address.")
@common_options
def web(obj: Context, port: int, listen: str | None) -> None:
    """Serve the local admin page: peers, pairing, apps and pulls.

    Every action on the page runs this CLI with --json. The address printed
    at start carries a random access token, needed on every request.
    Stop it with Ctrl-C or SIGTERM (running pulls are stopped safely).
    """
    from ..web import serve as serve_web
    from ..web.security import is_loopback

    cfg = read_config(obj.config)

    def ready(url: str, address: str, bound: int) -> None:
        obj.emit({"event": "listening", "url": url, "listen": address, "port": bound, "name": cfg.name},
                 f"peerkit web: {cfg.name} at\n    {url}")
        obj.note("Open the address above; its token is the key to this page, so keep it to yourself. "
                 "Stop with Ctrl-C.")
        if not is_loopback(address):
            obj.note(f"warning: listening on {address}: anyone who can reach it and learns the token "
                     "can pair, unpair and pull (plain HTTP: use an SSH tunnel or a TLS proxy)")

    asyncio.run(serve_web(cfg.path.absolute(), cfg.name, listen=listen, port=port, ready=ready))
    obj.emit({"event": "stopped"}, "peerkit web: stopped")


@click.command(epilog="""\b
Examples:
  peerkit demo
  peerkit demo --keep          # leave both servers running to try the CLI
  peerkit demo --dir /tmp/pk   # put the two instances there""")
@click.option("--keep", is_flag=True, help="Leave the two servers running and print commands to try.")
@click.option("--dir", "base", type=click.Path(file_okay=False, path_type=Path),
              help="Where to create the two instances (default: a new temporary directory).")
@click.option("--small", is_flag=True, help="Smaller sample apps (quicker).")
@common_options
def demo(obj: Context, keep: bool, base: Path | None, small: bool) -> None:
    """Show peerkit working, on this machine, without root or a system sshd.

    Two instances (alpha and beta) each run `peerkit serve` on a free
    loopback port, pair with each other's tokens, compare the verification
    code; beta lists alpha's apps and pulls one with a pre-backup.
    """
    from .. import demo as demo_lib
    import sys

    say = (lambda text: click.echo(text, err=True)) if obj.json else click.echo
    progress = Progress(as_json=obj.json, show_bar=None if obj.json else sys.stdout.isatty())
    result = demo_lib.run(base, say, progress, keep=keep, scale=0.2 if small else 1.0)
    progress.close()
    peerkit = str(Path(sys.executable).parent / "peerkit")
    lines = demo_lib.summary(result, keep=keep, peerkit=peerkit)
    report = result.report
    obj.emit({"dir": str(result.base), "verification_code": result.code, "apps": result.listing,
              "pull": report.to_json() if report else None, "kept_running": keep,
              "try": demo_lib.try_commands(result, peerkit) if keep else [],
              "servers": {i.name: {"port": i.port, "config": str(i.config_path),
                                   "pid": i.server.pid if keep and i.server else None}
                          for i in result.instances}},
             "\n".join(lines))


@click.command(epilog="""\b
Examples:
  export PEERKIT_AGENT=$XDG_RUNTIME_DIR/peerkit-agent.sock
  peerkit agent &                       # listens on $PEERKIT_AGENT
  peerkit pull --incremental beta wiki  # now run by the agent
  peerkit agent --socket /run/peerkit-agent/agent.sock""")
@click.option("--socket", "path", metavar="PATH", envvar="PEERKIT_AGENT", required=True,
              help="Where to listen (default: $PEERKIT_AGENT). Its directory must be writable "
                   "by this user only.")
@common_options
def agent(obj: Context, path: str) -> None:
    """Keep peerkit loaded and run this user's `peerkit` commands quicker.

    Every `peerkit` command started with PEERKIT_AGENT set to this socket
    is handed to the agent, which forks a worker that runs it with the
    caller's arguments, environment, working directory, umask, stdin,
    stdout and stderr, and passes back its exit status; the 0.1-0.2 s a
    command spends starting is gone. Only this user's processes are
    served; a missing, stopped or outdated agent (peerkit was upgraded:
    it then exits for its service manager to restart it) just means the
    command runs in its own process. Stop it with Ctrl-C or SIGTERM:
    running commands get SIGTERM and the agent waits for them.
    """
    from .agent import run_agent

    why = run_agent(path, obj.note)
    obj.emit({"stopped": why}, None)


@click.group("systemd", epilog="Example: peerkit systemd install --user")
def systemd_group() -> None:
    """Install systemd units for this instance."""


@systemd_group.command("install", epilog="""\b
Examples:
  sudo peerkit systemd install             # /etc/systemd/system, runs as you
  peerkit systemd install --user           # ~/.config/systemd/user
  peerkit systemd install --dir ./units    # just write them somewhere""")
@click.option("--user", "user_mode", is_flag=True, help="Write user units (no User=/Group= lines).")
@click.option("--dir", "target", type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write to (default: /etc/systemd/system, or the user unit dir).")
@common_options
def systemd_install(obj: Context, user_mode: bool, target: Path | None) -> None:
    """Write peerkit-serve, -health, -pull@ and -web units with this instance's paths."""
    from ..systemd import default_target, install

    cfg = read_config(obj.config)
    where = target or default_target(user_mode)
    paths = install(cfg, where, user_mode=user_mode)
    ctl = "systemctl --user" if user_mode else "systemctl"

    def human() -> None:
        for path in paths:
            click.echo(f"wrote {path}")
        click.echo("next:")
        click.echo(f"  {ctl} daemon-reload")
        click.echo(f"  {ctl} enable --now peerkit-serve.service peerkit-health.timer")
        click.echo(f"  {ctl} enable --now 'peerkit-pull@PEER:APP.timer'   # a warm standby of APP from PEER")

    obj.emit({"units": [str(p) for p in paths]}, human)


COMMANDS = [serve, web, demo, agent, systemd_group]
