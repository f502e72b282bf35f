"""peerkit.authkeys: exact key lines, and edits that leave every other byte alone."""

from __future__ import annotations

import base64
import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit import authkeys
from peerkit.authkeys import AuthorizedKeys, KeyLine, parse_line, render_line
from peerkit.errors import AuthorizedKeysError
from peerkit.keys import PublicKey

SHELL = Path("/usr/local/bin/peer-shell")
CFG = Path("/home/peerkit/.config/peerkit/config.yaml")


def make_key(seed: int) -> PublicKey:
    raw = bytes((seed * 7 + i) % 256 for i in range(32))
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (b"ssh-ed25519", raw))
    return PublicKey("ssh-ed25519", blob, f"k{seed}")


KEY = make_key(1)
KEY2 = make_key(2)
B64 = KEY.b64
FOREIGN_RSA = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 admin@laptop"


# -- render_line ---------------------------------------------------------------

def test_render_line_exact_format():
    line = render_line("beta", KEY, SHELL, CFG)
    assert line == (f'restrict,command="/usr/local/bin/peer-shell --config '
                    f'/home/peerkit/.config/peerkit/config.yaml beta" ssh-ed25519 {B64} peerkit:beta')
    assert "\n" not in line


def test_render_line_extra_options_sit_between_restrict_and_command():
    line = render_line("beta", KEY, SHELL, CFG, ("from=\"10.0.0.1\"",))
    assert line.startswith('restrict,from="10.0.0.1",command="/usr/local/bin/peer-shell ')


def test_rendered_line_parses_back():
    entry = parse_line(render_line("beta-2", KEY, SHELL, CFG))
    assert entry == KeyLine(f'restrict,command="{SHELL} --config {CFG} beta-2"', "ssh-ed25519", B64,
                            "peerkit:beta-2")
    assert entry.peer == "beta-2"


@pytest.mark.parametrize("shell,cfg", [
    ("/opt/peer shell", CFG),
    ('/opt/peer"shell', CFG),
    ("/opt/peer'shell", CFG),
    ("/opt/$(id)", CFG),
    ("/opt/`id`", CFG),
    ("/opt/x;id", CFG),
    ("/opt/x|id", CFG),
    ("/opt/x&id", CFG),
    ("/opt/x*", CFG),
    ("/opt/x\\y", CFG),
    ("/opt/x\ny", CFG),
    ("/opt/pеer-shell", CFG),  # Cyrillic e
    (SHELL, "/home/my docs/config.yaml"),
    (SHELL, '/home/x"/config.yaml'),
    (SHELL, "/home/$USER/config.yaml"),
    (SHELL, "/home/x/config.yaml\nssh-ed25519"),
])
def test_render_line_refuses_unsafe_paths(shell, cfg):
    with pytest.raises(AuthorizedKeysError):
        render_line("beta", KEY, Path(shell), Path(cfg))


@pytest.mark.parametrize("peer", ["be ta", "beta;id", 'beta"', "beta$x", ""])
def test_render_line_refuses_unsafe_peer_words(peer):
    with pytest.raises(AuthorizedKeysError):
        render_line(peer, KEY, SHELL, CFG)


