"""peerkit.audit: one JSON line per call, whatever the remote side sends."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from peerkit import audit


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_record_appends_one_json_line_per_call(tmp_path):
    log = tmp_path / "peer-shell.log"
    audit.record(log, peer="beta", verb="ping", outcome="ok", bytes=42)
    audit.record(log, peer="beta", verb="list-apps", outcome="refused", bytes=0)
    lines = _lines(log)
    assert len(lines) == 2 and all(line.endswith(b"\n") for line in lines)
    first = json.loads(lines[0])
    assert first["peer"] == "beta" and first["verb"] == "ping" and first["bytes"] == 42
    assert first["time"].endswith("+00:00")
    assert list(first)[0] == "time"
    assert [e["verb"] for e in audit.read_events(log)] == ["ping", "list-apps"]
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


HOSTILE = [
    '\n{"forged":1}',
    'x\r\n{"outcome":"ok"}\n',
    "\x1b[2J\x1b[31mred\x07",
    "\u2028\u2029\x85 line separators",
    "ping\x00id",
    "кириллица ｆｕｌｌ 😀",
    "\ud800 lone surrogate",
    '"},{"forged":1',
    "\\n\\u000a",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_strings_stay_on_one_ascii_line(tmp_path, hostile):
    log = tmp_path / "log"
    audit.record(log, command=audit.clean(hostile), reason=hostile)
    data = log.read_bytes()
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert data.isascii()
    assert all(0x20 <= b < 0x7F for b in data[:-1])
    event = json.loads(data)
    assert event["reason"] == hostile
    assert event["command"] == hostile
    assert "forged" not in event
    assert audit.read_events(log) == [event]


def test_clean_truncates_long_untrusted_text():
    assert audit.clean(None) is None
    assert audit.clean("") == ""
    assert audit.clean("a" * audit.MAX_UNTRUSTED) == "a" * audit.MAX_UNTRUSTED
    long = audit.clean("a" * 100_000)
    assert long == "a" * audit.MAX_UNTRUSTED + "…"
    assert audit.clean("abcdef", 3) == "abc…"


def test_record_of_huge_input_stays_bounded(tmp_path):
    log = tmp_path / "log"
    audit.record(log, command=audit.clean("\n" * 1_000_000))
    assert len(log.read_bytes()) < 2000
    assert json.loads(log.read_bytes())["command"] == "\n" * audit.MAX_UNTRUSTED + "…"


@pytest.mark.parametrize("value,expected", [
    ("192.0.2.10 51234 192.0.2.1 22", ("192.0.2.10", 51234)),
    ("2001:db8::2 40000 2001:db8::1 2222", ("2001:db8::2", 40000)),
    ("192.0.2.10 notaport 192.0.2.1 22", ("192.0.2.10", None)),
    (None, (None, None)),
    ("", (None, None)),
    ("192.0.2.10 51234 192.0.2.1", (None, None)),
    ("192.0.2.10 51234 192.0.2.1 22 extra", (None, None)),
    ("192.0.2.10  51234 192.0.2.1 22", (None, None)),
    ("a" * 100 + " 1 b 2", ("a" * 64 + "…", 1)),
])
def test_client_address(value, expected):
    assert audit.client_address(value) == expected


def test_read_events_skips_garbage_and_missing_file(tmp_path):
    log = tmp_path / "log"
    assert audit.read_events(log) == []
    log.write_bytes(b'{"a":1}\nnot json\n[1,2]\n\xff\xfe\n{"b":2}\n')
    assert audit.read_events(log) == [{"a": 1}, {"b": 2}]


def test_concurrent_writers_never_interleave(tmp_path):
    log = tmp_path / "log"
    code = """
import sys
from pathlib import Path
from peerkit import audit
for i in range(200):
    audit.record(Path(sys.argv[1]), writer=sys.argv[2], i=i, pad="x" * 3000)
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(log), str(w)]) for w in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    lines = _lines(log)
    assert len(lines) == 800
    events = [json.loads(line) for line in lines]
    for w in range(4):
        assert [e["i"] for e in events if e["writer"] == str(w)] == list(range(200))


def test_record_refuses_a_symlinked_log(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    log = tmp_path / "log"
    log.symlink_to(target)
    with pytest.raises(OSError):
        audit.record(log, peer="beta")
    assert target.read_text() == ""
    assert os.path.islink(log)
