"""peerkit.keys: fingerprints agree with ssh-keygen and paramiko; malformed keys are refused."""

from __future__ import annotations

import base64
import struct
import subprocess
from pathlib import Path

import paramiko
import pytest

from peerkit import keys

N_ED25519 = 4


def _ssh_keygen(path: Path, kind: str, bits: str | None = None) -> Path:
    cmd = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"test-{path.name}@example", "-f", str(path)]
    if bits:
        cmd[4:4] = ["-b", bits]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return path


def _keygen_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return out.split()[1]


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, list[Path]]:
    """Private key paths made by ssh-keygen, by type."""
    d = tmp_path_factory.mktemp("keys")
    return {
        "ed25519": [_ssh_keygen(d / f"ed{i}", "ed25519") for i in range(N_ED25519)],
        "rsa": [_ssh_keygen(d / "rsa", "rsa", "2048")],
        "ecdsa": [_ssh_keygen(d / "ecdsa256", "ecdsa", "256"), _ssh_keygen(d / "ecdsa384", "ecdsa", "384"),
                  _ssh_keygen(d / "ecdsa521", "ecdsa", "521")],
    }


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


@pytest.fixture(scope="module")
def ed_line(generated) -> str:
    return _pub(generated["ed25519"][0]).read_text()


@pytest.mark.parametrize("index", range(N_ED25519))
def test_fingerprint_matches_ssh_keygen_and_paramiko(generated, index):
    priv = generated["ed25519"][index]
    line = _pub(priv).read_text()
    key = keys.parse_public_key(line)
    expected = _keygen_fingerprint(_pub(priv))
    assert key.fingerprint == expected
    assert keys.fingerprint(key.blob) == expected
    pk = paramiko.Ed25519Key(filename=str(priv))
    assert pk.asbytes() == key.blob
    assert pk.fingerprint == expected
    # And the hand-computed form paramiko documents: base64(sha256(blob)) unpadded.
    import hashlib
    digest = base64.b64encode(hashlib.sha256(pk.asbytes()).digest()).decode().rstrip("=")
    assert key.fingerprint == "SHA256:" + digest
    assert keys.is_fingerprint(key.fingerprint)


def test_distinct_keys_have_distinct_fingerprints(generated):
    fps = {keys.parse_public_key(_pub(p).read_text()).fingerprint for p in generated["ed25519"]}
    assert len(fps) == N_ED25519


def test_parse_keeps_type_blob_and_comment(generated, ed_line):
    key = keys.parse_public_key(ed_line)
    kind, b64, comment = ed_line.split()
    assert (key.kind, key.b64, key.comment) == (kind, b64, comment)
    assert key.line() == ed_line.rstrip("\n")
    assert key.line("peerkit:alpha") == f"{kind} {b64} peerkit:alpha"
    assert key.line("") == f"{kind} {b64}"
    assert keys.parse_public_key(f"  {kind} {b64}  \n") == keys.PublicKey(kind, key.blob, "")
    # A comment may contain spaces; it is kept as is.
    assert keys.parse_public_key(f"{kind} {b64} two words").comment == "two words"


@pytest.mark.parametrize("kind,index", [("rsa", 0), ("ecdsa", 0), ("ecdsa", 1), ("ecdsa", 2),
                                        ("ed25519", 0)])
def test_host_key_fingerprint_matches_ssh_keygen(generated, kind, index):
    pub = _pub(generated[kind][index])
    assert keys.host_key_fingerprint(pub.read_text()) == _keygen_fingerprint(pub)
    assert paramiko.PKey.from_path(generated[kind][index]).fingerprint == _keygen_fingerprint(pub)


@pytest.mark.parametrize("line", ["", "ssh-rsa", "ssh-ed25519 AAAA!!!!", "ssh-rsa AAAAB3NzaC1lZDI1NTE5",
                                  "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA"])
def test_host_key_fingerprint_refuses_malformed_lines(line):
    with pytest.raises(ValueError):
        keys.host_key_fingerprint(line)


def test_host_key_fingerprint_refuses_type_not_matching_blob(generated):
    kind, b64, *_ = _pub(generated["rsa"][0]).read_text().split()
    with pytest.raises(ValueError):
        keys.host_key_fingerprint(f"ssh-ed25519 {b64}")


