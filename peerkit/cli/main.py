"""The `peerkit` command: parse arguments, call the library, render, exit.

This is the only place that turns a PeerkitError into an exit status.  With
``--json`` every command prints exactly one JSON object as its last stdout
line (``{"ok": false, "error": <code>, "message": …}`` on failure).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import click

from .. import __version__
from ..errors import PeerkitError

USAGE_EXIT = 2


@dataclass
class Context:
    """What every command receives: where the config is and how to print."""

    config: str | None = None
    json: bool = False

    def emit(self, result: dict[str, Any], human: str | Callable[[], None] | None = None,
             *, ok: bool = True) -> None:
        """Print a command's result as one JSON line, or as text for people."""
        if self.json:
            click.echo(json.dumps({"ok": ok, **result}, ensure_ascii=False))
        elif callable(human):
            human()
        elif human:
            click.echo(human)

    def note(self, text: str) -> None:
        """Print a remark for the operator on stderr (never on stdout)."""
        click.echo(text, err=True)


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Context).config = value


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Context).json = True


def common_options(func: Callable) -> Callable:
    """Add --config and --json to a command (they may also precede it)."""
    func = click.option("--json", "json_output", is_flag=True, expose_value=False, callback=_set_json,
                        help="Print one JSON object as the last line of stdout.")(func)
    func = click.option("--config", "config_path", metavar="PATH", expose_value=False,
                        callback=_set_config, envvar="PEERKIT_CONFIG",
                        help="Config file (default: $PEERKIT_CONFIG or ~/.config/peerkit/config.yaml).")(func)
    return click.pass_obj(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Examples: peerkit demo; peerkit init && peerkit token")
@click.option("--config", "config_path", metavar="PATH", expose_value=False, callback=_set_config,
              help="Config file (default: $PEERKIT_CONFIG or ~/.config/peerkit/config.yaml).")
@click.option("--json", "json_output", is_flag=True, expose_value=False, callback=_set_json,
              help="Machine-readable output.")
@click.version_option(__version__, prog_name="peerkit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Pair self-hosted servers over SSH and move app data between them."""
    ctx.ensure_object(Context)


def _register() -> None:
    from . import lifecycle_cmds, remote_cmds, service_cmds, trust_cmds

    for command in trust_cmds.COMMANDS + remote_cmds.COMMANDS + lifecycle_cmds.COMMANDS + service_cmds.COMMANDS:
        cli.add_command(command)


_register()


def _fail(as_json: bool, code: str, message: str, exit_code: int, report: Any = None) -> int:
    click.echo(f"peerkit: error: {message}", err=True)
    if report is not None and not as_json:
        for stage in report.stages:
            click.echo(f"  {stage.name:<13} {stage.outcome}" + (f" ({stage.detail})" if stage.detail else ""),
                       err=True)
        for text in report.notes:
            click.echo(f"  note: {text}", err=True)
    if as_json:
        extra = {"event": "result", **report.to_json()} if report is not None else {}
        click.echo(json.dumps({**extra, "ok": False, "error": code, "message": message}, ensure_ascii=False))
    return exit_code


def run(argv: list[str]) -> int:
    """Run the CLI with ``argv``; return the exit status."""
    # Known before click parses anything, so even usage errors honour --json.
    as_json = "--json" in argv
    try:
        rv = cli.main(args=argv, prog_name="peerkit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except PeerkitError as exc:
        return _fail(as_json, exc.code, exc.message, exc.exit_code, getattr(exc, "report", None))
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.UsageError as exc:
        if not as_json:
            exc.show()
            return USAGE_EXIT
        return _fail(as_json, "usage", exc.format_message(), USAGE_EXIT)
    except click.ClickException as exc:
        return _fail(as_json, "usage", exc.format_message(), exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        return _fail(as_json, "interrupted", "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug, said plainly
        if os.environ.get("PEERKIT_DEBUG"):
            traceback.print_exc()
        return _fail(as_json, PeerkitError.code, f"internal error: {type(exc).__name__}: {exc} "
                     "(set PEERKIT_DEBUG=1 for a traceback)", PeerkitError.exit_code)


def finish(status: int) -> int:
    """Flush what the command printed; return the exit status (120 if it could not be written)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader left (`peerkit peers | head -1`): nothing lost
        pass
    except OSError:  # what we printed did not reach its file: as Python's own exit does
        status = status or 120
    return status


def main() -> None:
    """Console-script entry point (peerkit.cli.launch calls it when no agent runs the command)."""
    # Every file, lock, database and child process is closed or waited for
    # by now (all of them are context managers or awaited).  A normal exit
    # would still spend 60-100 ms tearing down asyncssh, cryptography and
    # OpenSSL object by object: a sixth of a `peerkit ping` (README,
    # Benchmarks).  Flush what we printed and leave.
    os._exit(finish(run(sys.argv[1:])))