# -- parse_line ------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    (f"ssh-ed25519 {B64}", KeyLine("", "ssh-ed25519", B64, "")),
    (f"ssh-ed25519 {B64} user@host", KeyLine("", "ssh-ed25519", B64, "user@host")),
    (f"ssh-ed25519 {B64} two  word comment", KeyLine("", "ssh-ed25519", B64, "two  word comment")),
    (f"ssh-ed25519\t{B64}\tc", KeyLine("", "ssh-ed25519", B64, "c")),
    (f"  ssh-ed25519 {B64} c  ", KeyLine("", "ssh-ed25519", B64, "c")),
    (f"ssh-ed25519 {B64} peerkit:beta\r", KeyLine("", "ssh-ed25519", B64, "peerkit:beta")),
    (f"no-pty ssh-ed25519 {B64} c", KeyLine("no-pty", "ssh-ed25519", B64, "c")),
    (f'command="echo hi there",no-pty ssh-ed25519 {B64} c',
     KeyLine('command="echo hi there",no-pty', "ssh-ed25519", B64, "c")),
    (f'command="echo \\"a b\\" c",from="1.2.3.4" ssh-rsa {B64} x y',
     KeyLine('command="echo \\"a b\\" c",from="1.2.3.4"', "ssh-rsa", B64, "x y")),
    (f'environment="A=ssh-ed25519 x" ecdsa-sha2-nistp256 {B64}',
     KeyLine('environment="A=ssh-ed25519 x"', "ecdsa-sha2-nistp256", B64, "")),
    (f"cert-authority ssh-ed25519-cert-v01@openssh.com {B64} ca",
     KeyLine("cert-authority", "ssh-ed25519-cert-v01@openssh.com", B64, "ca")),
    (f"sk-ssh-ed25519@openssh.com {B64} yubikey", KeyLine("", "sk-ssh-ed25519@openssh.com", B64, "yubikey")),
])
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", ["", "   ", "\r", "# a comment", f"  # ssh-ed25519 {B64} peerkit:beta",
                                  "ssh-ed25519", "garbage here", f"no-pty ssh-ed999 {B64}",
                                  'command="unterminated ssh-ed25519 AAAA', "ssh-ed25519x AAAA"])
def test_parse_line_returns_none_for_non_keys(line):
    assert parse_line(line) is None


def test_peer_is_only_for_peerkit_comments():
    assert parse_line(f"ssh-ed25519 {B64} peerkit:beta").peer == "beta"
    assert parse_line(f"ssh-ed25519 {B64} user@host").peer is None
    assert parse_line(f"ssh-ed25519 {B64} xpeerkit:beta").peer is None
    assert parse_line(f"ssh-ed25519 {B64}").peer is None


# -- whole-file edits ---------------------------------------------------------------

