"""Crafted tar streams beyond tests/tarcraft.py's 53, for the hostile suite.

Same layout assumptions as tarcraft: the staging directory's parent holds
``sentinel`` and ``outside/victim``, the escape targets.  Each case names the
error the pull must end with.
"""

from __future__ import annotations

from typing import Callable

from tests import tarcraft
from tests.tarcraft import (INCOMPLETE, OUTSIDE, SENTINEL, UNSAFE, archive, directory, gnu_long, hardlink,
                            header, member, pad, pax, symlink)


def pax_dot_symlink() -> bytes:
    """A symlink whose pax path is '.', pointing at '..': replace the staging directory itself."""
    return archive(pax({"path": "."}), symlink("innocent", ".."))


def pax_dot_file() -> bytes:
    """A regular file whose pax path is './': the staging directory becomes a file."""
    return archive(pax({"path": "./"}), member("innocent", b"x\n"))


def gnu_longlink_hardlink_escape() -> bytes:
    """A hard link whose GNU long link target leaves staging."""
    return archive(gnu_long("../" + OUTSIDE + "/victim", typeflag=b"K"), hardlink("l", "x", fmt="gnu"))


def pax_linkpath_hardlink_absolute() -> bytes:
    """A hard link to /etc/passwd through a pax linkpath."""
    return archive(pax({"linkpath": "/etc/passwd"}), hardlink("l", "x"))


def symlink_to_root_then_write() -> bytes:
    """a/up -> '..' (that is staging itself, allowed), then a file written through a/up."""
    return archive(directory("a"), symlink("a/up", ".."), member("a/up/" + SENTINEL, b"pwned\n"))


def symlink_climb_chain() -> bytes:
    """d1/d2/l -> ../../x stays inside; d1/d2/m -> ../../../outside leaves."""
    return archive(directory("d1"), directory("d1/d2"), symlink("d1/d2/l", "../../x"),
                   symlink("d1/d2/m", "../../../" + OUTSIDE), member("d1/d2/m/victim", b"pwned\n"))


def symlink_loop_then_write() -> bytes:
    """a -> b, b -> a, then a file written through a."""
    return archive(symlink("a", "b"), symlink("b", "a"), member("a/x", b"pwned\n"))


def file_then_directory_same_name() -> bytes:
    """A file x, then a file x/y that needs x to be a directory."""
    return archive(member("x", b"file\n"), member("x/y", b"pwned\n"))


def hardlink_then_overwrite() -> bytes:
    """A file a, a hard link b to it, then b again as a file: writing b would change a."""
    return archive(member("a", b"a\n"), hardlink("b", "a"), member("b", b"pwned\n"))


def pax_size_desync() -> bytes:
    """pax says size 0 while the header says 512: the data block hides a header for ../sentinel."""
    hidden = header("../" + SENTINEL, size=6) + pad(b"pwned\n")
    return archive(pax({"size": "0"}), header("innocent", size=len(hidden)) + hidden)


def header_size_desync() -> bytes:
    """A member whose data is a complete tar header for an absolute path (read as data, then a FIFO)."""
    inner = header(tarcraft.ABSOLUTE_VICTIMS[0], size=0)
    return archive(member("data.bin", inner), header("pipe", typeflag=b"6"))


def truncated_pax_record() -> bytes:
    """A pax header that promises 1000 bytes and the stream ends after 512."""
    return header("./PaxHeaders/x", typeflag=b"x", size=1000) + bytes(512)


def truncated_gnu_longname() -> bytes:
    """A GNU long name record cut in the middle."""
    return gnu_long("a" * 2000)[:1024]


def member_named_dotdot_dir() -> bytes:
    """A directory member named '..'."""
    return archive(directory(".."))


def setuid_through_pax_then_hardlink() -> bytes:
    """A 04755 file (refused) hidden behind a harmless first member."""
    return archive(member("ok.txt", b"ok\n"), member("run", b"#!/bin/sh\n", mode=0o4755))


EXTRA_CASES: dict[str, Callable[[], bytes]] = {
    "pax_dot_symlink": pax_dot_symlink,
    "pax_dot_file": pax_dot_file,
    "gnu_longlink_hardlink_escape": gnu_longlink_hardlink_escape,
    "pax_linkpath_hardlink_absolute": pax_linkpath_hardlink_absolute,
    "symlink_to_root_then_write": symlink_to_root_then_write,
    "symlink_climb_chain": symlink_climb_chain,
    "symlink_loop_then_write": symlink_loop_then_write,
    "file_then_directory_same_name": file_then_directory_same_name,
    "hardlink_then_overwrite": hardlink_then_overwrite,
    "pax_size_desync": pax_size_desync,
    "header_size_desync": header_size_desync,
    "truncated_pax_record": truncated_pax_record,
    "truncated_gnu_longname": truncated_gnu_longname,
    "member_named_dotdot_dir": member_named_dotdot_dir,
    "setuid_behind_a_harmless_member": setuid_through_pax_then_hardlink,
}
EXTRA_EXPECTED = {name: UNSAFE for name in EXTRA_CASES}
EXTRA_EXPECTED.update({"truncated_pax_record": INCOMPLETE, "truncated_gnu_longname": INCOMPLETE})

CASES: dict[str, Callable[[], bytes]] = {**tarcraft.HOSTILE_CASES, **EXTRA_CASES}
EXPECTED: dict[str, str] = {**tarcraft.EXPECTED_ERROR, **EXTRA_EXPECTED}
assert set(CASES) == set(EXPECTED) and not set(tarcraft.HOSTILE_CASES) & set(EXTRA_CASES)

# What each category of the brief maps to (the corpus test checks every one is present).
BRIEF = {
    "traversal": ["dotdot_escape", "dotdot_inner", "pax_path_dotdot", "gnu_longname_traversal"],
    "absolute paths": ["absolute_path", "symlink_absolute", "hardlink_absolute", "pax_linkpath_hardlink_absolute"],
    "symlink then write through it": ["symlink_write_through", "symlink_escape_write_through",
                                      "symlink_to_root_then_write", "duplicate_file_over_symlink"],
    "symlink chains": ["symlink_chain", "symlink_chain_reordered", "symlink_climb_chain", "symlink_loop_then_write"],
    "hardlink escape": ["hardlink_outside", "hardlink_to_symlink", "gnu_longlink_hardlink_escape"],
    "device nodes": ["char_device", "block_device"],
    "FIFOs": ["fifo", "header_size_desync"],
    "setuid": ["setuid_file", "setgid_dir", "setuid_behind_a_harmless_member"],
    "huge sizes in headers": ["huge_size", "huge_size_base256"],
    "truncated headers": ["truncated_header", "truncated_pax_record", "truncated_gnu_longname"],
    "bad checksums": ["bad_checksum"],
    "PAX and GNU long-name tricks": ["pax_global_path", "pax_nul_in_path", "pax_malformed_length", "pax_too_big",
                                     "gnu_longlink_absolute", "gnu_longname_too_big", "pax_size_desync"],
    "10,000-deep nesting": ["deep_nesting_10000"],
    "a member that replaces the staging directory itself": ["dot_symlink", "dot_slash_symlink", "dot_file",
                                                             "dot_hardlink", "pax_dot_symlink", "pax_dot_file"],
}
