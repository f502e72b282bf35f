"""The `peerkit` entry point: hand the command to a running agent, or run it here.

Starting the CLI costs about 0.17 s before any work (the interpreter,
asyncssh with cryptography, asyncio, click). When ``PEERKIT_AGENT`` names
the socket of a ``peerkit agent`` (a process that has all of that imported
already), this module sends it the command line, the environment, the
working directory and its own stdin, stdout and stderr; the agent forks a
worker that runs the command exactly as this process would have, on those
very files, and the exit status comes back here. Signals sent to this
process (Ctrl-C, SIGTERM, SIGHUP) are passed on to the worker.

Anything short of a worker that started (no variable, no socket, an agent
of another user or of another peerkit build) runs the command here instead,
so the agent can only make a command faster, never different. This module
imports nothing heavy: it is what every `peerkit` command pays first.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

ENV = "PEERKIT_AGENT"
MAGIC = b"peerkit-agent-1"
MAX_FRAME = 4 << 20  # a request carries argv and the environment (ARG_MAX is 2 MiB)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct(">I")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


# Messages are NUL-separated fields after a 4-byte length: no argument or
# variable can hold a NUL, and this module stays free of json (and so of re,
# about 7 ms of every command's start).
def frame(*fields: bytes) -> bytes:
    """Encode one message."""
    data = b"\0".join(fields)
    return _HEADER.pack(len(data)) + data


def take_frame(buf: bytearray) -> list[bytes] | None:
    """Remove and return the fields of the first complete message in ``buf`` (None: not complete yet).

    Raises ValueError for a message longer than MAX_FRAME.
    """
    if len(buf) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack_from(buf)
    if size > MAX_FRAME:  # a length that would make the reader buffer without end
        raise ValueError("message too long")
    if len(buf) < _HEADER.size + size:
        return None
    data = bytes(buf[_HEADER.size:_HEADER.size + size])
    del buf[:_HEADER.size + size]
    return data.split(b"\0")


def peer_uid(sock: socket.socket) -> int:
    """Return the user id of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


def build_id() -> str:
    """Identify this interpreter and this peerkit's source, so a stale agent is never used.

    An agent keeps the code it imported at start; after an upgrade (or an
    edit of a checkout) its build id no longer matches the one the new
    `peerkit` computes, and the command runs here instead.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = [os.path.realpath(sys.executable), root]
    todo = [root]
    while todo:
        here = todo.pop()
        with os.scandir(here) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name == "__pycache__":
                    continue
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                elif entry.name.endswith(".py"):
                    st = entry.stat(follow_symlinks=False)
                    parts.append(f"{entry.path[len(root):]}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def command_of(argv: list[str]) -> str | None:
    """Return the subcommand's name, skipping the group options that may precede it."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--config":
            i += 2
        elif word.startswith("--config=") or word == "--json":
            i += 1
        else:
            return word
    return None


def _stdio_settings() -> list[bytes]:
    """How this interpreter set up stdin, stdout and stderr (encoding, errors, line buffering)."""
    out = []
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        # Replaced or missing streams (an embedding program's) may lack some of these.
        out += [(getattr(stream, "encoding", None) or "utf-8").encode(),
                (getattr(stream, "errors", None) or "strict").encode(),
                b"1" if getattr(stream, "line_buffering", False) else b"0"]
    return out


def request(argv: list[str]) -> bytes:
    """Encode a request: who we are, how to set up the worker, argv, the environment."""
    umask = os.umask(0o22)
    os.umask(umask)
    return frame(MAGIC, build_id().encode(), b"%o" % umask, *_stdio_settings(), b"%d" % len(argv),
                 *map(os.fsencode, argv), *(k + b"=" + v for k, v in os.environb.items()))


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
        # Anyone who can write to the socket's directory could put their own
        # listener there: an agent of another user would be handed our
        # environment (which may hold secrets) and our terminal.
        if peer_uid(sock) != os.geteuid():
            sock.close()
            return None
    except OSError:
        sock.close()
        return None
    return sock


