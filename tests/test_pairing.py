"""peerkit.pairing: init, tokens, pair and unpair between real instances in temp dirs."""

from __future__ import annotations

import multiprocessing
import os
import stat
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from peerkit import pairing
from peerkit.authkeys import parse_line, render_line
from peerkit.config import Config, read_config
from peerkit.errors import (BadName, ConfigError, KeyInUse, NoSuchPeer, PeerExists, PeerkitError,
                            SelfPairing)
from peerkit.keys import PublicKey
from peerkit.state import PeerStore
from peerkit.token import Token, emit_token, parse_token
from tests.instances import make_instance

PEER_SHELL = Path(sys.executable).parent / "peer-shell"
FOREIGN = (
    "# keys managed by hand\r\n"
    'command="/usr/bin/rrsync -ro /srv/",no-pty ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 backup@nas\n'
    "\n"
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF9hbGljZV9sYXB0b3Bfa2V5X2Zvcl90ZXN0cw admin@laptop\n"
)


def token_of(cfg: Config, version: str = "v2") -> str:
    return pairing.our_token(cfg, version)[0]


def ak_bytes(cfg: Config) -> bytes | None:
    try:
        return cfg.ssh.authorized_keys.read_bytes()
    except FileNotFoundError:
        return None


def ak_lines(cfg: Config) -> list[str]:
    return (ak_bytes(cfg) or b"").decode().splitlines()


def ak_mode(cfg: Config) -> int:
    return stat.S_IMODE(cfg.ssh.authorized_keys.stat().st_mode)


def rows(cfg: Config) -> dict:
    with PeerStore(cfg.db_path) as store:
        return {p.name: p for p in store.all()}


def random_key() -> PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (b"ssh-ed25519", raw))
    return PublicKey("ssh-ed25519", blob, "")


@pytest.fixture
def alpha(tmp_path) -> Config:
    return make_instance(tmp_path / "alpha", "alpha")


@pytest.fixture
def beta(tmp_path) -> Config:
    return make_instance(tmp_path / "beta", "beta")


# -- init and token ------------------------------------------------------------

def test_init_creates_everything_once(tmp_path):
    cfg = make_instance(tmp_path / "a", "alpha")
    for d in (cfg.apps_dir, cfg.backups_dir, cfg.state_dir):
        assert d.is_dir()
    assert stat.S_IMODE(cfg.ssh.identity.stat().st_mode) == 0o600
    assert cfg.db_path.exists()
    pub = cfg.ssh.identity.with_name("id.pub").read_text()
    assert pub.startswith("ssh-ed25519 ") and pub.rstrip().endswith("peerkit:alpha")
    # ssh-keygen agrees the key pair is a key pair.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(cfg.ssh.identity)], capture_output=True, text=True,
                             check=True).stdout
    assert derived.split()[:2] == pub.split()[:2]
    again = pairing.init(cfg.path)
    assert not again.config_created and not again.identity_created
    assert cfg.ssh.identity.with_name("id.pub").read_text() == pub


def test_token_carries_our_settings_and_host_keys(tmp_path):
    hk = tmp_path / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True, capture_output=True)
    missing = tmp_path / "missing.pub"
    cfg = make_instance(tmp_path / "a", "alpha", host_keys=[str(hk) + ".pub", str(hk) + ".pub", str(missing)],
                        port=2222)
    text, warnings = pairing.our_token(cfg)
    tok = parse_token(text)
    keygen_fp = subprocess.run(["ssh-keygen", "-lf", str(hk) + ".pub"], capture_output=True, text=True,
                               check=True).stdout.split()[1]
    assert (tok.version, tok.name, tok.user, tok.host, tok.port) == ("v2", "alpha", "peer", "alpha.example.test", 2222)
    assert tok.host_key_fingerprints == (keygen_fp,)
    assert len(warnings) == 1 and str(missing) in warnings[0]
    v1_text, v1_warnings = pairing.our_token(cfg, "v1")
    assert v1_text.startswith("lp-peer|v1|alpha|peer|alpha.example.test|2222|") and v1_warnings == []
    _, none_warnings = pairing.our_token(make_instance(tmp_path / "b", "beta"))
    assert any("no host key" in w for w in none_warnings)


