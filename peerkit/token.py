"""Pairing tokens: what one operator hands another to be authorized.

v1 is LibrePortal's format, kept byte-compatible so shell peers and peerkit
pair with each other::

    lp-peer|v1|<name>|<user>|<host>|<port>|<base64 of key line>|<SHA256 fp>

v2 (peerkit's default) appends the fingerprints of the sshd host keys the
issuer advertises, so the client pins them instead of trusting whatever
answers first, and a check value over every preceding byte::

    lp-peer|v2|<name>|<user>|<host>|<port>|<base64 of key line>|<SHA256 fp>|<host fps>|<check>

``<host fps>`` is a comma-separated list of ``SHA256:…`` fingerprints
(possibly empty); ``<check>`` is the first 16 hex digits of the SHA-256 of
everything before the final ``|``.  Fields are pipe-delimited because the
fingerprints contain ':'.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass

from . import grammar
from .errors import (BadField, ChecksumMismatch, FingerprintMismatch, NotAToken,
                     UnsupportedVersion)
from .keys import PublicKey, is_fingerprint, parse_public_key

PREFIX = "lp-peer"
MAX_LENGTH = 4096
MAX_HOST_KEYS = 8
_VERSION = re.compile(r"v[0-9]{1,3}", re.ASCII)
_CHECK = re.compile(r"[0-9a-f]{16}", re.ASCII)
_FIELDS = {"v1": 8, "v2": 10}


@dataclass(frozen=True)
class Token:
    """The fields of a pairing token."""

    version: str
    name: str
    user: str
    host: str
    port: int
    key: PublicKey
    host_key_fingerprints: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint


def _check_value(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).hexdigest()[:16]


def emit_token(token: Token) -> str:
    """Render a token as the single line an operator copies."""
    key_line = token.key.line().encode("ascii")
    fields = [PREFIX, token.version, token.name, token.user, token.host, str(token.port),
              base64.b64encode(key_line).decode("ascii"), token.fingerprint]
    if token.version == "v1":
        return "|".join(fields)
    if token.version != "v2":
        raise UnsupportedVersion(token.version)
    fields.append(",".join(token.host_key_fingerprints))
    body = "|".join(fields)
    return f"{body}|{_check_value(body)}"


def parse_token(text: str) -> Token:
    """Parse and verify a pasted token; raise a TokenError subclass if it is bad."""
    if not isinstance(text, str):
        raise NotAToken("not text")
    # Surrounding whitespace comes from copy and paste; anything inside is refused below.
    text = text.strip()
    # Bound the work done on hostile input before any parsing.
    if len(text) > MAX_LENGTH or not text.isascii() or not text.isprintable():
        raise NotAToken("too long or not printable ASCII")
    fields = text.split("|")
    if fields[0] != PREFIX or len(fields) < 2:
        raise NotAToken("does not start with lp-peer|")
    version = fields[1]
    if not _VERSION.fullmatch(version):
        raise NotAToken("no version field")
    if version not in _FIELDS:
        raise UnsupportedVersion(f"version {version}")
    if len(fields) != _FIELDS[version]:
        raise NotAToken(f"{version} token has {len(fields)} fields, expected {_FIELDS[version]}")
    if version == "v2":
        body, check = text.rsplit("|", 1)
        # The check value catches any single-character slip or edit anywhere,
        # including in fields (user, host, port) that carry no signature.
        if not _CHECK.fullmatch(check) or not hmac.compare_digest(check, _check_value(body)):
            raise ChecksumMismatch("check value does not match the token")
    name, user, host, port_text, key_b64, fp = fields[2:8]
    # Each field has a narrow grammar: these values reach ssh command lines,
    # authorized_keys comments and file names.
    if not grammar.is_name(name):
        raise BadField("name")
    if not grammar.is_user(user):
        raise BadField("user")
    if not grammar.is_host(host):
        raise BadField("host")
    port = grammar.parse_port(port_text)
    if port is None:
        raise BadField("port")
    key = _decode_key(key_b64)
    if not is_fingerprint(fp):
        raise BadField("fingerprint")
    # Re-derive the fingerprint from the key itself: a token whose key was
    # swapped or truncated no longer matches the fingerprint the operator saw.
    if not hmac.compare_digest(fp, key.fingerprint):
        raise FingerprintMismatch(f"token says {fp}, key is {key.fingerprint}")
    host_fps: tuple[str, ...] = ()
    if version == "v2" and fields[8]:
        host_fps = tuple(fields[8].split(","))
        if len(host_fps) > MAX_HOST_KEYS or not all(is_fingerprint(h) for h in host_fps):
            raise BadField("host key fingerprints")
        if len(set(host_fps)) != len(host_fps):
            raise BadField("host key fingerprints")
    return Token(version, name, user, host, port, key, host_fps)


def _decode_key(key_b64: str) -> PublicKey:
    try:
        raw = base64.b64decode(key_b64, validate=True)
        if base64.b64encode(raw).decode("ascii") != key_b64:
            raise ValueError("not canonical base64")
        line = raw.decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadField("key") from None
    # Shell peers may encode the .pub file with its trailing newline; any
    # other control character or a second line is refused.
    if line.endswith("\n"):
        line = line[:-1]
    if not line.isprintable():
        raise BadField("key")
    try:
        return parse_public_key(line)
    except ValueError:
        raise BadField("key") from None