def _noncanonical(b64: str) -> str:
    """Set the unused low bits of the last base64 digit: same bytes, other text."""
    data = b64.rstrip("=")
    pad = b64[len(data):]
    assert pad, "needs a blob whose length is not a multiple of 3"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = alphabet.index(data[-1]) | (1 if len(pad) == 1 else 3)
    other = data[:-1] + alphabet[value] + pad
    assert other != b64 and base64.b64decode(other) == base64.b64decode(b64)
    return other


def _malformed(generated) -> dict[str, tuple[str, tuple[str, ...]]]:
    ed_kind, ed_b64, _ = _pub(generated["ed25519"][0]).read_text().split()
    ec_kind, ec_b64, _ = _pub(generated["ecdsa"][0]).read_text().split()
    rsa_line = _pub(generated["rsa"][0]).read_text()
    blob = base64.b64decode(ed_b64)
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    ed = (keys.ED25519,)
    return {
        "empty": ("", ed),
        "type only": ("ssh-ed25519", ed),
        "bad base64 chars": ("ssh-ed25519 AAAA$$$$AAAA", ed),
        "base64 with inner padding": (f"ssh-ed25519 {ed_b64[:8]}=={ed_b64[8:]}", ed),
        "base64 missing padding": (f"{ec_kind} {ec_b64.rstrip('=')}", (ec_kind,)),
        "non-canonical base64": (f"{ec_kind} {_noncanonical(ec_b64)}", (ec_kind,)),
        "type inside blob differs": (f"ssh-ed25519 {ec_b64}", ed),
        "type inside blob renamed": (
            "ssh-ed25519 " + enc(_ssh_string(b"ssh-ed25518") + blob[15:]), ed),
        "truncated blob": ("ssh-ed25519 " + enc(blob[:-3]), ed),
        "truncated length prefix": ("ssh-ed25519 " + enc(blob + b"\0\0"), ed),
        "short ed25519 key": ("ssh-ed25519 " + enc(_ssh_string(b"ssh-ed25519") + _ssh_string(bytes(31))), ed),
        "long ed25519 key": ("ssh-ed25519 " + enc(_ssh_string(b"ssh-ed25519") + _ssh_string(bytes(33))), ed),
        "ed25519 with extra field": ("ssh-ed25519 " + enc(blob + _ssh_string(b"x")), ed),
        "empty blob": ("ssh-ed25519 " + enc(b"\0\0\0\0"), ed),
        "rsa where only ed25519 allowed": (rsa_line, ed),
        "ecdsa where only ed25519 allowed": (f"{ec_kind} {ec_b64}", ed),
        "options before the key": (f"restrict ssh-ed25519 {ed_b64}", ed),
        "unknown type": (f"ssh-ed448 {ed_b64}", ("ssh-ed448",)),
    }


MALFORMED = ["empty", "type only", "bad base64 chars", "base64 with inner padding",
             "base64 missing padding", "non-canonical base64", "type inside blob differs",
             "type inside blob renamed", "truncated blob", "truncated length prefix",
             "short ed25519 key", "long ed25519 key", "ed25519 with extra field", "empty blob",
             "rsa where only ed25519 allowed", "ecdsa where only ed25519 allowed",
             "options before the key", "unknown type"]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_key_lines_are_refused(generated, case):
    line, allowed = _malformed(generated)[case]
    with pytest.raises(ValueError):
        keys.parse_public_key(line, allowed=allowed)


def test_malformed_table_is_complete(generated):
    assert sorted(_malformed(generated)) == sorted(MALFORMED)


def test_other_types_parse_when_allowed(generated):
    # The controls for the refusals above: the same lines are fine when their type is allowed.
    ec_kind, ec_b64, _ = _pub(generated["ecdsa"][0]).read_text().split()
    assert keys.parse_public_key(f"{ec_kind} {ec_b64}", allowed=(ec_kind,)).kind == ec_kind
    rsa_line = _pub(generated["rsa"][0]).read_text()
    key = keys.parse_public_key(rsa_line, allowed=("ssh-rsa",))
    assert key.fingerprint == _keygen_fingerprint(_pub(generated["rsa"][0]))


@pytest.mark.parametrize("text,ok", [
    ("SHA256:" + "A" * 43, True),
    ("SHA256:" + "A" * 42, False),
    ("SHA256:" + "A" * 44, False),
    ("SHA256:" + "A" * 42 + "=", False),
    ("sha256:" + "A" * 43, False),
    ("MD5:" + "A" * 43, False),
    ("SHA256:" + "A" * 42 + "-", False),
    ("", False),
])
def test_is_fingerprint(text, ok):
    assert keys.is_fingerprint(text) is ok
