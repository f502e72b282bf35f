"""peerkit.compress: when to compress, and decompressing a zstd stream as it arrives.

The ZstdFeeder tests use the real zstd binary both ways (compressing the
input with ``zstd -c`` and decompressing through the feeder).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from peerkit import compress
from peerkit.compress import FAST_LINK_MBPS, ZstdFeeder, choose
from peerkit.errors import PeerkitError, TransferIncomplete, UnsafeArchive

ZSTD = compress.zstd_binary()
needs_zstd = pytest.mark.skipif(ZSTD is None and os.environ.get("CI", "").lower() != "true",
                                reason="zstd is not installed")

REMOTE = "203.0.113.7"  # TEST-NET-3: never loopback


# -- choose() ------------------------------------------------------------------------

# (mode, host, link_mbps, remote_has_zstd) -> compress?
CHOICES = [
    # --compress none always wins
    ("none", REMOTE, None, True, False),
    ("none", REMOTE, 10, True, False),
    ("none", "127.0.0.1", None, True, False),
    # --compress zstd: forced, even on loopback or a fast link...
    ("zstd", "127.0.0.1", None, True, True),
    ("zstd", REMOTE, 10_000, True, True),
    ("zstd", REMOTE, None, True, True),
    # ...but not when the peer cannot decompress
    ("zstd", REMOTE, None, False, False),
    ("zstd", REMOTE, 10, False, False),
    # auto: loopback is never worth it
    ("auto", "127.0.0.1", None, True, False),
    ("auto", "127.8.9.10", None, True, False),
    ("auto", "::1", None, True, False),
    ("auto", "localhost", None, True, False),
    # auto: a remote link of unknown speed is assumed slow
    ("auto", REMOTE, None, True, True),
    ("auto", "peer.example.org", None, True, True),
    ("auto", "2001:db8::1", None, True, True),
    ("auto", "localhost.example.org", None, True, True),
    # auto: configured or measured speed, below / at / above the threshold
    ("auto", REMOTE, 10, True, True),
    ("auto", REMOTE, 100.5, True, True),
    ("auto", REMOTE, FAST_LINK_MBPS - 1, True, True),
    ("auto", REMOTE, FAST_LINK_MBPS, True, False),
    ("auto", REMOTE, 10_000, True, False),
    # a known speed beats the loopback guess (a configured value is the operator's word)
    ("auto", "127.0.0.1", 100, True, True),
    ("auto", "127.0.0.1", 5_000, True, False),
    # auto: a peer without zstd gets plain tar whatever the link
    ("auto", REMOTE, None, False, False),
    ("auto", REMOTE, 10, False, False),
]


@pytest.mark.parametrize("mode,host,mbps,remote,expected", CHOICES)
def test_choose(mode, host, mbps, remote, expected, monkeypatch):
    # Pretend zstd is installed here, so the table does not depend on the machine.
    monkeypatch.setattr(compress, "zstd_binary", lambda: "/usr/bin/zstd")
    compressed, why = choose(mode, host=host, link_mbps=mbps, remote_has_zstd=remote)
    assert compressed is expected
    assert isinstance(why, str) and why


def test_choose_reasons(monkeypatch):
    monkeypatch.setattr(compress, "zstd_binary", lambda: "/usr/bin/zstd")
    assert choose("none", host=REMOTE, link_mbps=None, remote_has_zstd=True)[1] == "--compress none"
    assert "zstd" in choose("auto", host=REMOTE, link_mbps=None, remote_has_zstd=False)[1]
    assert "loopback" in choose("auto", host="127.0.0.1", link_mbps=None, remote_has_zstd=True)[1]
    assert "250 Mbit/s" in choose("auto", host=REMOTE, link_mbps=250, remote_has_zstd=True)[1]


@pytest.mark.parametrize("mode", ["auto", "zstd"])
@pytest.mark.parametrize("mbps", [None, 10])
def test_choose_without_zstd_here(mode, mbps, monkeypatch):
    # Simulating a missing local zstd by monkeypatching compress.zstd_binary:
    # the binary really is installed on test machines, and uninstalling it is
    # not an option.  choose() reads it through the module attribute, so this
    # is exactly what a machine without zstd looks like to it.
    monkeypatch.setattr(compress, "zstd_binary", lambda: None)
    compressed, why = choose(mode, host=REMOTE, link_mbps=mbps, remote_has_zstd=True)
    assert compressed is False and "not installed" in why


def test_feeder_without_zstd_here(monkeypatch):
    # As above: a missing local zstd, simulated through compress.zstd_binary.
    monkeypatch.setattr(compress, "zstd_binary", lambda: None)
    with pytest.raises(PeerkitError):
        ZstdFeeder(lambda data: None)


@pytest.mark.parametrize("configured,measured,host,expected", [
    (None, None, REMOTE, True),           # unknown speed: compress
    (None, 50.0, REMOTE, True),           # measured slow
    (None, 5000.0, REMOTE, False),        # measured fast
    (100, 5000.0, REMOTE, True),          # the configured value wins over the measured one
    (10_000, 20.0, REMOTE, False),
    (None, None, "127.0.0.1", False),     # loopback
])
def test_pull_mode_uses_configured_then_measured_link_speed(configured, measured, host, expected,
                                                           monkeypatch):
    from peerkit.pull import _transfer_mode
    from peerkit.install import Report

    monkeypatch.setattr(compress, "zstd_binary", lambda: "/usr/bin/zstd")
    cfg = SimpleNamespace(link_mbps=configured)
    peer_config = {"host": host, **({"link_mbps": measured} if measured is not None else {})}
    conn = SimpleNamespace(peer=SimpleNamespace(name="beta", config=peer_config),
                           features=frozenset({"zstd", "rsync", "receive-app"}))
    report = Report("beta", "app")
    use_rsync, compressed = _transfer_mode(cfg, conn, False, "auto", report, None)
    assert use_rsync is False and compressed is expected
    assert report.notes and report.notes[-1].startswith("zstd compression" if expected else "no compression")


@pytest.mark.parametrize("here,there,expected", [
    (True, True, None),
    (False, True, "rsync is not available here: falling back to a full transfer"),
    (True, False, "rsync is not available on beta: falling back to a full transfer"),
    (False, False, "rsync is not available here or on beta: falling back to a full transfer"),
])
def test_incremental_mode_and_its_fallback_note(here, there, expected, monkeypatch):
    from peerkit import rsync
    from peerkit.install import Report
    from peerkit.pull import _transfer_mode

    # A missing local rsync is simulated through rsync.rsync_binary (read at call time).
    monkeypatch.setattr(rsync, "rsync_binary", lambda: "/usr/bin/rsync" if here else None)
    monkeypatch.setattr(compress, "zstd_binary", lambda: "/usr/bin/zstd")
    conn = SimpleNamespace(peer=SimpleNamespace(name="beta", config={"host": REMOTE}),
                           features=frozenset({"zstd", "receive-app"} | ({"rsync"} if there else set())))
    notes: list[str] = []
    report = Report("beta", "app")
    use_rsync, compressed = _transfer_mode(SimpleNamespace(link_mbps=None), conn, True, "auto", report,
                                           notes.append)
    assert use_rsync is (expected is None)
    if expected is None:
        assert compressed is False and report.notes == [] and notes == []
    else:
        assert compressed is True  # the full transfer then follows the compression rules
        assert report.notes[0] == expected and notes == [f"note: {expected}"]


# -- ZstdFeeder ----------------------------------------------------------------------

def zstd_compress(data: bytes, *args: str) -> bytes:
    return subprocess.run([ZSTD, "-q", "-c", *args], input=data, stdout=subprocess.PIPE, check=True).stdout


def payload(rng: random.Random, size: int) -> bytes:
    """Half random bytes, half repetitive text: both code paths of the decoder."""
    random_part = rng.randbytes(size // 2)
    text = b"".join(b"line %d of a config file\n" % i for i in range(size // 40))
    return random_part + text[: size - len(random_part)]


def feed_in_chunks(feeder: ZstdFeeder, data: bytes, rng: random.Random, max_chunk: int = 200_000) -> None:
    i = 0
    while i < len(data):
        n = rng.choice([1, 7, 512, 4096, 65536, rng.randrange(1, max_chunk)])
        feeder.feed(data[i:i + n])
        i += n


class Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.threads: set[str] = set()

    def __call__(self, data: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.parts.append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)


def reaped(feeder: ZstdFeeder) -> bool:
    """zstd has exited and was waited for: no zombie left behind."""
    pid = feeder.proc.pid
    if feeder.proc.returncode is None:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # already reaped: what we want
    else:  # pragma: no cover - waitpid found a child we had not reaped
        return False
    status = Path(f"/proc/{pid}/status")
    if status.exists():  # the pid may have been reused by an unrelated process
        return "State:\tZ" not in status.read_text()
    return True


@needs_zstd
@pytest.mark.parametrize("seed,size", [(1, 0), (2, 1), (3, 1000), (4, 3 << 20), (5, 9 << 20)])
def test_round_trip_in_random_chunks(seed, size):
    rng = random.Random(seed)
    data = payload(rng, size)
    sink = Collect()
    feeder = ZstdFeeder(sink)
    feed_in_chunks(feeder, zstd_compress(data), rng)
    feeder.finish()
    assert sink.data == data
    assert sink.threads <= {"zstd-reader"}  # the sink runs in the reader thread
    assert reaped(feeder) and not feeder.thread.is_alive()


@needs_zstd
def test_round_trip_of_concatenated_frames_and_levels():
    rng = random.Random(9)
    a, b = payload(rng, 500_000), payload(rng, 700_000)
    stream = zstd_compress(a, "-1") + zstd_compress(b, "-19", "--no-check")
    sink = Collect()
    feeder = ZstdFeeder(sink)
    feed_in_chunks(feeder, stream, rng)
    feeder.finish()
    assert sink.data == a + b


@needs_zstd
@pytest.mark.parametrize("cut", [1, 4, 10, 100, 0.5, -1, -4])
def test_truncated_input(cut):
    rng = random.Random(11)
    stream = zstd_compress(payload(rng, 2 << 20))
    end = int(len(stream) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(stream) + cut)
    feeder = ZstdFeeder(Collect())
    with pytest.raises(TransferIncomplete):
        feed_in_chunks(feeder, stream[:end], rng)
        feeder.finish()
    feeder.abort()
    assert reaped(feeder)


@needs_zstd
@pytest.mark.parametrize("how", ["flipped bytes", "zeroed middle", "not zstd at all", "bad magic",
                                 "trailing garbage"])
def test_corrupt_input(how):
    rng = random.Random(12)
    data = payload(rng, 2 << 20)
    stream = bytearray(zstd_compress(data))
    mid = len(stream) // 2
    if how == "flipped bytes":
        for i in range(mid, mid + 64, 8):
            stream[i] ^= 0xFF
    elif how == "zeroed middle":
        stream[mid:mid + 4096] = bytes(4096)
    elif how == "not zstd at all":
        stream = bytearray(rng.randbytes(100_000))
    elif how == "bad magic":
        stream[0] ^= 0x01
    else:  # the whole payload decodes, then the garbage fails
        stream += b"this is not a zstd frame"
    sink = Collect()
    feeder = ZstdFeeder(sink)
    with pytest.raises(TransferIncomplete):
        feed_in_chunks(feeder, bytes(stream), rng)
        feeder.finish()
    feeder.abort()
    assert reaped(feeder)
    # Whatever was decoded before the damage is not the whole payload.
    assert sink.data != data or how == "trailing garbage"


class Boom:
    """A sink that raises (as the tar extractor does on an unsafe member) after ``after`` bytes."""

    def __init__(self, after: int = 0) -> None:
        self.after = after
        self.seen = 0
        self.error = UnsafeArchive("member escapes the staging directory")

    def __call__(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > self.after:
            raise self.error


@needs_zstd
@pytest.mark.parametrize("after", [0, 1 << 20])
def test_sink_error_is_reraised_from_feed(after):
    rng = random.Random(13)
    stream = zstd_compress(rng.randbytes(64 << 20), "-1")  # incompressible: zstd keeps writing
    sink = Boom(after)
    feeder = ZstdFeeder(sink)
    with pytest.raises(UnsafeArchive) as info:
        # Much more than the pipes hold: feed() must notice the reader's failure.
        feed_in_chunks(feeder, stream, rng, max_chunk=1 << 20)
    assert info.value is sink.error
    feeder.abort()
    assert reaped(feeder)


@needs_zstd
def test_sink_error_is_reraised_from_finish():
    # A small stream fits in the pipe: feed() returns before the reader fails,
    # so finish() is where the caller hears of it.
    sink = Boom()
    feeder = ZstdFeeder(sink)
    feeder.feed(zstd_compress(b"small payload\n" * 10))
    with pytest.raises(UnsafeArchive) as info:
        feeder.finish()
    assert info.value is sink.error
    assert reaped(feeder)


@needs_zstd
def test_sink_error_wins_over_the_exit_status():
    # zstd is killed when the sink fails; the caller must see the sink's error,
    # not a generic "truncated" one.
    sink = Boom(10)
    feeder = ZstdFeeder(sink)
    # The reader thread may fail while feed() still writes: the error may
    # surface from either call, but it is always the sink's.
    with pytest.raises(UnsafeArchive):
        feeder.feed(zstd_compress(random.Random(3).randbytes(300_000)))
        feeder.finish()
    feeder.abort()


@needs_zstd
@pytest.mark.parametrize("state", ["fresh", "mid-stream", "after finish", "after a sink error",
                                   "after a corrupt stream", "twice", "sink blocked"])
def test_abort_never_raises_and_leaves_no_zombie(state):
    rng = random.Random(14)
    stream = zstd_compress(rng.randbytes(8 << 20), "-1")
    release = threading.Event()
    sink = Collect()
    if state == "after a sink error":
        sink = Boom()
    if state == "sink blocked":
        def sink(data: bytes) -> None:  # noqa: F811 - a sink that stalls the reader
            release.wait(10)
    feeder = ZstdFeeder(sink)
    started = time.monotonic()
    if state == "mid-stream":
        feeder.feed(stream[: len(stream) // 3])
    elif state == "after finish":
        feeder.feed(stream)
        feeder.finish()
    elif state == "after a sink error":
        with pytest.raises(UnsafeArchive):
            feed_in_chunks(feeder, stream, rng)
            feeder.finish()
    elif state == "after a corrupt stream":
        with pytest.raises(TransferIncomplete):
            feeder.feed(b"\x00" * 100_000)
            feeder.finish()
    elif state == "twice":
        feeder.feed(stream[:1000])
        feeder.abort()
    elif state == "sink blocked":
        feeder.feed(stream[:1 << 20])
        # The stuck sink returns a moment later; abort() must not wait on it forever.
        threading.Timer(0.5, release.set).start()
    feeder.abort()
    release.set()
    assert reaped(feeder)
    assert time.monotonic() - started < 15
    feeder.thread.join(10)
    assert not feeder.thread.is_alive()
