"""Build tar byte strings for tests: benign ones and hostile ones.

Benign archives are made with :mod:`tarfile` (fine in tests; the library
never uses it).  Malformed and hostile ones are assembled from raw header
bytes with checksums computed here, so they can say things tarfile would
refuse to write.

Hostile archives assume the layout the tests use: the staging directory is
``<tmp>/dest`` and ``<tmp>/sentinel`` plus ``<tmp>/outside/victim`` exist
beside it, so ``../sentinel`` and ``../outside`` are the escape targets.  A
few absolute escapes aim at :data:`ABSOLUTE_VICTIMS`, paths that must not
exist after the test.

``HOSTILE_CASES`` maps a case name to a zero-argument builder;
``EXPECTED_ERROR`` maps the same name to the ``code`` of the error class the
extractor must raise ("unsafe-archive" or "transfer-incomplete").
"""

from __future__ import annotations

import io
import tarfile
from typing import Callable, Iterable

BLOCK = 512
RECORD = 10240
END = bytes(2 * BLOCK)
MTIME = 1_700_000_000

UNSAFE = "unsafe-archive"
INCOMPLETE = "transfer-incomplete"

SENTINEL = "sentinel"            # <tmp>/sentinel, beside dest
OUTSIDE = "outside"              # <tmp>/outside/, beside dest
ABSOLUTE_VICTIMS = ("/tmp/peerkit-tarcraft-escape", "/tmp/peerkit-tarcraft-escape.txt")


# -- raw headers ------------------------------------------------------------

def _b(s: bytes | str) -> bytes:
    """Encode a str as UTF-8 (bytes pass through)."""
    return s.encode() if isinstance(s, str) else s


def numeric(value: int, width: int) -> bytes:
    """Encode a numeric header field: octal if it fits, else GNU base-256."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return value.to_bytes(width, "big", signed=True)  # 0xff-prefixed two's complement


def checksum(block: bytes | bytearray, *, signed: bool = False) -> int:
    """Compute the tar header checksum with the chksum field as spaces."""
    rest = bytes(block[:148]) + b" " * 8 + bytes(block[156:512])
    if signed:
        return sum(b - 256 if b > 127 else b for b in rest)
    return sum(rest)


def set_checksum(block: bytearray, value: int | None = None, *, signed: bool = False) -> None:
    """Write a checksum (computed unless given) into a header block in place."""
    if value is None:
        value = checksum(block, signed=signed)
    block[148:156] = b"%06o\0 " % (value & 0o777777)


def header(name: bytes | str, *, typeflag: bytes = b"0", size: int = 0, mode: int = 0o644,
           uid: int = 1000, gid: int = 1000, mtime: int = MTIME, linkname: bytes | str = b"",
           fmt: str = "ustar", prefix: bytes | str = b"", devmajor: int = 0, devminor: int = 0,
           size_field: bytes | None = None, chksum: int | None = None,
           signed_checksum: bool = False) -> bytes:
    """Build one 512-byte header block from raw fields (name may be any bytes up to 100)."""
    name, linkname, prefix = _b(name), _b(linkname), _b(prefix)
    assert len(name) <= 100 and len(linkname) <= 100 and len(prefix) <= 155
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = numeric(mode, 8)
    h[108:116] = numeric(uid, 8)
    h[116:124] = numeric(gid, 8)
    h[124:136] = size_field if size_field is not None else numeric(size, 12)
    assert len(h) == BLOCK, "size_field must be 12 bytes"
    h[136:148] = numeric(mtime, 12)
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    if fmt == "ustar":
        h[257:265] = b"ustar\x0000"
    elif fmt == "gnu":
        h[257:265] = b"ustar  \0"
    elif fmt != "v7":
        raise ValueError(fmt)
    h[265:269] = b"user"
    h[297:302] = b"group"
    h[329:337] = numeric(devmajor, 8)
    h[337:345] = numeric(devminor, 8)
    if prefix:
        h[345:345 + len(prefix)] = prefix
    set_checksum(h, chksum, signed=signed_checksum)
    return bytes(h)


def pad(data: bytes) -> bytes:
    """Pad data with zeros to a whole number of blocks."""
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes | str, data: bytes = b"", **kw) -> bytes:
    """Build a header plus padded data (size defaults to len(data))."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def directory(name: bytes | str, mode: int = 0o755, **kw) -> bytes:
    """Build a directory member."""
    return header(name, typeflag=b"5", mode=mode, **kw)


