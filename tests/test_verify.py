"""peerkit.verify: the out-of-band verification code both operators read aloud."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest

from peerkit.verify import DIGITS, GROUPS, fingerprint_groups, verification_code

CODE = re.compile(r"[0-9]{5}( [0-9]{5}){5}", re.ASCII)
FP_A = "SHA256:" + "A" * 43
FP_B = "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8"
# Derived once by hand (SHA-256 over the domain and both fingerprints, sorted;
# the first 13 bytes as an integer mod 10**30): a change here breaks every
# pairing ceremony in the field, so it must be deliberate.
GOLDEN = "60730 50196 83637 02395 72813 23329"


def random_fingerprint() -> str:
    return "SHA256:" + base64.b64encode(os.urandom(32)).decode("ascii").rstrip("=")


def test_golden_value_is_stable():
    assert verification_code(FP_A, FP_B) == GOLDEN
    assert verification_code(FP_B, FP_A) == GOLDEN


def test_golden_value_matches_its_definition():
    first, second = sorted((FP_A, FP_B))
    digest = hashlib.sha256(b"peerkit-verify-v1\0" + first.encode() + b"\0" + second.encode()).digest()
    number = int.from_bytes(digest[:13], "big") % 10 ** 30
    assert GOLDEN.replace(" ", "") == f"{number:030d}"


def test_shape_is_six_groups_of_five_digits():
    assert (GROUPS, DIGITS) == (6, 5)
    for _ in range(200):
        code = verification_code(random_fingerprint(), random_fingerprint())
        assert CODE.fullmatch(code), code
        assert [len(g) for g in code.split(" ")] == [5] * 6


def test_leading_zeros_are_kept():
    # Some pair among many must produce a code starting with 0: the padding
    # keeps it 30 digits instead of dropping them.
    codes = [verification_code(random_fingerprint(), FP_B) for _ in range(400)]
    assert any(c.startswith("0") for c in codes)
    assert all(CODE.fullmatch(c) for c in codes)


def test_argument_order_does_not_matter():
    for _ in range(300):
        a, b = random_fingerprint(), random_fingerprint()
        assert verification_code(a, b) == verification_code(b, a)


def test_same_fingerprint_twice_still_gives_a_code():
    assert CODE.fullmatch(verification_code(FP_A, FP_A))


def test_changing_either_fingerprint_changes_the_code():
    base = verification_code(FP_A, FP_B)
    # One character anywhere in either half: a swapped token.
    for i in range(len("SHA256:"), len(FP_B)):
        other = FP_B[:i] + ("x" if FP_B[i] != "x" else "y") + FP_B[i + 1:]
        assert verification_code(FP_A, other) != base
        assert verification_code(other, FP_A) != base
    for i in range(len("SHA256:"), len(FP_A)):
        other = FP_A[:i] + "B" + FP_A[i + 1:]
        assert verification_code(other, FP_B) != base


def test_no_collisions_over_many_random_pairs():
    seen: dict[str, frozenset] = {}
    fps = [random_fingerprint() for _ in range(3000)]
    for i in range(len(fps) - 1):
        for a, b in ((fps[i], fps[i + 1]), (fps[i], fps[(i * 7 + 3) % len(fps)])):
            if a == b:
                continue
            pair = frozenset((a, b))
            code = verification_code(a, b)
            assert seen.setdefault(code, pair) == pair, f"collision: {code}"
    assert len(seen) > 5000


def test_a_mitm_substitution_is_visible_on_both_sides():
    # Alice pairs Mallory's token thinking it is Bob's; Bob pairs Mallory's
    # thinking it is Alice's.  Each side computes with the fingerprint it holds.
    alice, bob, mallory = random_fingerprint(), random_fingerprint(), random_fingerprint()
    at_alice = verification_code(alice, mallory)
    at_bob = verification_code(bob, mallory)
    assert at_alice != at_bob
    assert verification_code(alice, bob) not in (at_alice, at_bob)


def test_fingerprint_groups():
    assert fingerprint_groups(FP_B) == "SHA256: nThb g6kX UpJW Gl7E 1IGO CspR omTx dCAR LviK w6E5 SY8"
    for _ in range(50):
        fp = random_fingerprint()
        text = fingerprint_groups(fp)
        assert text.startswith("SHA256: ")
        groups = text[len("SHA256: "):].split(" ")
        assert all(len(g) == 4 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 4
        assert "SHA256:" + "".join(groups) == fp


@pytest.mark.parametrize("fp,expected", [
    ("SHA256:abcd", "SHA256: abcd"),
    ("SHA256:abcde", "SHA256: abcd e"),
    ("abcdefgh", "SHA256: abcd efgh"),  # a bare body gets the prefix
])
def test_fingerprint_groups_edges(fp, expected):
    assert fingerprint_groups(fp) == expected
