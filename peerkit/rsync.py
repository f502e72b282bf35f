"""Incremental transfers with rsync, carried by the peer's open SSH connection.

Client side: rsync's remote shell is ``rsyncrelay.py``, which hands the
command rsync wants run, and rsync's own pipes, to this process over a
socket pair.  We accept only the rsync server command for this app and this
direction, run it as one more exec channel on the connection that already
authenticated with our identity and pinned the peer's host key (no second
login, no OpenSSH client, no agent, no forwarding), and move the bytes
between the channel and rsync's pipes with the channel's flow control.  The
copy lands in a staging directory seeded by ``--link-dest`` against the live
app: unchanged files are hard links, changed files are new files, and the
live app is never written.

Server side (peer-shell): the request was validated by ``rsyncargs``; the
command run is rebuilt from it with our absolute path and ``--``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from .sshimport import asyncssh

from .client import MAX_PACKET, MAX_STDERR, WINDOW, PeerConnection, StreamResult, raise_remote, remote_error
from .command import WITH_APP_INFO
from .errors import PeerkitError, ProtocolError, SessionRefused, TransferIncomplete
from .rsyncargs import RSYNC_ENV, parse_rsync, rsync_binary
from .swap import link_farm, new_staging, remove_tree

RELAY = Path(__file__).with_name("rsyncrelay.py")
# The host part of rsync's remote path: only ever handed back to us by the relay.
HOST = "peer"
_RECEIVED = re.compile(rb"Total bytes received: ([0-9,]+)")
_SENT = re.compile(rb"Total bytes sent: ([0-9,]+)")
# rsync's -e splits on spaces and honours quotes; these need neither.
_PLAIN = re.compile(r"[A-Za-z0-9/._+=:@%-]+")
_MAX_REQUEST = 4096


def relay_command(fd: int) -> str:
    """Return rsync's ``-e`` value: the relay, run by this Python, talking to socket ``fd``."""
    words = [sys.executable, "-I", "-S", str(RELAY), str(fd)]
    quoted = []
    for word in words:
        if _PLAIN.fullmatch(word):
            quoted.append(word)
        elif "'" not in word:
            quoted.append(f"'{word}'")
        else:
            raise PeerkitError(f"cannot hand {word!r} to rsync -e (it contains a quote)")
    return " ".join(quoted)


def client_argv(rsync: str, relay: str, remote: str, local: str, *, pull: bool,
                link_dest: Path | None) -> list[str]:
    """Return the rsync command line the client runs."""
    argv = [rsync, "-rlptH", "--numeric-ids", "--stats", "-e", relay]
    if os.geteuid() == 0:
        argv.insert(2, "-og")  # owners only mean something when we are root
    if pull:
        if link_dest is not None:
            argv.append(f"--link-dest={link_dest}")
    else:
        argv.append("--delete")
    return argv + ["--", remote, local]


def checked_command(words: list[str], app: str, *, pull: bool) -> str:
    """Return the remote command line for the relay's ``words``, or refuse anything but ours.

    The relay speaks for whatever runs as rsync's remote shell: only the
    rsync server command for this app and this direction may reach the peer.
    """
    if len(words) < 2 or words[0] != HOST:
        raise PeerkitError("rsync named another host or added ssh options")
    command = words[1:]
    # Words with spaces or controls would not split back into the same
    # words on the peer's side.
    if not all(w and w.isascii() and w.isprintable() and " " not in w for w in command):
        raise PeerkitError("rsync's remote command has unexpected characters")
    try:
        request = parse_rsync(command)
    except PeerkitError as exc:
        raise PeerkitError(f"not an rsync server command peerkit sends: {exc.detail}") from None
    if request.slug != app or request.sender != pull:
        raise PeerkitError("rsync's remote command is for another app or direction")
    return " ".join(command)


