"""The grammars of names that cross a trust boundary.

Peer names, app slugs, login names, host names and ports arrive in tokens,
in SSH_ORIGINAL_COMMAND and in web forms.  Each is checked with a full-match
against a narrow grammar (ASCII only, so Unicode look-alikes and
normalisation tricks never match).
"""

from __future__ import annotations

import re
from datetime import timedelta

# Peer names and app slugs share one grammar: lowercase, digits and '-',
# no leading '-' (so never an option), at most 63 characters.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)
# POSIX-portable login names; no leading '-' so ssh never reads one as an option.
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", re.ASCII)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhdw])", re.ASCII)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def is_name(text: str) -> bool:
    """Tell whether ``text`` is a valid peer name."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def is_slug(text: str) -> bool:
    """Tell whether ``text`` is a valid app slug (same grammar as peer names)."""
    return is_name(text)


def is_user(text: str) -> bool:
    """Tell whether ``text`` is a valid login name."""
    return isinstance(text, str) and _USER.fullmatch(text) is not None


def is_host(text: str) -> bool:
    """Tell whether ``text`` is a DNS name, an IPv4 or an IPv6 address."""
    if not isinstance(text, str) or not text or len(text) > 253:
        return False
    if ":" in text:
        # ipaddress accepts a zone ("fe80::1%<anything>", spaces and shell
        # metacharacters included); a zone means nothing on another host.
        if "%" in text:
            return False
        import ipaddress  # here, not above: peer-shell never needs it

        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return True
    return all(_LABEL.fullmatch(label) for label in text.split("."))


def parse_port(text: str) -> int | None:
    """Return the port number in ``text`` (decimal, 1-65535), or None."""
    if not isinstance(text, str) or _PORT.fullmatch(text) is None:
        return None
    port = int(text)
    return port if port <= 65535 else None


def name_from_hostname(hostname: str) -> str:
    """Turn a host name into a valid default peer name."""
    label = hostname.split(".")[0].lower()
    cleaned = re.sub(r"[^a-z0-9-]+", "-", label, flags=re.ASCII).strip("-")[:63]
    return cleaned if is_name(cleaned) else "peerkit"


def parse_duration(text: str) -> timedelta | None:
    """Return the span in ``text`` such as ``30m``, ``12h``, ``7d`` or ``2w``, or None."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
