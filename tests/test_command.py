"""peerkit.command: SSH_ORIGINAL_COMMAND accepts exactly three forms, nothing else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit.command import MAX_COMMAND, Request, parse_command
from peerkit.errors import BadSlug, PeerRefused


@pytest.mark.parametrize("text,expected", [
    ("ping", Request("ping")),
    ("list-apps", Request("list-apps")),
    ("stream-app nextcloud", Request("stream-app", "nextcloud")),
    ("stream-app a", Request("stream-app", "a")),
    ("stream-app 0", Request("stream-app", "0")),
    ("stream-app my-app-2", Request("stream-app", "my-app-2")),
    ("stream-app " + "a" * 63, Request("stream-app", "a" * 63)),
])
def test_accepted(text, expected):
    assert parse_command(text) == expected


SEND = "rsync --server --sender -lHtpre.iLsfxCIvu --numeric-ids . myapp/"


def test_with_app_info_is_a_pull_rsync_that_answers_app_info_first():
    plain, info = parse_command(SEND), parse_command("with-app-info " + SEND)
    assert (info.verb, info.slug, info.rsync, info.info) == ("rsync", "myapp", plain.rsync, True)
    assert plain.info is False and info.canonical() == "with-app-info " + SEND


@pytest.mark.parametrize("text", [
    "with-app-info", "with-app-info ping", "with-app-info app-info myapp", "with-app-info stream-app myapp",
    "with-app-info rsync --server -lHtpre.iLsfxCIvu . myapp/",  # the receiving side (a push)
    "with-app-info with-app-info " + SEND, "with-app-info  " + SEND, "WITH-APP-INFO " + SEND,
    "with-app-info -- " + SEND, SEND + " with-app-info", "with-app-info " + SEND.replace(" . ", " --delete . "),
])
def test_with_app_info_refused_forms(text):
    with pytest.raises(PeerRefused):
        parse_command(text)


REFUSED = {
    "none": None,
    "empty": "",
    "unknown verb": "help",
    "uppercase verb": "PING",
    "ping with arg": "ping x",
    "list-apps with arg": "list-apps all",
    "stream-app without slug": "stream-app",
    "stream-app with two slugs": "stream-app app extra",
    "double space": "stream-app  app",
    "leading space": " ping",
    "trailing space": "ping ",
    "only space": " ",
    "tab": "stream-app\tapp",
    "trailing tab": "ping\t",
    "newline": "ping\nid",
    "trailing newline": "ping\n",
    "carriage return": "ping\r",
    "NUL": "ping\0",
    "escape": "\x1b[2Jping",
    "DEL": "ping\x7f",
    "Cyrillic r": "pіng",
    "Cyrillic er": "\u0440ing",
    "fullwidth": "ｐｉｎｇ",
    "non-ASCII slug": "stream-app café",
    "too long": "stream-app " + "a" * MAX_COMMAND,
    "way too long": "p" * 100_000,
    "semicolon": "ping;id",
    "and-and": "ping && id",
    "pipe": "ping | id",
    "command substitution": "$(id)",
    "backticks": "`id`",
    "ping backticks": "ping `id`",
    "option": "ping -x",
    "double dash": "-- ping",
    "sftp": "sftp",
    "internal-sftp": "internal-sftp",
    "sftp-server": "/usr/lib/openssh/sftp-server",
    "scp": "scp -f x",
    "scp to": "scp -t /tmp",
    "rsync": "rsync --server --sender -vlogDtpre.iLsfxC . /",
    "shell": "/bin/sh",
    "shell -c": "sh -c id",
    "bash": "bash",
    "git": "git-upload-pack '/srv'",
    "env prefix": "env ping",
    "quoted verb": "'ping'",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case):
    with pytest.raises(PeerRefused) as info:
        parse_command(REFUSED[case])
    assert type(info.value) is PeerRefused
    assert info.value.code == "refused"


@pytest.mark.parametrize("slug", ["../x", "..", ".", "/etc", "-rf", "--to-command=sh", "a/b", "A", "App",
                                  "a;b", "a$b", "a|b", "a*", "a.b", "a_b", "~root", "a" * 64, "-"])
def test_bad_slug(slug):
    with pytest.raises(BadSlug) as info:
        parse_command(f"stream-app {slug}")
    assert info.value.code == "bad-slug"


_ALPHABET = st.sampled_from(list("pingltsremaApP-_ 0;/.$`|\t\n\0") + ["р", "ｐ", "stream-app ", "ping", "list-apps"])


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(_ALPHABET, max_size=12).map("".join)))
def test_any_text_is_refused_or_canonical(text):
    try:
        request = parse_command(text)
    except (PeerRefused, BadSlug):
        return
    assert request.canonical() == text
    assert request.verb in ("ping", "list-apps", "stream-app", "receive-app", "replace-key", "rsync")
