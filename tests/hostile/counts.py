"""The hostile/fault suite's tally: what was tried, refused and survived, printed as one line.

Both tests/hostile/conftest.py and tests/faults/conftest.py hook into this
module; it is imported once per session (``tests.hostile.counts``), so the
numbers of both directories add up and the summary line is printed once.

The line (see the README's "Security notes")::

    peerkit hostile/fault suite: commands tried N (refused R), attack corpus C, archives A (refused A'),
    token mutations T (rejected T', same token S), fault runs F (survived F'), network faults K,
    concurrency rounds X

Only what actually ran is counted: a test that was deselected or skipped
adds nothing, so the line is the evidence of the run it ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

LONG_ENV = "PEERKIT_LONG"
LONG_OPTION = "--peerkit-long"
FAULT_SEED_ENV = "PEERKIT_FAULT_SEED"
DEFAULT_FAULT_SEED = 20240611


@dataclass
class Counts:
    commands: int = 0           # SSH_ORIGINAL_COMMAND values run through the parser and dispatcher
    refused: int = 0            # ... of which refused (non-zero exit, nothing on stdout, one audit line)
    corpus: int = 0             # distinct hand-written attack commands
    archives: int = 0           # crafted tar streams pulled
    archives_refused: int = 0   # ... refused with unsafe-archive / transfer-incomplete, app intact
    tokens: int = 0             # single-character edits of a v2 token tried
    tokens_rejected: int = 0    # ... refused, authorized_keys byte-identical
    tokens_same: int = 0        # ... surrounding whitespace: the very same token (documented)
    faults: int = 0             # randomized fault runs (kill, exit, disk full, hooks, signals)
    survived: int = 0           # ... after which every invariant held
    network: int = 0            # link cuts and proxy faults (latency, stall, reset, corruption)
    network_survived: int = 0
    rounds: int = 0             # concurrency rounds (20 pair/unpair processes; two pulls at once)

    def line(self) -> str:
        return (f"peerkit hostile/fault suite: commands tried {self.commands} (refused {self.refused}), "
                f"attack corpus {self.corpus}, archives {self.archives} (refused {self.archives_refused}), "
                f"token mutations {self.tokens} (rejected {self.tokens_rejected}, same token {self.tokens_same}), "
                f"fault runs {self.faults} (survived {self.survived}), "
                f"network faults {self.network} (survived {self.network_survived}), "
                f"concurrency rounds {self.rounds}")

    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


COUNTS = Counts()
_printed = False
_long: bool | None = None


def add_option(parser) -> None:
    """Register --peerkit-long (both conftests call this; the second call is a no-op)."""
    try:
        parser.addoption(LONG_OPTION, action="store_true", default=False,
                         help="run the hostile/fault suite with larger counts (occasional use; "
                              f"or set {LONG_ENV}=1)")
    except ValueError:  # already added by the other directory's conftest
        pass


def configure(config) -> None:
    global _long
    try:
        opt = bool(config.getoption(LONG_OPTION))
    except ValueError:
        opt = False
    _long = opt or os.environ.get(LONG_ENV, "") not in ("", "0")


def long_run() -> bool:
    """True for the occasional, larger run (--peerkit-long or PEERKIT_LONG=1)."""
    if _long is None:
        return os.environ.get(LONG_ENV, "") not in ("", "0")
    return _long


def scale(default: int, long: int) -> int:
    """Pick a count for this run."""
    return long if long_run() else default


def fault_seed() -> int:
    """The seed of the randomized fault runs (PEERKIT_FAULT_SEED, else a fixed default)."""
    text = os.environ.get(FAULT_SEED_ENV, "").strip()
    return int(text, 0) if text else DEFAULT_FAULT_SEED


def terminal_summary(terminalreporter) -> None:
    """Print the one summary line (once, however many conftests call this)."""
    global _printed
    if _printed or COUNTS.empty():
        return
    _printed = True
    terminalreporter.write_sep("-", "peerkit hostile/fault summary")
    terminalreporter.write_line(COUNTS.line())