def symlink(name: bytes | str, target: bytes | str, **kw) -> bytes:
    """Build a symlink member."""
    return header(name, typeflag=b"2", linkname=target, mode=0o777, **kw)


def hardlink(name: bytes | str, target: bytes | str, **kw) -> bytes:
    """Build a hard link member."""
    return header(name, typeflag=b"1", linkname=target, **kw)


def pax_records(records: dict[bytes | str, bytes | str] | Iterable[tuple[bytes | str, bytes | str]]) -> bytes:
    """Encode pax records ("LEN KEY=VALUE\\n") with correct self-counting lengths."""
    items = records.items() if isinstance(records, dict) else records
    out = b""
    for key, value in items:
        body = b" " + _b(key) + b"=" + _b(value) + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def pax(records: dict | Iterable[tuple], *, typeflag: bytes = b"x",
        name: bytes | str = b"./PaxHeaders/x") -> bytes:
    """Build a pax extended header ('x' or 'g') with its padded payload."""
    data = records if isinstance(records, bytes) else pax_records(records)
    return header(name, typeflag=typeflag, size=len(data)) + pad(data)


def gnu_long(value: bytes | str, typeflag: bytes = b"L") -> bytes:
    """Build a GNU long name ('L') or long link ('K') record."""
    data = _b(value) + b"\0"
    return header(b"././@LongLink", typeflag=typeflag, size=len(data), fmt="gnu",
                  mode=0, uid=0, gid=0, mtime=0) + pad(data)


def archive(*parts: bytes, end: bool = True, record: bool = True) -> bytes:
    """Concatenate members, add the end marker and pad to 10 KiB like tar."""
    data = b"".join(parts)
    if end:
        data += END
    if record:
        data += bytes(-len(data) % RECORD)
    return data


def header_offsets(data: bytes) -> list[int]:
    """Return the offsets of header blocks in a well-formed archive."""
    out, pos = [], 0
    while pos + BLOCK <= len(data):
        block = data[pos:pos + BLOCK]
        if block == bytes(BLOCK):
            break
        out.append(pos)
        field = block[124:136]
        size = int.from_bytes(field[1:], "big") if field[0] == 0x80 else int(field.strip(b"\0 ") or b"0", 8)
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out


def fix_checksums(data: bytes | bytearray, offsets: Iterable[int]) -> bytes:
    """Recompute the checksum of the header blocks at the given offsets."""
    buf = bytearray(data)
    for off in offsets:
        if off + BLOCK <= len(buf):
            block = buf[off:off + BLOCK]
            set_checksum(block)
            buf[off:off + BLOCK] = block
    return bytes(buf)


# -- benign archives (tarfile) -----------------------------------------------