async def _relay_request(sock: socket.socket) -> tuple[list[str], list[int]]:
    """Wait for the relay's one message: the words rsync gave it, and its stdin and stdout."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
    data, fds, flags, _ = socket.recv_fds(sock, _MAX_REQUEST, 2)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 2 or not data:
        for fd in fds:
            os.close(fd)
        raise PeerkitError("the rsync relay sent no usable request")
    try:
        return data.decode("ascii").split("\0"), fds
    except UnicodeDecodeError:
        for fd in fds:
            os.close(fd)
        raise PeerkitError("rsync's remote command is not ASCII") from None


async def _carry(conn: PeerConnection, sock: socket.socket, app: str, pull: bool,
                 answer: "asyncio.Future[bytes] | None") -> bytes:
    """Run the relay's command on ``conn`` with rsync's pipes as stdin/stdout; return the remote stderr.

    With ``answer``, the command goes as ``with-app-info``, and the first
    line of the remote stderr (app-info's answer) is handed to ``answer``.
    """
    words, fds = await _relay_request(sock)
    pipes = [os.fdopen(fds[0], "rb", buffering=0), os.fdopen(fds[1], "wb", buffering=0)]
    proc: Any = None
    try:
        command = checked_command(words, app, pull=pull)
        if answer is not None:
            command = f"{WITH_APP_INFO} {command}"
        # asyncssh moves the bytes with flow control both ways, sends EOF
        # when rsync closes its end, closes rsync's input at the remote's
        # EOF, and closes both pipes when the channel closes.
        proc = await conn.conn.create_process(
            command, encoding=None, stdin=pipes[0], stdout=pipes[1], stderr=asyncssh.PIPE,
            window=WINDOW, max_pktsize=MAX_PACKET)
        err = bytearray()
        if answer is not None:
            err += await _answer_line(conn, proc.stderr, answer)
        # Bounded, and drained all along: stdout and stderr share one window.
        while data := await proc.stderr.read(1 << 16):
            err += data[:MAX_STDERR - len(err)]
        result = await proc.wait()
    except asyncssh.ChannelOpenError as exc:
        if conn.lost():
            raise TransferIncomplete(f"{conn.peer.name}: connection lost before rsync started: {exc}") from None
        # Refused a session (serve.max_sessions_per_peer, say): nothing ran yet.
        raise SessionRefused(f"{conn.peer.name}: no session for rsync: {exc}") from None
    except (asyncssh.Error, OSError) as exc:
        raise TransferIncomplete(f"{conn.peer.name}: connection lost during rsync: {exc}") from None
    finally:
        if proc is None:
            for pipe in pipes:
                pipe.close()
        else:
            proc.close()  # a no-op once it ended; otherwise the remote command must not outlive us
    status = result.exit_status
    # No exit status: the channel went away (ssh says 255 too).
    with contextlib.suppress(OSError):  # a relay that is gone has nobody to tell
        sock.send(b"%d" % (status if status is not None and 0 <= status < 256 else 255))
    return bytes(err)


async def _answer_line(conn: PeerConnection, stderr: Any, answer: "asyncio.Future[bytes]") -> bytes:
    """Hand the first line of ``stderr`` to ``answer`` (unless it is done); return all read so far.

    The line stays in what is returned: when it is an error, the remote
    stderr must still say so once rsync has failed.
    """
    buf = bytearray()
    while b"\n" not in buf:
        # A peer that sends no line break is cut off, not buffered.
        if len(buf) > MAX_STDERR:
            raise ProtocolError(f"{conn.peer.name}: with-app-info answer is too long")
        data = await stderr.read(1 << 12)
        if not data:
            raise ProtocolError(f"{conn.peer.name}: rsync ended without with-app-info's answer")
        buf += data
    if not answer.done():
        answer.set_result(bytes(buf[:buf.index(b"\n")]))
    return bytes(buf[:MAX_STDERR])


class LinkFarm:
    """The live app's regular files hard-linked beside it, by a thread: what rsync's --link-dest reads.

    Made (``swap.link_farm``) as soon as the pull knows it will use rsync
    (alongside the connection, for an rsync started with the ping);
    ``run_client`` starts removing it, in a thread, as soon as rsync ended,
    so that the removal (one unlink per file of the app) runs beside the
    checks and the flush; ``remove()`` waits for that.  It is
    named like a staging directory, so a run that was killed leaves nothing
    the next run (under the app lock) keeps.
    """

    def __init__(self, live: Path, apps_dir: Path, app: str) -> None:
        self.path = new_staging(apps_dir, app)
        self._filled = asyncio.get_running_loop().run_in_executor(None, link_farm, live, self.path)
        self._removed: asyncio.Future[None] | None = None

    async def ready(self) -> None:
        """Wait until it is filled (raise what stopped it)."""
        await asyncio.shield(self._filled)

    def discard(self) -> "asyncio.Future[None]":
        """Start removing the farm, once its thread has ended, in another thread; return at once."""
        if self._removed is None:
            self._removed = asyncio.ensure_future(self._remove_after_fill())
        return self._removed

    async def _remove_after_fill(self) -> None:
        with contextlib.suppress(Exception):  # what stopped it was reported by ready()
            await asyncio.shield(self._filled)
        with contextlib.suppress(OSError):  # a leftover goes with the next run's
            await asyncio.get_running_loop().run_in_executor(None, remove_tree, self.path)

    async def remove(self) -> None:
        """Remove the farm (or wait for the removal ``discard`` started); never raises.

        Cancelled meanwhile, the removal goes on in its thread, and what the
        filling thread adds later goes with the next run's leftovers.
        """
        removal = self.discard()
        with contextlib.suppress(Exception):
            await asyncio.shield(removal)


async def run_client(conn: PeerConnection, app: str, staging: Path, farm: LinkFarm | None,
                     answer: "asyncio.Future[bytes] | None" = None) -> int:
    """Pull ``app`` from the peer into ``staging`` with rsync; return the bytes received.

    Files that did not change become hard links of the live app's, found
    in ``farm`` (none for a first pull), whose removal starts when rsync ends.
    With ``answer``, the request asks app-info's answer first (one session
    for both, ``with-app-info``): its line is handed to ``answer``, which
    fails with whatever stops the rsync before it came.
    """
    try:
        if farm is not None:
            await farm.ready()
        out, _ = await _run(conn, app, True, lambda rsync, relay: client_argv(
            rsync, relay, f"{HOST}:{app}/", f"{staging}/", pull=True,
            link_dest=farm.path if farm is not None else None), answer)
    except BaseException as exc:
        # Whoever waits for the answer must not wait for ever.
        if answer is not None and not answer.done():
            if isinstance(exc, asyncio.CancelledError):
                answer.cancel()
            else:
                answer.set_exception(exc)
        raise
    finally:
        if farm is not None:
            farm.discard()
    match = _RECEIVED.search(out)
    return int(match.group(1).replace(b",", b"")) if match else 0


async def run_push(conn: PeerConnection, app: str, live: Path) -> tuple[int, bytes]:
    """Push our ``app`` to the peer with rsync; return the bytes sent and the remote stderr."""
    out, err = await _run(conn, app, False, lambda rsync, relay: client_argv(
        rsync, relay, f"{live}/", f"{HOST}:{app}/", pull=False, link_dest=None))
    return parse_sent(out), err


async def _run(conn: PeerConnection, app: str, pull: bool, make_argv: Callable[[str, str], list[str]],
               answer: "asyncio.Future[bytes] | None" = None) -> tuple[bytes, bytes]:
    """Run the rsync client built by ``make_argv(rsync, relay)`` over ``conn``; raise if it fails.

    Returns rsync's stdout and the remote side's stderr.
    """
    rsync = rsync_binary()
    if rsync is None:
        raise PeerkitError("rsync is not installed")
    # SEQPACKET: the relay's request is one message, never split or merged.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = None
    carry = local = None
    try:
        ours.setblocking(False)
        proc = await asyncio.create_subprocess_exec(
            *make_argv(rsync, relay_command(theirs.fileno())), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=RSYNC_ENV, pass_fds=(theirs.fileno(),))
        theirs.close()
        carry = asyncio.ensure_future(_carry(conn, ours, app, pull, answer))
        local = asyncio.ensure_future(proc.communicate())
        await asyncio.wait({carry, local}, return_when=asyncio.FIRST_COMPLETED)
        if carry.done() and carry.exception() is not None:
            carry.result()  # refused, or the connection went away: stop rsync (below)
        if not carry.done():
            # rsync ended without (or before finishing) its remote command.
            await local
            carry.cancel()
            with contextlib.suppress(asyncio.CancelledError, PeerkitError):
                await carry
            remote_err = b""
        else:
            remote_err = carry.result()
        out, err = await local
    except BaseException:
        if carry is not None and not carry.done():
            carry.cancel()
            with contextlib.suppress(BaseException):
                await carry
        # A relay still waiting for its status holds rsync's stderr, and
        # waiting for rsync waits for that pipe too: end the relay first.
        ours.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if local is not None:
            local.cancel()
        raise
    finally:
        theirs.close()
        ours.close()
    if proc.returncode != 0:
        code = remote_error(remote_err)
        if code is not None:
            # peer-shell refused or failed and said why on stderr.
            raise_remote(conn.peer.name, StreamResult(proc.returncode, 0, remote_err, code))
        text = (err + remote_err).decode("utf-8", "replace")
        raise TransferIncomplete(f"rsync exited {proc.returncode}: {text[-300:]}")
    return out, remote_err


def parse_sent(stats: bytes) -> int:
    """Return "Total bytes sent" from rsync --stats output (0 if absent)."""
    match = _SENT.search(stats)
    return int(match.group(1).replace(b",", b"")) if match else 0
