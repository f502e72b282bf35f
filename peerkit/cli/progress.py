"""Progress for long work: a bar on a terminal, JSON events for --json."""

from __future__ import annotations

import json
import sys
import time

import click

_JSON_INTERVAL = 0.25
_BAR_INTERVAL = 0.1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Render ``(stage, bytes, total)`` updates, throttled."""

    def __init__(self, *, as_json: bool, show_bar: bool | None = None) -> None:
        self.as_json = as_json
        self.show_bar = (sys.stderr.isatty() if show_bar is None else show_bar) and not as_json
        self.started = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        finished = total is not None and done >= total
        interval = _JSON_INTERVAL if self.as_json else _BAR_INTERVAL
        if now - self.last < interval and not finished:
            return
        self.last = now
        if self.as_json:
            click.echo(json.dumps({"event": "progress", "stage": stage, "bytes": done, "total": total}))
        elif self.show_bar:
            self._draw(stage, done, total, now)

    def _draw(self, stage: str, done: int, total: int | None, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
            eta = _duration((total - done) / rate) if rate > 0 and done < total else "0:00"
            text = f"{stage} {frac * 100:3.0f}% [{bar}] {_size(done)} / {_size(total)}  " \
                   f"{_size(rate)}/s  ETA {eta}"
        else:
            text = f"{stage} {_size(done)}  {_size(rate)}/s"
        click.echo("\r" + text.ljust(78), nl=False, err=True)
        self.drawn = True

    def close(self) -> None:
        """End the bar's line so later output starts on a fresh one."""
        if self.drawn:
            click.echo("", err=True)
            self.drawn = False
