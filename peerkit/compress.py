"""zstd on the wire: choose whether to compress, and decompress as data arrives.

The zstd binary does the work in both directions (the standard library has no
zstd before Python 3.14, and a C tool beats a binding on a pipe anyway).
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from typing import Callable

from .errors import PeerkitError, TransferIncomplete
from .rsyncargs import find_tool

ZSTD_PATH = "/usr/local/bin:/usr/bin:/bin"
# zstd -3 (apps.ZSTD_SEND) on two cores compresses ~180 MB/s: a link slower than
# this (in Mbit/s) is the bottleneck, so compressing pays.
FAST_LINK_MBPS = 1000
_CHUNK = 1 << 20


def zstd_binary() -> str | None:
    """Return the path of zstd, or None when it is not installed."""
    return find_tool("zstd", ZSTD_PATH)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def choose(mode: str, *, host: str, link_mbps: float | None, remote_has_zstd: bool,
           measured_mbps: float | None = None) -> tuple[bool, str]:
    """Decide whether to compress; return (compress, why).

    ``link_mbps`` is the operator's configured link speed and wins;
    ``measured_mbps`` is what the last large transfer with this peer achieved.
    """
    if mode == "none":
        return False, "--compress none"
    if not remote_has_zstd:
        return False, "the peer offers no zstd"
    if zstd_binary() is None:
        return False, "zstd is not installed here"
    if mode == "zstd":
        return True, "--compress zstd"
    if link_mbps is not None:
        return link_mbps < FAST_LINK_MBPS, f"link configured at {link_mbps:.0f} Mbit/s"
    # Before the measured rate: on loopback that rate is the CPU's, not a link's.
    if _is_loopback(host):
        return False, "loopback link"
    if measured_mbps is not None:
        return measured_mbps < FAST_LINK_MBPS, f"link measured at {measured_mbps:.0f} Mbit/s"
    return True, "remote link of unknown speed"


class ZstdFeeder:
    """Accept compressed chunks; hand the decompressed stream to ``sink`` in a reader thread."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        binary = zstd_binary()
        if binary is None:
            raise PeerkitError("zstd is not installed")
        self.proc = subprocess.Popen([binary, "-d", "-c", "-q"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env={"PATH": ZSTD_PATH}, close_fds=True)
        self.sink = sink
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="zstd-reader", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            while True:
                data = self.proc.stdout.read1(_CHUNK)
                if not data:
                    return
                self.sink(data)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc
            self.proc.kill()

    def feed(self, data: bytes) -> None:
        """Pass one compressed chunk on; raise what the reader side hit."""
        if self.error is not None:
            raise self.error
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
        except BrokenPipeError:
            self.thread.join()
            raise self.error or TransferIncomplete("zstd stopped reading") from None

    def finish(self) -> None:
        """The compressed stream ended: wait for the rest, and check it was well formed."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.thread.join()
        status = self.proc.wait()
        if self.error is not None:
            raise self.error
        if status != 0:
            raise TransferIncomplete(f"the compressed stream is truncated or corrupt (zstd exited {status})")

    def abort(self) -> None:
        """Stop decompressing; never raises."""
        self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
        self.thread.join(timeout=5)
        self.proc.wait()
