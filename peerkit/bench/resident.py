"""Incremental pulls inside one Python process that stays up: a pull without a process start.

Run by the benchmark as the pulling instance's user::

    python -m peerkit.bench.resident CONFIG PEER APP

Each line ``pull`` on stdin runs one ``pull --incremental --no-pre-backup``
in this process and answers its seconds on stdout; any other line (or the
end of stdin) ends it.  A pull that fails ends it with the error on stderr.
What it measures is what a resident client (one that keeps its interpreter
and imports between pulls) would take: the same library call the CLI makes,
a new event loop and SSH connection each time, no interpreter start,
imports or first-use set-up.
"""

from __future__ import annotations

import asyncio
import sys
import time

from ..config import read_config
from ..pull import pull_app


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m peerkit.bench.resident CONFIG PEER APP", file=sys.stderr)
        return 2
    config, peer, app = argv
    cfg = read_config(config)
    for line in sys.stdin:
        if line.strip() != "pull":
            break
        started = time.perf_counter()
        asyncio.run(pull_app(cfg, peer, app, pre_backup=False, incremental=True))
        print(f"{time.perf_counter() - started:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
