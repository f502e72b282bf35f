"""The allowed peer-shell requests, written down independently of peerkit/command.py.

This is the auditor's reference: the README's peer-shell table turned into
one regular expression.  The property tests check that the real parser
accepts a command exactly when this expression matches it, and that what it
accepts is the command itself, word for word (``Request.canonical()``).

    ping
    list-apps
    app-info <slug>
    stream-app <slug> [--zstd]
    receive-app <slug> [--zstd] [--keep-urls] [--no-pre-backup] [--domain <dns name>]   (flags in any order, once each)
    replace-key <68 base64 characters: an ed25519 key blob>
    rsync --server --sender -<lHogtpr...>e.<caps> [--numeric-ids] . <slug>/
    rsync --server -<lHogtpr...>e.<caps> [--delete] [--stats] [--numeric-ids] . <slug>/   (options in any order, once each)
    with-app-info rsync --server --sender -<lHogtpr...>e.<caps> [--numeric-ids] . <slug>/

Single spaces, printable ASCII (implied by the character classes), at most
256 characters in all.
"""

from __future__ import annotations

import itertools
import re

MAX_COMMAND = 256
SLUG = r"[a-z0-9][a-z0-9-]{0,62}"
LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN = rf"{LABEL}(?:\.{LABEL})+"
KEY = r"[A-Za-z0-9+/]{68}"
RSYNC_FLAGS = r"-[lHogtpr]+e\.[A-Za-z]{1,32}"


def _orders(words: list[str]) -> list[str]:
    """Every ordering of every subset of ``words``, as alternatives of ' word' sequences."""
    out = []
    for n in range(len(words) + 1):
        for combo in itertools.permutations(words, n):
            out.append("".join(" " + w for w in combo))
    return out


def _alt(options: list[str]) -> str:
    return "(?:" + "|".join(options) + ")"


_RECEIVE_FLAGS = _orders(["--zstd", "--keep-urls", "--no-pre-backup", f"--domain (?P<domain>{DOMAIN})"])
# A named group may appear once per pattern: number each alternative's group.
_RECEIVE_FLAGS = [f.replace("(?P<domain>", f"(?P<domain{i}>") for i, f in enumerate(_RECEIVE_FLAGS)]

FORMS = {
    "ping": r"ping",
    "list-apps": r"list-apps",
    "app-info": rf"app-info {SLUG}",
    "stream-app": rf"stream-app {SLUG}(?: --zstd)?",
    "receive-app": rf"receive-app {SLUG}{_alt(_RECEIVE_FLAGS)}",
    "replace-key": rf"replace-key {KEY}",
    "rsync-send": rf"rsync --server --sender {RSYNC_FLAGS}(?: --numeric-ids)? \. {SLUG}/",
    "rsync-send-info": rf"with-app-info rsync --server --sender {RSYNC_FLAGS}(?: --numeric-ids)? \. {SLUG}/",
    "rsync-receive": rf"rsync --server {RSYNC_FLAGS}{_alt(_orders(['--delete', '--stats', '--numeric-ids']))} \. {SLUG}/",
}
_COMPILED = {name: re.compile(pattern, re.ASCII) for name, pattern in FORMS.items()}
VERB_OF = {"rsync-send": "rsync", "rsync-send-info": "rsync", "rsync-receive": "rsync"}


def allowed(text: object) -> str | None:
    """Return the form ``text`` is (a key of FORMS), or None if peer-shell must refuse it."""
    if not isinstance(text, str) or not text or len(text) > MAX_COMMAND:
        return None
    for name, pattern in _COMPILED.items():
        if pattern.fullmatch(text):
            return name
    return None


def verb(form: str) -> str:
    return VERB_OF.get(form, form)


def slug_of(text: str) -> str | None:
    """The app slug an allowed command names (None for ping, list-apps, replace-key)."""
    words = text.split(" ")
    if words[0] in ("app-info", "stream-app", "receive-app"):
        return words[1]
    if words[0] in ("rsync", "with-app-info"):
        return words[-1][:-1]
    return None
