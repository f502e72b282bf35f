"""Parse SSH_ORIGINAL_COMMAND into one of the few requests peer-shell serves.

The remote side controls every byte of the command, so the parser accepts
only the exact allowed forms: single spaces between words, printable ASCII,
a whitelisted verb, the exact number of arguments, and arguments that match
their grammar.  There is no quoting, no escaping and no shell: what does not
match is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import grammar
from .errors import BadSlug, PeerRefused

MAX_COMMAND = 256

# verb -> names of its positional arguments, each validated below.
VERBS: dict[str, tuple[str, ...]] = {
    "ping": (),
    "list-apps": (),
    "stream-app": ("slug",),
}


@dataclass(frozen=True)
class Request:
    """A validated peer-shell request."""

    verb: str
    slug: str | None = None


def parse_command(text: str | None) -> Request:
    """Return the request in ``text`` or raise PeerRefused / BadSlug."""
    # No command means an interactive login attempt: never a shell.
    if not text:
        raise PeerRefused("empty command")
    # Bound the input before looking at it: no parser work on megabytes.
    if len(text) > MAX_COMMAND:
        raise PeerRefused(f"command longer than {MAX_COMMAND} characters")
    # Printable ASCII only: stops NUL and newline injection, terminal escape
    # sequences in logs, and Unicode look-alikes of verbs and slugs.
    if not all(" " <= ch <= "~" for ch in text):
        raise PeerRefused("control or non-ASCII character")
    words = text.split(" ")
    # Exactly one space between words: no tabs, padding or empty arguments
    # that a later consumer might split differently than we did.
    if any(not word for word in words):
        raise PeerRefused("empty word")
    verb, args = words[0], words[1:]
    # Whitelisted verbs only; everything else (shells, sftp, scp, rsync,
    # anything with metacharacters glued on) is refused.
    if verb not in VERBS:
        raise PeerRefused("unknown verb")
    # Exact arity: stops option smuggling through extra arguments such as
    # `stream-app app --to-command=...` or `ping -x`.
    if len(args) != len(VERBS[verb]):
        raise PeerRefused("wrong number of arguments")
    if verb == "stream-app":
        slug = args[0]
        # The slug names a directory: the grammar excludes '/', '..', leading
        # '-' (option injection) and every shell metacharacter.
        if not grammar.is_slug(slug):
            raise BadSlug("slug out of grammar")
        return Request(verb, slug)
    return Request(verb)