# -- pair --------------------------------------------------------------------

def test_pair_writes_exactly_one_line_and_one_row(alpha, beta):
    result = pairing.pair(alpha, token_of(beta))
    assert result.outcome == "added"
    beta_key = pairing.read_identity(beta.ssh.identity)
    expected = render_line("beta", beta_key, PEER_SHELL, alpha.path)
    assert ak_bytes(alpha) == (expected + "\n").encode()
    assert ak_mode(alpha) == 0o600
    row = rows(alpha)["beta"]
    assert row.config["fingerprint"] == beta_key.fingerprint
    assert (row.config["host"], row.config["port"], row.config["user"]) == ("beta.example.test", 22, "peer")
    assert row.config["token_version"] == "v2" and row.config["remote_name"] == "beta"
    assert list(rows(alpha)) == ["beta"]
    listed = pairing.list_peers(alpha)
    assert [(p["name"], p["authorized"]) for p in listed] == [("beta", True)]


def test_pair_under_another_name_and_with_v1(alpha, beta):
    result = pairing.pair(alpha, token_of(beta, "v1"), "backup-site")
    assert result.outcome == "added"
    (line,) = ak_lines(alpha)
    assert line.endswith(" peerkit:backup-site") and line.count("backup-site") == 2
    assert rows(alpha)["backup-site"].config["remote_name"] == "beta"
    with pytest.raises(BadName):
        pairing.pair(alpha, token_of(beta), "Bad Name")


def test_repair_is_idempotent(alpha, beta):
    token = token_of(beta)
    pairing.pair(alpha, token)
    before = ak_bytes(alpha)
    created = rows(alpha)["beta"].created_at
    for _ in range(3):
        assert pairing.pair(alpha, token).outcome == "unchanged"
    assert ak_bytes(alpha) == before
    assert list(rows(alpha)) == ["beta"] and rows(alpha)["beta"].created_at == created


def test_same_name_other_key_needs_replace(alpha, beta, tmp_path):
    impostor = make_instance(tmp_path / "impostor", "beta")
    pairing.pair(alpha, token_of(beta))
    before, before_rows = ak_bytes(alpha), rows(alpha)
    with pytest.raises(PeerExists):
        pairing.pair(alpha, token_of(impostor))
    assert ak_bytes(alpha) == before
    assert rows(alpha)["beta"].config == before_rows["beta"].config
    result = pairing.pair(alpha, token_of(impostor), replace=True)
    assert result.outcome == "replaced"
    new_key = pairing.read_identity(impostor.ssh.identity)
    assert ak_lines(alpha) == [render_line("beta", new_key, PEER_SHELL, alpha.path)]
    assert rows(alpha)["beta"].config["fingerprint"] == new_key.fingerprint


def test_row_without_line_with_other_key_also_needs_replace(alpha, beta, tmp_path):
    pairing.pair(alpha, token_of(beta))
    alpha.ssh.authorized_keys.write_text("")  # line lost, row kept
    impostor = make_instance(tmp_path / "impostor", "beta")
    with pytest.raises(PeerExists):
        pairing.pair(alpha, token_of(impostor))
    assert ak_bytes(alpha) == b""


def test_same_key_under_another_name_is_key_in_use(alpha, beta):
    pairing.pair(alpha, token_of(beta))
    before = ak_bytes(alpha)
    with pytest.raises(KeyInUse):
        pairing.pair(alpha, token_of(beta), "beta-again")
    assert ak_bytes(alpha) == before
    assert list(rows(alpha)) == ["beta"]


