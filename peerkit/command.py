"""Parse SSH_ORIGINAL_COMMAND into one of the few requests peer-shell serves.

The remote side controls every byte of the command, so the parser accepts
only the exact allowed forms: single spaces between words, printable ASCII,
a whitelisted verb, its exact positional arguments, and only the flags that
verb knows, each at most once, all matching their grammar.  There is no
quoting, no escaping and no shell: what does not match is refused.

    ping
    list-apps
    app-info <slug>
    stream-app <slug> [--zstd]
    receive-app <slug> [--zstd] [--keep-urls] [--no-pre-backup] [--domain <domain>]
    replace-key <base64 ed25519 key>
    rsync --server [--sender] -<flags>e.<caps> [--delete] [--numeric-ids] . <slug>/
    with-app-info rsync --server --sender -<flags>e.<caps> [--numeric-ids] . <slug>/
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from . import grammar
from .errors import BadSlug, PeerRefused
from .rsyncargs import RsyncRequest, parse_rsync

MAX_COMMAND = 256
# A pull's rsync, answering app-info first (on stderr: stdout is rsync's).
WITH_APP_INFO = "with-app-info"

# verb -> (names of its positional arguments, its flags, the flags taking a value)
VERBS: dict[str, tuple[tuple[str, ...], frozenset[str], frozenset[str]]] = {
    "ping": ((), frozenset(), frozenset()),
    "list-apps": ((), frozenset(), frozenset()),
    # ping's answer and one app's list-apps entry in one request (a pull's).
    "app-info": (("slug",), frozenset(), frozenset()),
    "stream-app": (("slug",), frozenset({"--zstd"}), frozenset()),
    "receive-app": (("slug",), frozenset({"--zstd", "--keep-urls", "--no-pre-backup"}),
                    frozenset({"--domain"})),
    # Key rotation: the caller, authenticated by its current key, names its
    # next key (base64 of an ed25519 public key blob).
    "replace-key": (("key",), frozenset(), frozenset()),
}
_KEY_B64 = re.compile(r"[A-Za-z0-9+/]{68}", re.ASCII)


class Request(NamedTuple):
    """A validated peer-shell request (equality and hash ignore ``words``)."""

    # A NamedTuple, not a dataclass, for peer-shell's start-up: see config.py.
    verb: str
    slug: str | None = None
    key: str | None = None
    flags: frozenset[str] = frozenset()
    domain: str | None = None
    rsync: RsyncRequest | None = None
    info: bool = False  # with-app-info: app-info's answer before the rsync
    words: tuple[str, ...] = ()

    def canonical(self) -> str:
        """Return the command text this request was parsed from."""
        return " ".join(self.words)

    # Two requests are equal whatever text they were parsed from (words was
    # compare=False in the dataclass); words is the last field.
    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self[:-1] == other[:-1]

    def __ne__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self[:-1] != other[:-1]

    def __hash__(self) -> int:
        return hash(self[:-1])


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
    if verb == "rsync":
        rsync = parse_rsync(words)
        return Request("rsync", slug=rsync.slug, rsync=rsync, words=tuple(words))
    if verb == WITH_APP_INFO:
        # The rest is held to the rsync grammar as it stands; the prefix only
        # makes sense for the sending side (a pull): the receiving side's
        # stderr carries its outcome, and a push needs no app-info.
        rsync = parse_rsync(args)
        if not rsync.sender:
            raise PeerRefused("with-app-info is for rsync --sender only")
        return Request("rsync", slug=rsync.slug, rsync=rsync, info=True, words=tuple(words))
    # Whitelisted verbs only; everything else (shells, sftp, scp, anything
    # with metacharacters glued on) is refused.
    if verb not in VERBS:
        raise PeerRefused("unknown verb")
    positional, flags, valued = VERBS[verb]
    # Exact arity for positionals: stops option smuggling in their place
    # (`stream-app --to-command=x`, `ping -x`).
    if len(args) < len(positional):
        raise PeerRefused("missing argument")
    values, rest = args[:len(positional)], args[len(positional):]
    seen: set[str] = set()
    domain = None
    i = 0
    while i < len(rest):
        word = rest[i]
        # Only this verb's own flags, each once; anything else is refused.
        if word in seen or word not in flags | valued:
            raise PeerRefused("unexpected argument")
        seen.add(word)
        if word in valued:
            if i + 1 >= len(rest):
                raise PeerRefused("missing flag value")
            domain = rest[i + 1]
            # A peer-supplied domain ends up in rewritten config files: DNS
            # names only.
            if "." not in domain or ":" in domain or not grammar.is_host(domain):
                raise PeerRefused("bad domain")
            i += 1
        i += 1
    slug = key = None
    if "slug" in positional:
        slug = values[0]
        # The slug names a directory: the grammar excludes '/', '..', leading
        # '-' (option injection) and every shell metacharacter.
        if not grammar.is_slug(slug):
            raise BadSlug("slug out of grammar")
    if "key" in positional:
        # Exactly the length of an ed25519 key blob in base64: anything else
        # (options, padding games, other key types) is refused here.
        if not _KEY_B64.fullmatch(values[0]):
            raise PeerRefused("malformed key")
        key = values[0]
    return Request(verb, slug=slug, key=key, flags=frozenset(seen - {"--domain"}), domain=domain,
                   words=tuple(words))
