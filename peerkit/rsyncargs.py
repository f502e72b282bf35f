"""Validate the rsync server command a peer sends, in the manner of rrsync.

A peerkit client runs rsync with a fixed set of options, so the server side
sees one of a few shapes::

    rsync --server --sender -<flags>e.<caps> [--numeric-ids] . <slug>/     (pull)
    rsync --server -<flags>e.<caps> [--delete] [--stats] [--numeric-ids] . <slug>/   (push)

Only those shapes are accepted, with a small allowlist of flags; the path is
one app slug and nothing else.  The command peer-shell then runs is rebuilt
from the parsed pieces (with ``--`` before the paths and the absolute
directory we choose), never passed through.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from . import grammar
from .errors import BadSlug, PeerRefused

# Short options a peerkit client may cause: links, hard links, owners,
# groups, times, perms, recursion.  Never -L/-k/-K (follow links out of the
# tree), -s (protect-args smuggles arguments past this check), -D (device
# nodes), -z (we compress ourselves), and nothing that names a path.
_ALLOWED_SHORT = set("lHogtpr")
# The flags word: allowed letters, then "e." and rsync's capability letters.
_FLAGS = re.compile(r"-([A-Za-z]+)e\.([A-Za-z]{1,32})", re.ASCII)
_ALLOWED_LONG_PULL = {"--numeric-ids"}
_ALLOWED_LONG_PUSH = {"--numeric-ids", "--delete", "--stats"}
MAX_WORDS = 8
# Where both sides look for rsync (never the caller's PATH).
RSYNC_PATH = "/usr/local/bin:/usr/bin:/bin"
# rsync's whole environment, both sides: nothing of ours (or sshd's) changes what it does.
RSYNC_ENV = {"PATH": RSYNC_PATH, "LC_ALL": "C"}


def find_tool(name: str, path: str = RSYNC_PATH) -> str | None:
    """Return the first executable file ``name`` in ``path``'s directories (as shutil.which), or None.

    Without shutil, whose import (bz2, lzma) peer-shell would pay on every
    rsync and every ping.
    """
    for directory in path.split(":"):
        candidate = f"{directory}/{name}"
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def rsync_binary() -> str | None:
    """Return the path of rsync, or None when it is not installed."""
    return find_tool("rsync")


class RsyncRequest(NamedTuple):
    """A validated rsync server request for one app."""

    # A NamedTuple, not a dataclass, for peer-shell's start-up: see config.py.
    sender: bool  # True: the peer pulls from us; False: it pushes to us
    flags: str
    options: tuple[str, ...]
    slug: str

    def server_argv(self, rsync: str, directory: str, extra: tuple[str, ...] = ()) -> list[str]:
        """Return the argv to run: our rsync binary, the checked options, ``--``, our path."""
        head = [rsync, "--server"] + (["--sender"] if self.sender else [])
        return head + [self.flags, *self.options, *extra, "--", ".", directory.rstrip("/") + "/"]


def parse_rsync(words: list[str]) -> RsyncRequest:
    """Return the request in ``words`` (already split on single spaces) or refuse it."""
    if len(words) > MAX_WORDS or words[:2] != ["rsync", "--server"]:
        raise PeerRefused("not an rsync server command")
    rest = words[2:]
    sender = bool(rest) and rest[0] == "--sender"
    if sender:
        rest = rest[1:]
    if len(rest) < 3:
        raise PeerRefused("rsync: missing arguments")
    flags, *options, dot, path = rest
    match = _FLAGS.fullmatch(flags)
    # Every short option must be on the allowlist; a forbidden one anywhere
    # in the word (e.g. "-Lre.x") refuses the whole request.
    if match is None or not set(match.group(1)) <= _ALLOWED_SHORT:
        raise PeerRefused("rsync: option not allowed")
    allowed = _ALLOWED_LONG_PULL if sender else _ALLOWED_LONG_PUSH
    # Long options: exact words only, so "--delete=..." or "--rsh=..." and
    # any option taking a path never pass.
    if len(set(options)) != len(options) or not set(options) <= allowed:
        raise PeerRefused("rsync: option not allowed")
    # rsync's "." is the base; the only path is one app directory.
    if dot != ".":
        raise PeerRefused("rsync: unexpected argument")
    if not path.endswith("/") or not grammar.is_slug(path[:-1]):
        raise BadSlug("rsync path is not <slug>/")
    return RsyncRequest(sender, flags, tuple(options), path[:-1])