@pytest.mark.parametrize("options", ["", "no-pty ", 'command="/bin/true" '])
def test_key_in_a_foreign_line_is_key_in_use(alpha, beta, options):
    key = pairing.read_identity(beta.ssh.identity)
    content = FOREIGN + f"{options}{key.kind} {key.b64} someone-else"
    alpha.ssh.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    alpha.ssh.authorized_keys.write_text(content)
    with pytest.raises(KeyInUse):
        pairing.pair(alpha, token_of(beta))
    assert ak_bytes(alpha) == content.encode()
    assert rows(alpha) == {}


def test_self_token_is_refused(alpha):
    with pytest.raises(SelfPairing):
        pairing.pair(alpha, token_of(alpha))
    with pytest.raises(SelfPairing):
        pairing.pair(alpha, token_of(alpha, "v1"), "other-name")
    assert ak_bytes(alpha) is None
    assert rows(alpha) == {}


def test_missing_peer_shell_is_refused_before_writing(alpha, beta, tmp_path):
    cfg_text = alpha.path.read_text().replace(str(PEER_SHELL), str(tmp_path / "no-peer-shell"))
    alpha.path.write_text(cfg_text)
    with pytest.raises(ConfigError):
        pairing.pair(read_config(alpha.path), token_of(beta))
    assert ak_bytes(alpha) is None and rows(alpha) == {}


def test_bad_token_changes_nothing(alpha, beta):
    with pytest.raises(PeerkitError) as info:
        pairing.pair(alpha, token_of(beta)[:-1])
    assert info.value.code == "checksum-mismatch"
    assert ak_bytes(alpha) is None and rows(alpha) == {}


def test_pairing_is_symmetric(alpha, beta):
    pairing.pair(alpha, token_of(beta))
    pairing.pair(beta, token_of(alpha))
    a_key = pairing.read_identity(alpha.ssh.identity)
    b_key = pairing.read_identity(beta.ssh.identity)
    (a_line,) = ak_lines(alpha)
    (b_line,) = ak_lines(beta)
    assert parse_line(a_line).b64 == b_key.b64 and parse_line(a_line).peer == "beta"
    assert parse_line(b_line).b64 == a_key.b64 and parse_line(b_line).peer == "alpha"
    assert str(alpha.path) in a_line and str(beta.path) in b_line
    assert list(rows(alpha)) == ["beta"] and list(rows(beta)) == ["alpha"]


# -- unpair ------------------------------------------------------------------

def test_unpair_removes_only_that_line_and_row(alpha, beta, tmp_path):
    gamma = make_instance(tmp_path / "gamma", "gamma")
    alpha.ssh.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    alpha.ssh.authorized_keys.write_text(FOREIGN)
    pairing.pair(alpha, token_of(beta))
    pairing.pair(alpha, token_of(gamma))
    gamma_line = ak_lines(alpha)[-1]
    result = pairing.unpair(alpha, "beta")
    assert (result.key_removed, result.row_removed) == (True, True)
    assert ak_bytes(alpha) == (FOREIGN + gamma_line + "\n").encode()
    assert list(rows(alpha)) == ["gamma"]
    pairing.unpair(alpha, "gamma")
    assert ak_bytes(alpha) == FOREIGN.encode()
    assert rows(alpha) == {}


def test_unpair_restores_a_file_without_final_newline(alpha, beta):
    content = FOREIGN.rstrip("\n")
    alpha.ssh.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    alpha.ssh.authorized_keys.write_text(content)
    pairing.pair(alpha, token_of(beta))
    pairing.unpair(alpha, "beta")
    assert ak_bytes(alpha) == content.encode()


def test_unpair_unknown_and_bad_names(alpha, beta):
    pairing.pair(alpha, token_of(beta))
    before = ak_bytes(alpha)
    with pytest.raises(NoSuchPeer):
        pairing.unpair(alpha, "nobody")
    with pytest.raises(BadName):
        pairing.unpair(alpha, "../beta")
    assert ak_bytes(alpha) == before
    pairing.unpair(alpha, "beta")
    with pytest.raises(NoSuchPeer):
        pairing.unpair(alpha, "beta")


