"""OpenSSH public keys: parse a key line, check its structure, fingerprint it.

Pure functions only; nothing here touches the disk or imports a crypto
library, so peer-shell and the token parser stay cheap to import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

ED25519 = "ssh-ed25519"

_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


@dataclass(frozen=True)
class PublicKey:
    """An OpenSSH public key: its type, raw blob and optional comment."""

    kind: str
    blob: bytes
    comment: str = ""

    @property
    def b64(self) -> str:
        return base64.b64encode(self.blob).decode("ascii")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)

    def line(self, comment: str | None = None) -> str:
        """Return the key as one OpenSSH line, with ``comment`` if given."""
        text = self.comment if comment is None else comment
        return f"{self.kind} {self.b64} {text}".rstrip()


def fingerprint(blob: bytes) -> str:
    """Return the SHA256 fingerprint exactly as ``ssh-keygen -lf`` prints it."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def is_fingerprint(text: str) -> bool:
    """Tell whether ``text`` is a well-formed SHA256 fingerprint."""
    return _FINGERPRINT.fullmatch(text) is not None


def _ssh_strings(blob: bytes) -> list[bytes]:
    """Split an SSH wire-format blob into its length-prefixed strings."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ValueError("truncated length")
        (n,) = struct.unpack(">I", blob[pos:pos + 4])
        pos += 4
        if pos + n > len(blob):
            raise ValueError("truncated string")
        out.append(blob[pos:pos + n])
        pos += n
    return out


def decode_blob(kind: str, b64: str) -> bytes:
    """Decode and structurally check a key blob; raise ValueError if malformed."""
    # Strict base64 only: lenient decoders skip junk, which would let two
    # different texts name the same key and confuse duplicate detection.
    if not _B64.fullmatch(b64):
        raise ValueError("key is not base64")
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error as exc:
        raise ValueError("key is not base64") from exc
    if base64.b64encode(blob).decode("ascii") != b64:
        raise ValueError("key base64 is not canonical")
    parts = _ssh_strings(blob)
    if not parts or parts[0].decode("ascii", "replace") != kind:
        raise ValueError("key type does not match its blob")
    # Only ed25519 is accepted from peers: one well-understood key type
    # means no RSA-size or curve downgrade games in a token.
    if kind == ED25519 and (len(parts) != 2 or len(parts[1]) != 32):
        raise ValueError("malformed ed25519 key")
    return blob


def parse_public_key(line: str, *, allowed: tuple[str, ...] = (ED25519,)) -> PublicKey:
    """Parse ``<type> <base64> [comment]`` into a PublicKey; raise ValueError."""
    fields = line.strip().split(None, 2)
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line")
    kind, b64 = fields[0], fields[1]
    if kind not in allowed:
        raise ValueError(f"key type {kind[:40]!r} is not accepted")
    blob = decode_blob(kind, b64)
    comment = fields[2] if len(fields) == 3 else ""
    return PublicKey(kind, blob, comment)


def host_key_fingerprint(line: str) -> str:
    """Return the fingerprint of any OpenSSH host public key line."""
    fields = line.strip().split()
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except binascii.Error as exc:
        raise ValueError("key is not base64") from exc
    parts = _ssh_strings(blob)
    if not parts or parts[0].decode("ascii", "replace") != fields[0]:
        raise ValueError("key type does not match its blob")
    return fingerprint(blob)