def tarfile_archive(entries: Iterable[tuple], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Build an archive with tarfile from (name, kind, payload, mode) tuples.

    kind is "file" (payload: bytes), "dir", "symlink" or "hardlink" (payload:
    target name).
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, payload, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime, ti.uid, ti.gid = mode, MTIME, 1000, 1000
            if kind == "file":
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                       "hardlink": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                ti.linkname = payload
            tf.addfile(ti)
    return buf.getvalue()


BENIGN_ENTRIES = [
    (".", "dir", None, 0o755),
    ("./docs", "dir", None, 0o755),
    ("./docs/readme.txt", "file", b"hello\n" * 100, 0o644),
    ("./docs/empty", "file", b"", 0o600),
    ("./bin", "dir", None, 0o750),
    ("./bin/run", "file", b"#!/bin/sh\necho hi\n", 0o755),
    ("./bin/run-link", "symlink", "run", 0o777),
    ("./bin/readme-link", "symlink", "../docs/readme.txt", 0o777),
    ("./docs/hard.txt", "hardlink", "./docs/readme.txt", 0o644),
    ("./ro", "dir", None, 0o555),
    ("./ro/inside.txt", "file", b"x" * 1000, 0o444),
    ("./" + "long-" * 30 + "name.txt", "file", b"long\n", 0o644),
    ("./ünï cödé/日本語.txt", "file", "データ\n".encode(), 0o644),
    ("./link-long", "symlink", "long-" * 30 + "name.txt", 0o777),
]


def benign_pax() -> bytes:
    """A small mixed archive in tarfile's PAX format."""
    return tarfile_archive(BENIGN_ENTRIES, fmt=tarfile.PAX_FORMAT)


def benign_gnu() -> bytes:
    """The same archive in tarfile's GNU format (long names as 'L'/'K')."""
    return tarfile_archive(BENIGN_ENTRIES, fmt=tarfile.GNU_FORMAT)


def benign_raw() -> bytes:
    """A small raw-built archive: root entry, dir, file, symlink, hardlink, pax name, GNU name."""
    long_dir = "d" * 150
    return archive(
        directory("./", mode=0o755),
        directory("./a", mode=0o750),
        member("./a/f.txt", b"content\n", mode=0o640),
        symlink("./a/l", "f.txt"),
        hardlink("./a/h", "./a/f.txt"),
        pax({"path": f"./{long_dir}/pax-name.txt", "mtime": "1700000000.5"}),
        member("./placeholder", b"pax\n"),
        gnu_long(f"./{long_dir}/gnu-name.txt"),
        member("./placeholder2", b"gnu\n", fmt="gnu"),
        member("./ustar-prefix.txt", b"prefix\n", prefix=f"./{long_dir}"),
        pax({"path": f"./{long_dir}/"}),
        directory("./placeholder-dir", mode=0o700),
    )


BENIGN_CASES: dict[str, Callable[[], bytes]] = {
    "tarfile_pax": benign_pax,
    "tarfile_gnu": benign_gnu,
    "raw_mixed": benign_raw,
}


# -- hostile archives ---------------------------------------------------------

def _file(name: bytes | str, data: bytes = b"pwned\n", **kw) -> bytes:
    """A regular file member with a default payload."""
    return member(name, data, **kw)


def dotdot_escape() -> bytes:
    """A file named ../sentinel (classic traversal)."""
    return archive(_file("../" + SENTINEL))


def dotdot_inner() -> bytes:
    """A file whose name climbs through a real directory: a/../../sentinel."""
    return archive(directory("a"), _file("a/../../" + SENTINEL))


def absolute_path() -> bytes:
    """A file with an absolute name."""
    return archive(_file(ABSOLUTE_VICTIMS[1]))


def symlink_write_through() -> bytes:
    """An innocent-looking symlink to '.', then a file written through it."""
    return archive(symlink("l", "."), _file("l/through.txt"))


def symlink_escape_write_through() -> bytes:
    """A symlink to '..' (outside), then a file written through it."""
    return archive(symlink("l", ".."), _file("l/" + SENTINEL))


def symlink_chain() -> bytes:
    """a/up -> '..' is inside; esc -> 'a/up/..' is lexically 'a' but really dest/.."""
    return archive(directory("a"), symlink("a/up", ".."), symlink("esc", "a/up/.."),
                   _file("esc/" + SENTINEL))


def symlink_chain_reordered() -> bytes:
    """The chain link is created before the link it climbs through exists."""
    return archive(directory("a"), symlink("esc", "a/up/.."), symlink("a/up", ".."))


def symlink_absolute() -> bytes:
    """A symlink with an absolute target."""
    return archive(symlink("etc", "/etc"))


def symlink_relative_escape() -> bytes:
    """A symlink whose relative target climbs above dest."""
    return archive(directory("a"), symlink("a/out", "../../" + OUTSIDE))


def hardlink_outside() -> bytes:
    """A hard link to ../sentinel, then data written to the link's name."""
    return archive(hardlink("h", "../" + SENTINEL), _file("h"))


def hardlink_absolute() -> bytes:
    """A hard link to an absolute path."""
    return archive(hardlink("passwd", "/etc/passwd"))


def hardlink_to_symlink() -> bytes:
    """A hard link to a symlink of this archive."""
    return archive(_file("target.txt", b"t"), symlink("s", "target.txt"), hardlink("h", "s"))


def hardlink_to_dir() -> bytes:
    """A hard link to a directory of this archive."""
    return archive(directory("d"), hardlink("h", "d"))


def hardlink_forward() -> bytes:
    """A hard link to a file that only comes later in the archive."""
    return archive(hardlink("h", "later.txt"), _file("later.txt"))


def char_device() -> bytes:
    """A character device node (like /dev/mem)."""
    return archive(header("mem", typeflag=b"3", devmajor=1, devminor=1, mode=0o666))


def block_device() -> bytes:
    """A block device node."""
    return archive(header("sda", typeflag=b"4", devmajor=8, devminor=0, mode=0o666))


def fifo() -> bytes:
    """A FIFO."""
    return archive(header("pipe", typeflag=b"6", mode=0o644))


def gnu_sparse() -> bytes:
    """A GNU sparse member."""
    return archive(header("sparse", typeflag=b"S", fmt="gnu"))


def unknown_type() -> bytes:
    """A member of an unknown type."""
    return archive(header("what", typeflag=b"Z", size=512) + bytes(512))


def setuid_file() -> bytes:
    """A setuid executable."""
    return archive(_file("suid", b"#!/bin/sh\n", mode=0o4755))


def setgid_dir() -> bytes:
    """A setgid directory."""
    return archive(directory("sgid", mode=0o2775))


def huge_size() -> bytes:
    """A header claiming 8 GiB (octal) with no data following."""
    return archive(header("big", size=8 ** 11 - 1), end=False)


def huge_size_base256() -> bytes:
    """A header claiming 1 TiB in base-256."""
    return archive(header("big", size=1 << 40), end=False)


def truncated_header() -> bytes:
    """A valid member, then a header cut after 300 bytes."""
    return _file("ok.txt") + header("next")[:300]


def truncated_data() -> bytes:
    """A header for 1000 bytes followed by only 500."""
    return header("short", size=1000) + b"d" * 500


def truncated_padding() -> bytes:
    """The file data is complete but the block padding is cut."""
    return header("short", size=10) + b"d" * 10 + bytes(100)


def bad_checksum() -> bytes:
    """A header whose checksum is off by one."""
    h = bytearray(header("bad"))
    set_checksum(h, checksum(h) + 1)
    return archive(bytes(h))


def pax_path_dotdot() -> bytes:
    """A pax 'path' record overriding an innocent name with ../sentinel."""
    return archive(pax({"path": "../" + SENTINEL}), _file("innocent.txt"))


def pax_linkpath_escape() -> bytes:
    """A pax 'linkpath' record turning a symlink target into ../../outside."""
    return archive(pax({"linkpath": "../../" + OUTSIDE}), symlink("l", "innocent"),
                   _file("l/victim"))


def pax_global_path() -> bytes:
    """A global pax header renaming every following member to ../sentinel."""
    return archive(pax({"path": "../" + SENTINEL}, typeflag=b"g"), _file("innocent.txt"))


def pax_nul_in_path() -> bytes:
    """A pax path with an embedded NUL (C truncation)."""
    return archive(pax({"path": b"ok\0/../../" + SENTINEL.encode()}), _file("innocent.txt"))


def pax_malformed_length() -> bytes:
    """A pax record whose length field lies."""
    return archive(pax(b"99 path=ok\n"), _file("innocent.txt"))


def pax_too_big() -> bytes:
    """A pax header larger than the 1 MiB record cap."""
    data = pax_records({"comment": "x" * (1 << 20)})
    return archive(header("./PaxHeaders/x", typeflag=b"x", size=len(data)) + pad(data),
                   _file("innocent.txt"))


def gnu_longname_traversal() -> bytes:
    """A GNU 'L' long name with ../ components."""
    return archive(gnu_long("../" * 40 + SENTINEL), _file("innocent.txt", fmt="gnu"))


def gnu_longlink_absolute() -> bytes:
    """A GNU 'K' long link target that is absolute."""
    return archive(gnu_long("/" + "x" * 150, typeflag=b"K"), symlink("l", "innocent", fmt="gnu"))


def gnu_longname_too_big() -> bytes:
    """A GNU 'L' record beyond the long-name cap."""
    return archive(gnu_long("a/" * 10000 + "f"), _file("innocent.txt", fmt="gnu"))


def deep_nesting_10000() -> bytes:
    """One member 10,000 directories deep (pax path)."""
    return archive(pax({"path": "a/" * 10000 + "f"}), _file("innocent.txt"))


def deep_nesting_2000() -> bytes:
    """One member 2,000 directories deep, short enough for the 4096-byte name limit."""
    return archive(pax({"path": "a/" * 2000 + "f"}), _file("innocent.txt"))


def deep_nesting_members() -> bytes:
    """300 directory members, each one level deeper than the last."""
    return archive(*(pax({"path": "d/" * i}) + directory("placeholder") for i in range(1, 301)))


def dot_symlink() -> bytes:
    """A member named '.' that is a symlink to '..' (replace the staging dir)."""
    return archive(symlink(".", ".."))


def dot_slash_symlink() -> bytes:
    """A member named './' that is a symlink to /."""
    return archive(symlink("./", "/"))


def dot_file() -> bytes:
    """A member named '.' that is a regular file."""
    return archive(_file("."))


def dot_hardlink() -> bytes:
    """A member named './.' that is a hard link."""
    return archive(_file("f"), hardlink("./.", "f"))


def empty_name() -> bytes:
    """A regular file with an empty name."""
    return archive(_file(""))


def missing_eoa() -> bytes:
    """A complete member but no end-of-archive blocks."""
    return archive(_file("ok.txt"), end=False, record=False)


def single_zero_block() -> bytes:
    """Only one of the two end-of-archive blocks."""
    return _file("ok.txt") + bytes(BLOCK)


def garbage_after_end() -> bytes:
    """A non-zero byte in the record padding after the end marker."""
    data = bytearray(archive(_file("ok.txt")))
    data[-1] = 0x41
    return bytes(data)


def member_after_lone_zero_block() -> bytes:
    """A member hidden after a single zero block."""
    return archive(_file("ok.txt"), bytes(BLOCK), _file("hidden.txt"))


def duplicate_file_over_symlink() -> bytes:
    """A symlink, then a regular file of the same name (write through the link)."""
    return archive(symlink("f", "target.txt"), _file("f"))


def duplicate_file() -> bytes:
    """The same regular file twice (the second would overwrite the first)."""
    return archive(_file("f", b"one"), _file("f", b"two"))


def dir_over_symlink() -> bytes:
    """A symlink, then a directory member of the same name."""
    return archive(symlink("d", "."), directory("d"))


def dir_with_data() -> bytes:
    """A directory member that claims data blocks."""
    return archive(header("d", typeflag=b"5", size=512) + bytes(512))


def extended_header_at_end() -> bytes:
    """A pax header followed directly by the end marker."""
    return archive(pax({"path": "x"}))


HOSTILE_CASES: dict[str, Callable[[], bytes]] = {
    "dotdot_escape": dotdot_escape,
    "dotdot_inner": dotdot_inner,
    "absolute_path": absolute_path,
    "symlink_write_through": symlink_write_through,
    "symlink_escape_write_through": symlink_escape_write_through,
    "symlink_chain": symlink_chain,
    "symlink_chain_reordered": symlink_chain_reordered,
    "symlink_absolute": symlink_absolute,
    "symlink_relative_escape": symlink_relative_escape,
    "hardlink_outside": hardlink_outside,
    "hardlink_absolute": hardlink_absolute,
    "hardlink_to_symlink": hardlink_to_symlink,
    "hardlink_to_dir": hardlink_to_dir,
    "hardlink_forward": hardlink_forward,
    "char_device": char_device,
    "block_device": block_device,
    "fifo": fifo,
    "gnu_sparse": gnu_sparse,
    "unknown_type": unknown_type,
    "setuid_file": setuid_file,
    "setgid_dir": setgid_dir,
    "huge_size": huge_size,
    "huge_size_base256": huge_size_base256,
    "truncated_header": truncated_header,
    "truncated_data": truncated_data,
    "truncated_padding": truncated_padding,
    "bad_checksum": bad_checksum,
    "pax_path_dotdot": pax_path_dotdot,
    "pax_linkpath_escape": pax_linkpath_escape,
    "pax_global_path": pax_global_path,
    "pax_nul_in_path": pax_nul_in_path,
    "pax_malformed_length": pax_malformed_length,
    "pax_too_big": pax_too_big,
    "gnu_longname_traversal": gnu_longname_traversal,
    "gnu_longlink_absolute": gnu_longlink_absolute,
    "gnu_longname_too_big": gnu_longname_too_big,
    "deep_nesting_10000": deep_nesting_10000,
    "deep_nesting_2000": deep_nesting_2000,
    "deep_nesting_members": deep_nesting_members,
    "dot_symlink": dot_symlink,
    "dot_slash_symlink": dot_slash_symlink,
    "dot_file": dot_file,
    "dot_hardlink": dot_hardlink,
    "empty_name": empty_name,
    "missing_eoa": missing_eoa,
    "single_zero_block": single_zero_block,
    "garbage_after_end": garbage_after_end,
    "member_after_lone_zero_block": member_after_lone_zero_block,
    "duplicate_file_over_symlink": duplicate_file_over_symlink,
    "duplicate_file": duplicate_file,
    "dir_over_symlink": dir_over_symlink,
    "dir_with_data": dir_with_data,
    "extended_header_at_end": extended_header_at_end,
}

EXPECTED_ERROR: dict[str, str] = {name: UNSAFE for name in HOSTILE_CASES}
EXPECTED_ERROR.update({
    "truncated_header": INCOMPLETE,
    "truncated_data": INCOMPLETE,
    "truncated_padding": INCOMPLETE,
    "missing_eoa": INCOMPLETE,
    "single_zero_block": INCOMPLETE,
})