def run_via_agent(path: str, argv: list[str]) -> int | None:
    """Run ``argv`` in the agent at ``path``; return its exit status, or None to run it here.

    None is returned only when no worker started, so the command never runs
    twice. Signals that come meanwhile are held and passed on once the
    request is sent; one that comes when no worker will run ends this
    process, as it would have ended the command.
    """
    call = _Call()
    # SIGHUP this process was started ignoring (nohup) stays ignored: passed
    # on, it would end a command that, run here, survives it (no command
    # handles SIGHUP).  SIGINT and SIGTERM are passed on even then, as before:
    # the commands that act on them install handlers over an inherited
    # SIG_IGN (serve, the web UI, a pull's swap), so ignoring them here would
    # change those commands instead.
    taken = [sig for sig in FORWARDED_SIGNALS
             if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, call.signalled) for sig in taken}
    try:
        status = call.run(path, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status is None and call.pending:
        return _die_by(call.pending[0])
    return status


class _Call:
    """One command handed to the agent: send it, pass signals on, wait for its status."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pending: list[int] = []
        self.passed_on: set[int] = set()
        self.sending = True

    def signalled(self, signum: int, _frame: object) -> None:
        if self.sending or self.sock is None:  # not in the middle of the request's bytes
            self.pending.append(signum)
            return
        try:
            self.sock.sendall(frame(b"signal", b"%d" % signum))
            self.passed_on.add(signum)
        except OSError:  # the agent is gone: its worker was told to stop with it
            pass

    def run(self, path: str, argv: list[str]) -> int | None:
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # a working directory that no longer exists: let the command say so
            return None
        try:
            self.sock = _connect(path)
            if self.sock is None:
                return None
            for fd in (0, 1, 2):
                os.fstat(fd)  # a closed standard file cannot be passed on
            message = request(argv)
            fds = struct.pack("4i", cwd, 0, 1, 2)
            sent = self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            self.sock.sendall(message[sent:])
        except OSError:
            if self.sock is not None:
                self.sock.close()
            return None
        finally:
            os.close(cwd)
        self.sending = False
        for signum in self.pending:
            self.signalled(signum, None)
        try:
            return self._follow()
        finally:
            self.sock.close()

    def _follow(self) -> int | None:
        assert self.sock is not None
        buf = bytearray()
        started = False
        while True:
            try:
                message = take_frame(buf)
            except ValueError:
                message = [b"lost", b"a message from the agent was not understood"]
            if message is None:
                try:
                    chunk = self.sock.recv(65536)
                except OSError as exc:
                    chunk, lost = b"", (exc.strerror or str(exc)).encode()
                else:
                    lost = b"the agent closed the connection"
                if chunk:
                    buf += chunk
                    continue
                message = [b"lost", lost]
            kind, value = message[0], message[1] if len(message) == 2 else b""
            if kind == b"signaled" and value.isdigit() and (started or int(value) in self.passed_on):
                # Before it started too, if the signal was one we passed on: ours, so it ends us.
                return _die_by(int(value))
            if not started:
                if kind != b"started":
                    return None  # refused (another build, a bad request), or gone before starting
                started = True
                self.pending.clear()  # the worker has them
                continue
            if kind == b"exit" and value.isdigit():
                return int(value)
            return _lost(value.decode("utf-8", "replace") if kind == b"lost" else "unexpected message")


def _die_by(signum: int) -> int:
    """End this process by the signal that ended the worker, as the shell would see it."""
    sys.stdout.flush()
    if 0 < signum < signal.NSIG:
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
            pass
        os.kill(os.getpid(), signum)
    return 128 + signum


def _lost(why: str) -> int:
    """Report a worker whose outcome is unknown (the agent went away while it ran), as the CLI reports errors."""
    from ..errors import AgentLost
    from .main import _fail  # click and the commands: paid only on this rare path

    err = AgentLost(why)
    return _fail("--json" in sys.argv[1:], err.code, err.message, err.exit_code)


# What the commands that connect import first thing (asyncssh, cryptography):
# loaded by load() with the rest of the CLI.
PRELOAD = {"pull": "peerkit.pull", "push": "peerkit.push", "ping": "peerkit.client", "apps": "peerkit.client"}


def load(command: str | None) -> None:
    """Import the CLI (and what ``command`` connects with) without garbage collection.

    A pull's imports leave some 60,000 objects the cyclic collector tracks
    and almost no garbage, yet it walks them again and again as they come:
    5-10 ms of CPU of the 0.1 s a `peerkit pull` spends importing.  So
    it is off while they load; then what they made is frozen (``gc.freeze``:
    later collections never walk it) and it is on again before any command
    runs, long-running ones (serve, web, agent) included.
    """
    import gc
    import importlib

    gc.disable()
    try:
        importlib.import_module("peerkit.cli.main")
        if command in PRELOAD:
            importlib.import_module(PRELOAD[command])
    finally:
        gc.freeze()
        gc.enable()


def main() -> None:
    """Console-script entry point."""
    path = os.environ.get(ENV)
    argv = sys.argv[1:]
    command = command_of(argv)
    if path and command not in ("agent", None):
        status = run_via_agent(path, argv)
        if status is not None:
            os._exit(status)
    load(command)
    from .main import main as run_here

    run_here()
