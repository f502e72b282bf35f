"""peerkit.rsyncargs: the rrsync-style allowlist for `rsync --server` requests.

The accepted forms are the exact argument vectors rsync 3.x sends to the
remote side for the options peerkit's client uses (peerkit/rsync.py
client_argv), with and without -H / -og.  Everything else is refused:
options that read or write paths of the caller's choosing, that follow
links out of the tree, that smuggle arguments past the parser (-s /
--protect-args), that run commands (-e / --rsh), and every path but one
app directory.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerkit.command import parse_command
from peerkit.errors import BadSlug, PeerRefused
from peerkit.rsyncargs import MAX_WORDS, RSYNC_PATH, RsyncRequest, find_tool, parse_rsync

CAPS = "e.iLsfxCIvu"  # rsync 3.x: "-e." then its capability letters
PULL = f"rsync --server --sender -lHogtpr{CAPS} --numeric-ids . app/"
PUSH = f"rsync --server -lHtpr{CAPS} --delete --stats --numeric-ids . app/"
RSYNC = "/usr/bin/rsync"


def words(text: str) -> list[str]:
    return text.split(" ")


# -- accepted ---------------------------------------------------------------------

# (command text as the server sees it, sender, flags word, long options)
ACCEPTED = [
    # pull, as root (-og) and not (the forms client_argv causes)
    (PULL, True, f"-lHogtpr{CAPS}", ("--numeric-ids",)),
    (f"rsync --server --sender -lHtpr{CAPS} --numeric-ids . app/", True, f"-lHtpr{CAPS}", ("--numeric-ids",)),
    # the exact order rsync 3.x writes the letters in
    ("rsync --server --sender -lHogtpre.iLsfxCIvu --numeric-ids . app/", True,
     "-lHogtpre.iLsfxCIvu", ("--numeric-ids",)),
    ("rsync --server --sender -lHtpre.iLsfxCIvu --numeric-ids . app/", True,
     "-lHtpre.iLsfxCIvu", ("--numeric-ids",)),
    # without -H, without -og
    ("rsync --server --sender -logtpre.iLsfxCIvu --numeric-ids . app/", True,
     "-logtpre.iLsfxCIvu", ("--numeric-ids",)),
    ("rsync --server --sender -ltpre.iLsfxCIvu --numeric-ids . app/", True, "-ltpre.iLsfxCIvu",
     ("--numeric-ids",)),
    ("rsync --server --sender -ltpre.iLsfxCIvu . app/", True, "-ltpre.iLsfxCIvu", ()),
    # push
    (PUSH, False, f"-lHtpr{CAPS}", ("--delete", "--stats", "--numeric-ids")),
    ("rsync --server -lHtpre.iLsfxCIvu --delete --stats --numeric-ids . app/", False,
     "-lHtpre.iLsfxCIvu", ("--delete", "--stats", "--numeric-ids")),
    ("rsync --server -lHogtpre.iLsfxCIvu --delete --stats --numeric-ids . app/", False,
     "-lHogtpre.iLsfxCIvu", ("--delete", "--stats", "--numeric-ids")),
    ("rsync --server -ltpre.iLsfxCIvu --delete --stats --numeric-ids . app/", False,
     "-ltpre.iLsfxCIvu", ("--delete", "--stats", "--numeric-ids")),
    ("rsync --server -logtpre.iLsfxCIvu --delete --stats --numeric-ids . app/", False,
     "-logtpre.iLsfxCIvu", ("--delete", "--stats", "--numeric-ids")),
    ("rsync --server -ltpre.iLsfxCIvu --delete . app/", False, "-ltpre.iLsfxCIvu", ("--delete",)),
]


@pytest.mark.parametrize("text,sender,flags,options", ACCEPTED, ids=[a[0][15:60] for a in ACCEPTED])
def test_accepted_forms(text, sender, flags, options):
    req = parse_rsync(words(text))
    assert req == RsyncRequest(sender, flags, options, "app")


@pytest.mark.parametrize("slug", ["a", "0", "my-app-2", "nextcloud", "a" * 63])
def test_accepted_slugs(slug):
    assert parse_rsync(words(f"rsync --server --sender -lHtpr{CAPS} --numeric-ids . {slug}/")).slug == slug


def test_server_argv_is_rebuilt_with_our_binary_and_directory():
    req = parse_rsync(words(PULL))
    assert req.server_argv(RSYNC, "/srv/apps/app") == [
        RSYNC, "--server", "--sender", f"-lHogtpr{CAPS}", "--numeric-ids", "--", ".", "/srv/apps/app/"]
    push = parse_rsync(words(PUSH))
    assert push.server_argv(RSYNC, "/srv/apps/.staging/", ("--link-dest=/srv/apps/app",)) == [
        RSYNC, "--server", f"-lHtpr{CAPS}", "--delete", "--stats", "--numeric-ids",
        "--link-dest=/srv/apps/app", "--", ".", "/srv/apps/.staging/"]


@pytest.mark.parametrize("text", [PULL, PUSH])
def test_full_parser_accepts_the_client_forms(text):
    request = parse_command(text)
    assert request.verb == "rsync" and request.slug == "app"
    assert request.rsync == parse_rsync(words(text))
    assert request.canonical() == text


# -- refused ------------------------------------------------------------------------

P = "rsync --server --sender"  # pull head
U = "rsync --server"  # push head
F = f"-lHtpr{CAPS}"  # an allowed flags word

# name -> command text; every one must raise PeerRefused or BadSlug.
HOSTILE = {
    # forbidden letters in the flags word
    "L follow links": f"{P} -Lr{CAPS} . app/",
    "L at the end": f"{P} -lrL{CAPS} . app/",
    "k copy-dirlinks": f"{P} -kr{CAPS} . app/",
    "K keep-dirlinks": f"{P} -Kr{CAPS} . app/",
    "s protect-args": f"{P} -sr{CAPS} . app/",
    "s inside": f"{P} -lHsr{CAPS} . app/",
    "D devices": f"{P} -Dr{CAPS} . app/",
    "z compress": f"{P} -zr{CAPS} . app/",
    "e twice in the word": f"{P} -er{CAPS} . app/",
    "e first": f"{P} -e{CAPS} . app/",
    "x one-file-system": f"{P} -xr{CAPS} . app/",
    "c checksum": f"{P} -cr{CAPS} . app/",
    "R relative": f"{P} -Rr{CAPS} . app/",
    "b backup": f"{U} -br{CAPS} . app/",
    "S sparse": f"{U} -Sr{CAPS} . app/",
    "W whole-file": f"{P} -Wr{CAPS} . app/",
    "n dry-run": f"{P} -nr{CAPS} . app/",
    "v verbose": f"{P} -vr{CAPS} . app/",
    "A acls": f"{P} -Ar{CAPS} . app/",
    "X xattrs": f"{P} -Xr{CAPS} . app/",
    "no e. capabilities": f"{P} -lr . app/",
    "digit in the word": f"{P} -l0r{CAPS} . app/",
    "capabilities with a path": f"{P} -lre./etc . app/",
    "capabilities too long": f"{P} -lre.{'i' * 33} . app/",
    "empty capabilities": f"{P} -lre. . app/",
    "flags word with =": f"{P} -lr{CAPS}=x . app/",
    "long option as flags": f"{P} --recursive . app/",
    # argument smuggling and command execution
    "protect-args": f"{P} {F} --protect-args . app/",
    "s as its own word": f"{P} {F} -s . app/",
    "secluded-args": f"{P} {F} --secluded-args . app/",
    "rsh=": f"{P} {F} --rsh=sh . app/",
    "rsh ssh": f"{P} {F} --rsh ssh . app/",
    "-e ssh": f"{P} {F} -e ssh . app/",
    "-essh glued": f"{P} {F} -essh . app/",
    "rsync-path": f"{P} {F} --rsync-path=/tmp/x . app/",
    "daemon": "rsync --daemon --server . app/",
    "daemon after server": f"{U} --daemon {F} . app/",
    "config": f"{P} {F} --config=/tmp/rsyncd.conf . app/",
    "server missing": f"rsync --sender {F} . app/",
    "server missing entirely": f"rsync {F} . app/",
    "server not second": f"rsync {F} --server . app/",
    "sender twice": f"{P} --sender {F} . app/",
    "sender after flags": f"{U} {F} --sender . app/",
    # options that name paths or delete
    "delete on a pull": f"{P} {F} --delete . app/",
    "delete-excluded": f"{U} {F} --delete-excluded . app/",
    "delete twice": f"{U} {F} --delete --delete . app/",
    "delete=": f"{U} {F} --delete=x . app/",
    "delete-after": f"{U} {F} --delete-after . app/",
    "stats on a pull": f"{P} {F} --stats . app/",
    "numeric-ids twice": f"{P} {F} --numeric-ids --numeric-ids . app/",
    "files-from": f"{P} {F} --files-from=/etc/passwd . app/",
    "files-from separate": f"{P} {F} --files-from /etc/passwd . app/",
    "include-from": f"{P} {F} --include-from=/etc/shadow . app/",
    "exclude-from": f"{P} {F} --exclude-from=/etc/shadow . app/",
    "filter": f"{P} {F} --filter=merge_/etc/x . app/",
    "log-file": f"{U} {F} --log-file=/home/victim/.bashrc . app/",
    "log-file-format": f"{U} {F} --log-file-format=%f . app/",
    "temp-dir": f"{U} {F} --temp-dir=/tmp . app/",
    "partial-dir": f"{U} {F} --partial-dir=/tmp/x . app/",
    "partial": f"{U} {F} --partial . app/",
    "backup-dir": f"{U} {F} --backup-dir=/tmp/x . app/",
    "link-dest": f"{U} {F} --link-dest=/etc . app/",
    "link-dest on a pull": f"{P} {F} --link-dest=/etc . app/",
    "copy-dest": f"{U} {F} --copy-dest=/etc . app/",
    "compare-dest": f"{U} {F} --compare-dest=/etc . app/",
    "remove-source-files": f"{P} {F} --remove-source-files . app/",
    "write-batch": f"{P} {F} --write-batch=/tmp/b . app/",
    "only-write-batch": f"{P} {F} --only-write-batch=/tmp/b . app/",
    "read-batch": f"{U} {F} --read-batch=/tmp/b . app/",
    "copy-links": f"{P} {F} --copy-links . app/",
    "copy-unsafe-links": f"{P} {F} --copy-unsafe-links . app/",
    "munge-links off": f"{P} {F} --no-munge-links . app/",
    "chown": f"{U} {F} --chown=0:0 . app/",
    "usermap": f"{U} {F} --usermap=*:root . app/",
    "chmod": f"{U} {F} --chmod=u+s . app/",
    "inplace": f"{U} {F} --inplace . app/",
    "append": f"{U} {F} --append . app/",
    "max-delete": f"{U} {F} --max-delete=-1 . app/",
    "double dash before paths": f"{P} {F} -- . app/",
    "empty option word": f"{P} {F}  . app/",
    # paths
    "root": f"{P} {F} . /",
    "etc": f"{P} {F} . /etc/",
    "absolute app": f"{P} {F} . /home/u/apps/app/",
    "dotdot": f"{P} {F} . ../x/",
    "app then dotdot": f"{P} {F} . app/../x/",
    "app dotdot only": f"{P} {F} . app/../",
    "no trailing slash": f"{P} {F} . app",
    "sub directory": f"{P} {F} . app/sub/",
    "dot as the path": f"{P} {F} . .",
    "dot slash": f"{P} {F} . ./",
    "dot app": f"{P} {F} . ./app/",
    "leading dash": f"{P} {F} . -app/",
    "two paths": f"{P} {F} . app/ other/",
    "two paths no dot": f"{P} {F} app/ other/",
    "no dot": f"{P} {F} app/",
    "dot after path": f"{P} {F} app/ .",
    "dot replaced": f"{P} {F} x app/",
    "double slash": f"{P} {F} . app//",
    "uppercase slug": f"{P} {F} . App/",
    "all uppercase": f"{P} {F} . APP/",
    "unicode slug": f"{P} {F} . аpp/",  # Cyrillic a
    "unicode digit": f"{P} {F} . app\u0661/",
    "underscore": f"{P} {F} . my_app/",
    "space in slug (via tab)": f"{P} {F} . my\tapp/",
    "glob": f"{P} {F} . a*/",
    "tilde": f"{P} {F} . ~/",
    "tilde user": f"{P} {F} . ~root/",
    "backslash": f"{P} {F} . app\\/",
    "newline": f"{P} {F} . app/\n",
    "slug too long": f"{P} {F} . {'a' * 64}/",
    "empty slug": f"{P} {F} . /",
    "daemon module": f"{P} {F} . app::/",
    "host prefix": f"{P} {F} . host:app/",
    # shape
    "extra word at the end": f"{P} {F} . app/ extra",
    "too many words": f"{U} {F} --delete --stats --numeric-ids --delete . app/",
    "over-long": f"{P} {F} " + " ".join(["--numeric-ids"] * 20) + " . app/",
    "only rsync": "rsync",
    "only server": "rsync --server",
    "only sender": "rsync --server --sender",
    "missing path": f"{P} {F} .",
    "not rsync": f"/usr/bin/rsync --server {F} . app/",
    "rsync uppercase": f"RSYNC --server {F} . app/",
    "openrsync path": f"openrsync --server {F} . app/",
}


def _refused(text: str) -> type[Exception]:
    with pytest.raises((PeerRefused, BadSlug)) as info:
        parse_rsync(words(text))
    return info.type


def test_there_are_enough_hostile_vectors():
    assert len(HOSTILE) >= 60


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_refused(name):
    _refused(HOSTILE[name])


@pytest.mark.parametrize("name", ["dotdot", "etc", "root", "app then dotdot", "sub directory",
                                  "uppercase slug", "leading dash", "no trailing slash", "double slash"])
def test_bad_paths_are_bad_slugs(name):
    assert _refused(HOSTILE[name]) is BadSlug


@pytest.mark.parametrize("name", ["L follow links", "s protect-args", "protect-args", "rsh=", "-e ssh",
                                  "delete on a pull", "files-from", "link-dest", "daemon", "sender twice"])
def test_options_are_refused_not_bad_slugs(name):
    assert _refused(HOSTILE[name]) is PeerRefused


def test_word_limit_is_the_longest_client_form():
    assert len(words(PUSH)) == MAX_WORDS


# Through peer-shell's full parser: the same requests, plus what it refuses
# before parse_rsync sees anything (characters, spacing, length).
FULL_PARSER = {
    "L follow links": HOSTILE["L follow links"],
    "rsh": HOSTILE["rsh="],
    "files-from": HOSTILE["files-from"],
    "dotdot": HOSTILE["dotdot"],
    "etc": HOSTILE["etc"],
    "delete on a pull": HOSTILE["delete on a pull"],
    "unicode slug": HOSTILE["unicode slug"],
    "tab": HOSTILE["space in slug (via tab)"],
    "double space": f"{P}  {F} . app/",
    "trailing space": PULL + " ",
    "newline then a command": PULL + "\nid",
    "semicolon": PULL + ";id",
    "NUL": PULL + "\0",
    "over 256 characters": f"{P} {F} . app/" + " " + "x" * 256,
}


@pytest.mark.parametrize("name", sorted(FULL_PARSER))
def test_full_parser_refuses(name):
    with pytest.raises((PeerRefused, BadSlug)):
        parse_command(FULL_PARSER[name])


# -- property: whatever comes in, what goes out is safe -------------------------------

_PIECES = ["rsync", "--server", "--sender", ".", "..", "/", "app/", "app", "x/", "--", "-",
           "--numeric-ids", "--delete", "--stats", "--delete-excluded", "--rsh=sh", "-e", "ssh",
           "--files-from=/etc/passwd", "--link-dest=/", "-s", "--protect-args",
           f"-lHogtpr{CAPS}", f"-lr{CAPS}", f"-Lr{CAPS}", f"-lrs{CAPS}", "/etc/", "../x/", "app/../x/"]
_word = st.one_of(st.sampled_from(_PIECES), st.text(min_size=0, max_size=12),
                  st.from_regex(r"-[lHogtprLkKsDze]{1,8}e\.[A-Za-z]{1,6}", fullmatch=True),
                  st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}/", fullmatch=True))


def _check(ws: list[str]) -> None:
    try:
        req = parse_rsync(ws)
    except (PeerRefused, BadSlug):
        return
    directory = "/srv/peerkit/apps/" + req.slug
    argv = req.server_argv(RSYNC, directory)
    # The rebuilt command ends with "--", ".", exactly our directory.
    assert argv[-3:] == ["--", ".", directory + "/"]
    assert argv.count("--") == 1 and argv.index("--") == len(argv) - 3
    head = argv[:-3]
    assert head[:2] == [RSYNC, "--server"]
    rest = head[2:]
    if req.sender:
        assert rest[0] == "--sender"
        rest = rest[1:]
    flags, options = rest[0], rest[1:]
    # The flags word: only allowlisted letters before "e.".
    assert flags.startswith("-") and "e." in flags
    assert set(flags[1:flags.rindex("e.")]) <= set("lHogtpr")
    assert "." not in flags.split("e.", 1)[1] and "/" not in flags
    allowed = {"--numeric-ids"} | (set() if req.sender else {"--delete", "--stats"})
    assert set(options) <= allowed and len(set(options)) == len(options)
    # The slug came from the request and is a slug.
    assert ws[-1] == req.slug + "/" and ws[-2] == "."
    assert "/" not in req.slug and ".." not in req.slug and not req.slug.startswith("-")


# Near-valid requests: the client's shape with each part drawn from good and bad values,
# so that a fair share is accepted and the checks on accepted requests run.
_GOOD_FLAGS = st.from_regex(r"-[lHogtpr]{1,7}e\.[A-Za-z]{1,12}", fullmatch=True)
_GOOD_PATH = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}/", fullmatch=True)
_near_valid = st.builds(
    lambda head, flags, options, dot, path, tail: [*head, flags, *options, dot, path, *tail],
    st.sampled_from([["rsync", "--server"], ["rsync", "--server", "--sender"]] * 3
                    + [["rsync", "--server", "--sender", "--sender"], ["rsync"]]),
    st.one_of(_GOOD_FLAGS, _GOOD_FLAGS, _GOOD_FLAGS,
              st.from_regex(r"-[lHogtprLkKsDzeRx]{1,8}e\.[A-Za-z./]{0,8}", fullmatch=True), _word),
    st.lists(st.sampled_from(["--numeric-ids", "--delete", "--stats"] * 4
                             + ["--delete-excluded", "-s", "--", "--rsh=sh", "--link-dest=/",
                                "--files-from=-", "-e", "."]), max_size=3),
    st.sampled_from([".", ".", ".", ".", ".", "..", "app/", "/"]),
    st.one_of(_GOOD_PATH, _GOOD_PATH, _GOOD_PATH, st.sampled_from(_PIECES), _word),
    st.sampled_from([[]] * 6 + [["x"], ["app/"]]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_word, min_size=0, max_size=10))
def test_arbitrary_word_lists(ws):
    _check(ws)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(_word, min_size=0, max_size=6))
def test_arbitrary_words_after_a_valid_head(sender, ws):
    _check(["rsync", "--server", *(["--sender"] if sender else []), *ws])


@settings(max_examples=500, deadline=None)
@given(_near_valid)
def test_near_valid_requests(ws):
    _check(ws)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), _GOOD_FLAGS, st.permutations(["--numeric-ids", "--delete", "--stats"]),
       st.integers(0, 3), _GOOD_PATH)
def test_every_allowlisted_combination_is_accepted(sender, flags, options, n, path):
    options = options[:n] if not sender else [o for o in options[:n] if o == "--numeric-ids"]
    ws = ["rsync", "--server", *(["--sender"] if sender else []), flags, *options, ".", path]
    req = parse_rsync(ws)
    assert (req.sender, req.flags, req.options, req.slug) == (sender, flags, tuple(options), path[:-1])
    _check(ws)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_full_parser_on_arbitrary_text(text):
    try:
        request = parse_command("rsync --server " + text)
    except (PeerRefused, BadSlug):
        return
    assert request.verb == "rsync" and request.rsync is not None
    _check(list(request.words))


def test_find_tool_answers_as_shutil_which_does():
    for name in ("rsync", "sh", "tar", "no-such-tool-here"):
        assert find_tool(name) == shutil.which(name, path=RSYNC_PATH)


def test_find_tool_takes_the_first_executable_regular_file(tmp_path):
    first, second, third = (tmp_path / d for d in ("first", "second", "third"))
    for d in (first, second, third):
        d.mkdir()
    (first / "tool").mkdir()  # a directory of that name is no tool
    (second / "tool").write_text("#!/bin/sh\n")  # nor is a file nobody may run
    os.chmod(second / "tool", 0o644)
    (third / "tool").write_text("#!/bin/sh\n")
    os.chmod(third / "tool", 0o755)
    path = f"{first}:{second}:{third}"
    assert find_tool("tool", path) == f"{third}/tool" == shutil.which("tool", path=path)
    os.chmod(third / "tool", 0o644)
    assert find_tool("tool", path) is None
