"""Every single-character change, deletion and insertion of a v2 pairing token is refused.

The token is a real one (``pairing.our_token``) with two pinned host keys.
Each edited token goes through ``pairing.pair`` (what ``peerkit pair`` runs)
on an instance that already paired the original, next to lines of other
tools: every edit must raise a token error and leave authorized_keys
byte-identical and the peer database unchanged.  The replacement and
insertion alphabet is every printable ASCII character plus controls, NUL,
non-ASCII and look-alikes of the field separator.

One documented exception: surrounding whitespace is stripped (tokens are
pasted), so a whitespace character inserted before the first or after the
last character gives back the very same token.  Those edits are counted
separately ("same token") and must pair as ``unchanged``.

A sample also goes through the real ``peerkit pair`` command line.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from peerkit import errors, pairing
from peerkit.state import PeerStore
from peerkit.token import parse_token
from tests.hostile.counts import COUNTS
from tests.hostile.shellharness import PEER_SHELL

ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + [
    "\t", "\n", "\r", "\x0b", "\x0c", "\x00", "\x1b", "\x7f", "\x80", "\xa0", "\xe9", "\u200b", "\ufeff",
    "\uff5c", "\u01c0", "\u2223", "\u0131", "\uff21",
]
FOREIGN = ("# keys managed by hand\n"
           'command="/usr/bin/rrsync -ro /srv/",no-pty ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@nas\n'
           "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF9hbGljZV9sYXB0b3Bfa2V5X2Zvcl90ZXN0cw admin@laptop\n")
TOKEN_CODES = {"bad-token", "not-a-token", "unsupported-version", "fingerprint-mismatch", "bad-field",
               "checksum-mismatch"}


def _instance(root: Path, name: str, host_keys: list[str]):
    overrides = {
        "name": name, "apps_dir": str(root / "apps"), "backups_dir": str(root / "backups"),
        "state_dir": str(root / "state"), "peer_shell": str(PEER_SHELL),
        "ssh": {"user": "peer", "host": f"{name}.example.test", "port": 2222, "identity": str(root / "id"),
                "authorized_keys": str(root / "ssh" / "authorized_keys"), "host_keys": host_keys},
    }
    return pairing.init(root / "config.yaml", overrides).config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    host_keys = []
    for kind in ("ed25519", "rsa"):
        key = root / f"host_{kind}"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
        host_keys.append(str(key) + ".pub")
    issuer = _instance(root / "beta", "beta", host_keys)
    alpha = _instance(root / "alpha", "alpha", [])
    alpha.ssh.authorized_keys.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    alpha.ssh.authorized_keys.write_text(FOREIGN)
    token = pairing.our_token(issuer, "v2")[0]
    assert token.startswith("lp-peer|v2|") and len(parse_token(token).host_key_fingerprints) == 2
    assert pairing.pair(alpha, token).outcome == "added"
    return alpha, token


def mutations(token: str):
    """(kind, position, text) for every single-character edit."""
    for i, ch in enumerate(token):
        for c in ALPHABET:
            if c != ch:
                yield "change", i, token[:i] + c + token[i + 1:]
        yield "delete", i, token[:i] + token[i + 1:]
    for i in range(len(token) + 1):
        for c in ALPHABET:
            yield "insert", i, token[:i] + c + token[i:]


def _rows(cfg) -> list[tuple]:
    with PeerStore(cfg.db_path) as store:
        return [(p.name, json.dumps(p.config, sort_keys=True), p.expires_at, json.dumps(p.permissions))
                for p in store.all()]


def test_every_single_character_edit_of_a_v2_token_is_refused(setup):
    cfg, token = setup
    ak = cfg.ssh.authorized_keys
    before, rows = ak.read_bytes(), _rows(cfg)
    assert before.startswith(FOREIGN.encode()) and before.count(b"\n") == 4
    tried = rejected = same = 0
    codes: dict[str, int] = {}
    for kind, pos, text in mutations(token):
        tried += 1
        try:
            result = pairing.pair(cfg, text)
        except errors.TokenError as exc:
            rejected += 1
            codes[exc.code] = codes.get(exc.code, 0) + 1
        else:
            # Only surrounding whitespace may be forgiven, and it must be the same token.
            assert kind == "insert" and pos in (0, len(token)) and text.strip() == token, (kind, pos, text)
            assert result.outcome == "unchanged", result
            same += 1
        data = ak.read_bytes()
        assert data == before, (kind, pos, text)
    assert _rows(cfg) == rows
    assert os.stat(ak).st_mode & 0o777 == 0o600
    assert set(codes) <= TOKEN_CODES and {"checksum-mismatch", "not-a-token"} <= set(codes), codes
    assert tried == len(token) * len(ALPHABET) + (len(token) + 1) * len(ALPHABET), tried
    assert same == 2 * sum(1 for c in ALPHABET if c.strip() == ""), same
    COUNTS.tokens += tried
    COUNTS.tokens_rejected += rejected
    COUNTS.tokens_same += same


def test_a_sample_of_edits_through_the_peerkit_cli(setup):
    cfg, token = setup
    ak = cfg.ssh.authorized_keys
    before = ak.read_bytes()
    rng = random.Random(7)
    edits = [m for m in mutations(token) if "\x00" not in m[2] and m[2].strip() != token]
    sample = rng.sample(edits, 12)
    for kind, pos, text in sample:
        proc = subprocess.run([sys.executable, "-m", "peerkit.cli", "--config", str(cfg.path), "--json", "pair", text],
                              capture_output=True, text=True, timeout=60)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert 20 <= proc.returncode <= 25 and result["ok"] is False, (kind, pos, text, proc.stderr)
        assert result["error"] in TOKEN_CODES, result
        assert ak.read_bytes() == before, (kind, pos, text)
        COUNTS.tokens += 1
        COUNTS.tokens_rejected += 1