OURS = render_line("beta", KEY, SHELL, CFG)
SHAPES = {
    "empty": "",
    "single newline": "\n",
    "two newlines": "\n\n",
    "one key": f"{FOREIGN_RSA}\n",
    "no trailing newline": f"{FOREIGN_RSA}",
    "CRLF": f"# managed by hand\r\n{FOREIGN_RSA}\r\n",
    "CRLF without final newline": f"{FOREIGN_RSA}\r\n# x",
    "comments and blanks": f"# header\n\n{FOREIGN_RSA}\n   \n# footer\n\n",
    "options": f'command="/usr/bin/rrsync -ro /srv/",no-pty,from="10.0.0.0/8" ssh-ed25519 {KEY2.b64} backup\n',
    "escaped quotes": f'command="echo \\"hi there\\"" ssh-ed25519 {KEY2.b64} x\n',
    "tabs and trailing spaces": f"\tssh-ed25519\t{KEY2.b64}\tc  \n",
    "garbage and non-UTF-8": "not a key \udcff\udcfe at all\n\x00\x1b[31m\n",
    "with a peerkit line": f"{FOREIGN_RSA}\n{render_line('gamma', KEY2, SHELL, CFG)}\n",
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_round_trip_is_byte_identical(shape):
    text = SHAPES[shape]
    assert AuthorizedKeys(text).render() == text


@pytest.mark.parametrize("shape", list(SHAPES))
def test_add_then_remove_restores_original_bytes(shape):
    text = SHAPES[shape]
    keys = AuthorizedKeys(text)
    assert keys.set_peer("beta", OURS) == "added"
    rendered = keys.render()
    assert rendered.count(OURS) == 1
    assert rendered.endswith(OURS + "\n") or (rendered.endswith(OURS) and not text.endswith("\n") and text)
    again = AuthorizedKeys(rendered)
    assert again.peers()["beta"].b64 == KEY.b64
    assert again.remove_peer("beta") is True
    assert again.render() == text


def test_set_peer_is_idempotent_and_replaces_in_place():
    keys = AuthorizedKeys(f"{FOREIGN_RSA}\n")
    assert keys.set_peer("beta", OURS) == "added"
    once = keys.render()
    assert keys.set_peer("beta", OURS) == "unchanged"
    assert keys.render() == once
    keys.lines.append("# after")
    other = render_line("beta", KEY2, SHELL, CFG)
    assert keys.set_peer("beta", other) == "replaced"
    assert keys.render() == f"{FOREIGN_RSA}\n{other}\n# after\n"
    assert keys.find_peer("beta") == 1
    assert keys.find_peer("nope") is None


def test_remove_peer_only_touches_that_peer():
    gamma = render_line("gamma", KEY2, SHELL, CFG)
    text = f"# top\n{OURS}\n{FOREIGN_RSA}\n{gamma}\n"
    keys = AuthorizedKeys(text)
    assert set(keys.peers()) == {"beta", "gamma"}
    assert keys.remove_peer("beta") is True
    assert keys.render() == f"# top\n{FOREIGN_RSA}\n{gamma}\n"
    assert keys.remove_peer("beta") is False
    assert keys.remove_peer("nope") is False
    assert keys.render() == f"# top\n{FOREIGN_RSA}\n{gamma}\n"


def test_remove_peer_removes_duplicates_and_crlf_variants():
    text = f"{OURS}\r\n{FOREIGN_RSA}\n{OURS}\n"
    keys = AuthorizedKeys(text)
    assert keys.remove_peer("beta") is True
    assert keys.render() == f"{FOREIGN_RSA}\n"


def test_file_level_write_and_read(tmp_path):
    path = tmp_path / "ssh" / "authorized_keys"
    assert authkeys.read_authorized_keys(path).render() == ""
    original = b"# caf\xc3\xa9 \xff\xfe binary\n" + FOREIGN_RSA.encode()
    path.parent.mkdir()
    path.write_bytes(original)
    os.chmod(path, 0o644)
    keys = authkeys.read_authorized_keys(path)
    keys.set_peer("beta", OURS)
    authkeys.write_authorized_keys(path, keys)
    # The file had no final newline; it still has none, and the old last line is intact.
    assert path.read_bytes() == original + b"\n" + OURS.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = authkeys.read_authorized_keys(path)
    keys.remove_peer("beta")
    authkeys.write_authorized_keys(path, keys)
    assert path.read_bytes() == original


def test_fix_mode(tmp_path):
    path = tmp_path / "ak"
    authkeys.fix_mode(path)  # a missing file stays missing
    assert not path.exists()
    path.write_text("x\n")
    os.chmod(path, 0o666)
    authkeys.fix_mode(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- property: foreign content survives add + remove byte for byte -----------------

_line_chars = st.characters(blacklist_characters="\n", blacklist_categories=("Cs",))
_foreign_line = st.one_of(
    st.text(_line_chars, max_size=60),
    st.sampled_from(["", "#", "# comment", FOREIGN_RSA, FOREIGN_RSA + "\r", f"no-pty ssh-ed25519 {KEY2.b64}",
                     f'command="a \\"b\\" c" ssh-ed25519 {KEY2.b64} z', "\t", " ", "\r"]),
    st.builds(lambda c: f"ssh-ed25519 {base64.b64encode(c.encode()).decode()} {c}",
              st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)),
).filter(lambda line: (parse_line(line) is None) or parse_line(line).peer is None)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_foreign_line, max_size=8), final_newline=st.booleans(), name=st.sampled_from(["beta", "x"]))
def test_foreign_content_survives_add_and_remove(lines, final_newline, name):
    text = "\n".join(lines) + ("\n" if final_newline and lines else "")
    keys = AuthorizedKeys(text)
    assert keys.render() == text
    assert keys.set_peer(name, render_line(name, KEY, SHELL, CFG)) == "added"
    after_add = AuthorizedKeys(keys.render())
    assert after_add.find_peer(name) is not None
    assert after_add.remove_peer(name) is True
    assert after_add.render() == text