def test_unpair_cleans_up_half_pairings(alpha, beta):
    pairing.pair(alpha, token_of(beta))
    with PeerStore(alpha.db_path) as store:
        store.delete("beta")  # a line without a row
    assert pairing.unpair(alpha, "beta").key_removed is True
    assert ak_lines(alpha) == []
    pairing.pair(alpha, token_of(beta))
    alpha.ssh.authorized_keys.write_text("")  # a row without a line
    result = pairing.unpair(alpha, "beta")
    assert (result.key_removed, result.row_removed) == (False, True)
    assert rows(alpha) == {}


def test_authorized_keys_is_0600_after_every_write(alpha, beta, tmp_path):
    gamma = make_instance(tmp_path / "gamma", "gamma")
    ak = alpha.ssh.authorized_keys
    ak.parent.mkdir(parents=True, exist_ok=True)
    ak.write_text(FOREIGN)
    for step in (lambda: pairing.pair(alpha, token_of(beta)),
                 lambda: pairing.pair(alpha, token_of(gamma)),
                 lambda: pairing.unpair(alpha, "beta"),
                 lambda: pairing.pair(alpha, token_of(beta)),
                 lambda: pairing.unpair(alpha, "gamma")):
        os.chmod(ak, 0o644)
        step()
        assert ak_mode(alpha) == 0o600
    assert stat.S_IMODE(ak.parent.stat().st_mode) & 0o022 == 0


# -- concurrency ----------------------------------------------------------------

_BARRIER = None


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _worker(task: tuple[str, str, str]) -> str:
    op, cfg_path, arg = task
    cfg = read_config(cfg_path)
    _BARRIER.wait(timeout=120)  # every process starts its edit at the same moment
    try:
        if op == "pair":
            return pairing.pair(cfg, arg).outcome
        return "removed" if pairing.unpair(cfg, arg).key_removed else "row-only"
    except PeerkitError as exc:
        return exc.code


def test_concurrent_pair_and_unpair_lose_nothing(alpha):
    n = 20
    ak = alpha.ssh.authorized_keys
    ak.parent.mkdir(parents=True, exist_ok=True)
    ak.write_text(FOREIGN)
    names = [f"peer-{i:02d}" for i in range(n)]
    keys = {name: random_key() for name in names}
    tokens = {name: emit_token(Token("v2", name, "peer", f"{name}.test", 22, keys[name])) for name in names}
    expected = {name: render_line(name, keys[name], PEER_SHELL, alpha.path) for name in names}

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    with ctx.Pool(n, initializer=_init_worker, initargs=(barrier,)) as pool:
        outcomes = pool.map(_worker, [("pair", str(alpha.path), tokens[name]) for name in names], chunksize=1)
        assert outcomes == ["added"] * n
        data = ak.read_bytes().decode()
        assert data.startswith(FOREIGN)
        assert Counter(data[len(FOREIGN):].splitlines()) == Counter(expected.values())
        assert ak_mode(alpha) == 0o600
        assert sorted(rows(alpha)) == names

        # Then twenty processes race to unpair half of the peers, two per name:
        # exactly one of each pair wins, the other finds nothing to remove.
        gone = names[: n // 2]
        outcomes = pool.map(_worker, [("unpair", str(alpha.path), name) for name in gone * 2], chunksize=1)
        pool.close()
        pool.join()
    by_name = {name: sorted(outcomes[i::len(gone)]) for i, name in enumerate(gone)}
    assert by_name == {name: ["no-such-peer", "removed"] for name in gone}
    data = ak.read_bytes().decode()
    assert data.startswith(FOREIGN)
    kept = names[n // 2:]
    assert Counter(data[len(FOREIGN):].splitlines()) == Counter(expected[name] for name in kept)
    assert ak_mode(alpha) == 0o600
    assert sorted(rows(alpha)) == kept
    assert {p["name"]: p["authorized"] for p in pairing.list_peers(alpha)} == {name: True for name in kept}
    assert [p.name for p in alpha.ssh.authorized_keys.parent.iterdir() if p.name.endswith(".tmp")] == []
