"""Out-of-band verification codes: both operators read the same digits aloud.

The code is derived from both instances' key fingerprints, sorted, so it is
the same on both sides; if either token was swapped on its way (a
man-in-the-middle pasting their own), one fingerprint differs and so does
the code.
"""

from __future__ import annotations

import hashlib

GROUPS = 6
DIGITS = 5
_DOMAIN = b"peerkit-verify-v1\0"


def verification_code(fingerprint_a: str, fingerprint_b: str) -> str:
    """Return six groups of five digits for the pair of key fingerprints (order-independent)."""
    first, second = sorted((fingerprint_a, fingerprint_b))
    digest = hashlib.sha256(_DOMAIN + first.encode("ascii") + b"\0" + second.encode("ascii")).digest()
    # ~100 bits from the digest, as 30 decimal digits.
    number = int.from_bytes(digest[:13], "big") % 10 ** (GROUPS * DIGITS)
    text = f"{number:0{GROUPS * DIGITS}d}"
    return " ".join(text[i:i + DIGITS] for i in range(0, len(text), DIGITS))


def fingerprint_groups(fingerprint: str) -> str:
    """Return our half for reading aloud: the fingerprint in groups of four."""
    body = fingerprint.removeprefix("SHA256:")
    return "SHA256: " + " ".join(body[i:i + 4] for i in range(0, len(body), 4))
