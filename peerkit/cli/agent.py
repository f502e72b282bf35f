"""`peerkit agent`: keep peerkit imported and fork one worker per command.

A `peerkit` command spends about 0.17 s starting before it does any work
(README, Benchmarks). The agent pays that once: it imports the CLI and the
library, freezes the heap for copy-on-write (``gc.freeze``) and listens on
a Unix socket. For each command ``peerkit.cli.launch`` sends (argv, the
environment, the umask, the working directory and the caller's stdin,
stdout and stderr as file descriptors) it forks a worker that takes all of
those over and runs the command through the same ``main()`` as a `peerkit`
process, so output, progress, ``--json``, locks, hooks and exit statuses
are the same. The exit status (or the signal that ended the worker) goes
back to the caller. When the caller goes away the worker gets SIGTERM, which
stops a transfer cleanly; when the agent dies its workers get SIGTERM too.

Only processes of the agent's own user are served: anything they could ask
the agent, they could run themselves. The worker runs with the agent's
groups, limits and cgroup and with the agent's Python settings; the rest of
the caller's process state it copies.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import importlib
import io
import os
import pkgutil
import selectors
import signal
import socket
import stat
import sys
import time
from typing import Callable, NamedTuple

from ..errors import AgentSocket
from .launch import FORWARDED_SIGNALS, MAGIC, build_id, command_of, frame, peer_uid, take_frame

# Not preloaded: the benchmarks, and the web UI (aiohttp) that runs as its own service.
NOT_PRELOADED = ("peerkit.bench", "peerkit.web")
_MAX_FDS = 8  # more than a request carries, so that extra ones are seen (and closed)
MAX_CALLERS = 64  # connections at once (each may buffer a 4 MiB request); more wait in the backlog
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request
_STOP_SIGNALS = set(FORWARDED_SIGNALS)  # what a caller passes on is what a worker must get first


# Imported by commands on first use (asyncio's default executor, for one).
PRELOADED_STDLIB = ("concurrent.futures.thread", "queue")


def preload() -> int:
    """Import the CLI, every library module and what they import on first use; return the module count."""
    import peerkit

    importlib.import_module("peerkit.cli.main")  # registers every command
    for name in PRELOADED_STDLIB:
        importlib.import_module(name)
    todo = [peerkit]
    while todo:
        package = todo.pop()
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name.startswith(NOT_PRELOADED) or info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            if info.ispkg:
                todo.append(module)
    return len(sys.modules)


def listen(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Bind the agent's socket at ``path`` (mode 0600); return it and its (device, inode)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError as exc:
        raise AgentSocket(f"{parent}: {exc.strerror}") from None
    # Whoever can write to the directory can swap the socket for their own
    # and be handed every caller's environment and terminal.
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        raise AgentSocket(f"{parent} must belong to this user (or root) and be writable by no one else")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            # Never unlink what is not a socket: a wrong path must not cost a file.
            raise AgentSocket(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by an agent that died
        except OSError as exc:
            raise AgentSocket(f"{path}: {exc.strerror}") from None
        else:
            raise AgentSocket(f"another agent is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is 0600 from the moment it exists
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise AgentSocket(f"{path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)


class Request(NamedTuple):
    """A caller's command and the process state its worker takes over."""

    build: str
    umask: int
    stdio: list[tuple[str, str, bool]]
    argv: list[str]
    env: list[tuple[bytes, bytes]]


_FIXED_FIELDS = 13  # magic, build, umask, 3 x (encoding, errors, line buffering), argc


def parse_request(fields: list[bytes], fds: list[int]) -> Request:
    """Check a request's fields and descriptors; raise ValueError saying why it cannot be served."""
    if len(fields) < _FIXED_FIELDS or fields[0] != MAGIC:
        raise ValueError("protocol")
    umask, argc = fields[2], fields[12]
    # Digits only: int() would also take signs, spaces and underscores.
    if not (umask and set(umask) <= set(b"01234567") and len(umask) <= 4 and argc.isdigit() and len(argc) <= 7):
        raise ValueError("request")
    if int(umask, 8) > 0o777 or _FIXED_FIELDS + int(argc) > len(fields):
        raise ValueError("request")
    stdio = []
    for i in (3, 6, 9):
        encoding, errors, line = fields[i:i + 3]
        try:
            # A name the worker could not open its streams with.
            codecs.lookup(encoding.decode("ascii"))
            codecs.lookup_error(errors.decode("ascii"))
        except (UnicodeDecodeError, LookupError):
            raise ValueError("request") from None
        if line not in (b"0", b"1"):
            raise ValueError("request")
        stdio.append((encoding.decode("ascii"), errors.decode("ascii"), line == b"1"))
    end = _FIXED_FIELDS + int(argc)
    env = []
    for item in fields[end:]:
        name, eq, value = item.partition(b"=")
        if not name or not eq:  # an entry that is not NAME=value would set something else
            raise ValueError("request")
        env.append((name, value))
    # The working directory comes as a descriptor (its path may mean another
    # place here), then stdin, stdout and stderr; nothing more, nothing less.
    if len(fds) != 4 or not stat.S_ISDIR(os.fstat(fds[0]).st_mode):
        raise ValueError("request")
    return Request(fields[1].decode("utf-8", "surrogateescape"), int(umask, 8), stdio,
                   [os.fsdecode(a) for a in fields[_FIXED_FIELDS:end]], env)


class _Caller:
    """One connection: its request, then the worker it started."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.pid = 0
        self.pidfd = -1
        self.command = "?"
        self.started = 0.0
        self.connected = True
        self.created = time.monotonic()

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


class Agent:
    """The command server: one thread, a selector, a worker process per command."""

    def __init__(self, path: str, note: Callable[[str], None]) -> None:
        self.path = path
        self.note = note
        self.build = build_id()
        self.uid = os.geteuid()
        self.pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.inode = (0, 0)
        self.callers: set[_Caller] = set()
        self.stopping = ""
        self.wake_w: socket.socket | None = None
        self.paused = False

    def serve(self) -> None:
        """Listen, serve until SIGTERM, SIGINT or a newer peerkit build, then wait for the workers."""
        _standard_fds_open()
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as exc:  # Linux before 5.3
            raise AgentSocket(f"the agent needs pidfd_open (Linux 5.3 or later): {exc}") from None
        preload()
        self.listener, self.inode = listen(self.path)
        wake_r, self.wake_w = socket.socketpair()
        wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(self.wake_w.fileno())
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda: self._signalled(wake_r))
        # Everything imported from here on is shared with every worker, copy-on-write;
        # frozen, the collector never touches (and so never copies) it.
        gc.collect()
        gc.freeze()
        self.note(f"peerkit agent: listening on {self.path} (pid {os.getpid()}, {len(sys.modules)} modules loaded)")
        try:
            while self.listener is not None or any(c.pidfd >= 0 for c in self.callers):
                waiting = any(not c.pid for c in self.callers)
                for key, _events in self.sel.select(1.0 if waiting else None):
                    key.data()
                if waiting:
                    self._drop_stalled()
        finally:
            self._stop_listening()
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sel.close()
            wake_r.close()
            self.wake_w.close()
        self.note(f"peerkit agent: stopped ({self.stopping})")

    def _signalled(self, wake: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            wake.recv(64)
        self._stop("signal")

    def _stop(self, why: str) -> None:
        """Stop taking commands; ask running workers to stop (they end their transfers cleanly)."""
        if not self.stopping:
            self.stopping = why
            self._stop_listening()
            for caller in self.callers:
                if caller.pidfd >= 0 and why == "signal":
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(caller.pidfd, signal.SIGTERM)

    def _drop_stalled(self) -> None:
        """Drop connections that never sent a whole request (each holds a place and descriptors)."""
        now = time.monotonic()
        for caller in [c for c in self.callers if not c.pid and now - c.created > REQUEST_TIMEOUT]:
            self._refuse(caller, "timeout")

    def _pause(self, paused: bool) -> None:
        """Stop or resume accepting (out of descriptors, or MAX_CALLERS connections)."""
        if self.listener is None or paused == self.paused:
            return
        self.paused = paused
        if paused:
            self.sel.unregister(self.listener)
        else:
            self.sel.register(self.listener, selectors.EVENT_READ, self._accept)

    def _stop_listening(self) -> None:
        if self.listener is None:
            return
        if not self.paused:
            self.sel.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:  # only our own socket, never a successor's
                os.unlink(self.path)

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors: readable again at once, so stop asking
                # until a connection ends (callers wait in the backlog).
                self.note(f"peerkit agent: accept failed: {exc.strerror}")
                self._pause(True)
                return
            uid = peer_uid(sock)
            # Another user's command would run with this user's rights.
            if uid != self.uid:
                self.note(f"peerkit agent: refused a connection from uid {uid}")
                sock.close()
                continue
            sock.setblocking(False)
            caller = _Caller(sock)
            self.callers.add(caller)
            self.sel.register(sock, selectors.EVENT_READ, lambda c=caller: self._readable(c))
            if len(self.callers) >= MAX_CALLERS:
                self._pause(True)
                return

    def _readable(self, caller: _Caller) -> None:
        try:
            data, ancdata, _flags, _addr = caller.sock.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        fds = _received_fds(ancdata)
        if fds and not caller.pid and not caller.fds and not caller.buf:
            caller.fds = fds
        else:
            for fd in fds:  # descriptors come only with a request's first bytes: close any others
                os.close(fd)
        if not data:
            self._hang_up(caller)
            return
        caller.buf += data
        while caller.sock.fileno() >= 0:
            try:
                message = take_frame(caller.buf)
            except ValueError:
                if caller.pid:  # garbage from a caller whose command runs: as if it hung up
                    self._hang_up(caller)
                else:
                    self._refuse(caller, "request")
                return
            if message is None:
                return
            if caller.pid:
                self._control(caller, message)
            else:
                self._start(caller, message)

    def _control(self, caller: _Caller, message: list[bytes]) -> None:
        """Pass a signal the caller received on to its worker (only those a terminal sends)."""
        signum = int(message[1]) if len(message) == 2 and message[0] == b"signal" and message[1].isdigit() else 0
        if signum in FORWARDED_SIGNALS and caller.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(caller.pidfd, signum)

    def _refuse(self, caller: _Caller, why: str) -> None:
        self.note(f"peerkit agent: refused a request ({why})")
        with contextlib.suppress(OSError):
            caller.sock.sendall(frame(b"refused", why.encode()))
        self._drop(caller)

    def _start(self, caller: _Caller, message: list[bytes]) -> None:
        try:
            request = parse_request(message, caller.fds)
        except ValueError as exc:
            self._refuse(caller, str(exc))
            return
        if request.build != self.build or self.stopping:
            self._refuse(caller, "stopping" if self.stopping else "build")
            if not self.stopping and same_install(request.build, self.build):
                # This installation's peerkit changed (an upgrade, an edit):
                # step aside so a service manager starts the new code; callers
                # run commands themselves meanwhile. A caller from another
                # installation is only refused: it must not stop the agent.
                self.note("peerkit agent: peerkit changed since the agent started; stopping")
                self._stop("peerkit changed")
            return
        caller.command = _command_name(request.argv)
        report = caller.sock.fileno()
        # What the worker must not keep: the agent's own descriptors, other
        # callers' connections and the descriptors they sent.
        agent_fds = [key.fd for key in self.sel.get_map().values() if key.fd != report]
        agent_fds += [self.sel.fileno(), self.wake_w.fileno()]
        agent_fds += [fd for other in self.callers if other is not caller for fd in other.fds]
        # Blocked across the fork: a signal meant for the worker that comes
        # before it has its own handlers is held, not run by the agent's.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # no process to spare: the caller runs the command itself
            self._refuse(caller, f"fork: {exc.strerror}")
            return
        finally:
            if os.getpid() == self.pid:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        if pid == 0:
            _run_worker(request, caller.fds, agent_fds, report)
        caller.close_fds()
        caller.pid = pid
        caller.started = time.monotonic()
        caller.pidfd = os.pidfd_open(pid)
        self.sel.register(caller.pidfd, selectors.EVENT_READ, lambda: self._reap(caller))
        self.note(f"peerkit agent: worker {pid}: {caller.command or '(no command)'}")

    def _reap(self, caller: _Caller) -> None:
        _, status = os.waitpid(caller.pid, 0)
        self.sel.unregister(caller.pidfd)
        os.close(caller.pidfd)
        caller.pidfd = -1
        if os.WIFSIGNALED(status):
            reply, outcome = frame(b"signaled", b"%d" % os.WTERMSIG(status)), f"signal {os.WTERMSIG(status)}"
        else:
            reply, outcome = frame(b"exit", b"%d" % os.WEXITSTATUS(status)), f"exit {os.WEXITSTATUS(status)}"
        self.note(f"peerkit agent: worker {caller.pid}: {caller.command or '(no command)'}: {outcome}, "
                  f"{time.monotonic() - caller.started:.2f} s")
        if caller.connected:
            with contextlib.suppress(OSError):
                caller.sock.sendall(reply)
        self._drop(caller)

    def _hang_up(self, caller: _Caller) -> None:
        """The caller went away (or cannot be written to): stop its worker as its SIGTERM would."""
        if caller.pidfd >= 0 and caller.connected:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(caller.pidfd, signal.SIGTERM)
        self._drop(caller)

    def _drop(self, caller: _Caller) -> None:
        """Close the caller's connection; forget it once its worker (if any) is reaped."""
        caller.close_fds()
        if caller.connected:
            caller.connected = False
            self.sel.unregister(caller.sock)
            caller.sock.close()
        if caller.pidfd < 0:
            self.callers.discard(caller)
            if len(self.callers) < MAX_CALLERS:
                self._pause(False)


def same_install(build: str, other: str) -> bool:
    """Tell whether two build ids name the same interpreter and peerkit directory (their first two lines)."""
    return build.split("\n", 2)[:2] == other.split("\n", 2)[:2]


def _received_fds(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(int.from_bytes(data[i:i + 4], sys.byteorder, signed=True) for i in range(0, usable, 4))
    return fds


def _command_name(argv: list[str]) -> str:
    """Name the command for the log (its arguments may hold tokens: never logged)."""
    name = command_of(argv) or ""
    return name if name.isascii() and name.replace("-", "").isalpha() and len(name) <= 20 else "?"


def _standard_fds_open() -> None:
    """Make sure 0, 1 and 2 are open, so that no received descriptor lands on one of them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the agent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _text_stream(fd: int, writing: bool, settings: tuple[str, str, bool]) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w" if writing else "r", closefd=False)
    buffered = io.BufferedWriter(raw) if writing else io.BufferedReader(raw)
    encoding, errors, line_buffering = settings
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line_buffering)


def _run_worker(request: Request, fds: list[int], agent_fds: list[int], report: int) -> None:
    """In the forked child: become the caller's process, run its command, exit. Never returns.

    ``report`` is the caller's connection (close-on-exec: hooks and other
    children never hold it), on which the worker sends its exit status.
    """
    parent = os.getppid()
    try:
        # Default actions first, then the signals blocked across the fork:
        # one sent before the command runs ends the worker as it would end
        # a `peerkit` process that had not started yet.
        signal.set_wakeup_fd(-1)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.setsid()  # the agent's terminal (if any) and process group are not the caller's
        _die_with_parent(parent)
        for fd in agent_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        cwd, *stdio = fds
        os.fchdir(cwd)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        os.umask(request.umask)
        os.environ.clear()
        for name, value in request.env:
            os.environb[name] = value
        time.tzset()
        sys.stdin = _text_stream(0, False, request.stdio[0])
        sys.stdout = _text_stream(1, True, request.stdio[1])
        sys.stderr = _text_stream(2, True, request.stdio[2])
        sys.argv = ["peerkit", *request.argv]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Said by the worker, not the agent: once the caller hears it, the
        # command is under way, and the caller never runs it a second time.
        os.write(report, frame(b"started", b"%d" % os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - a child must never return into the agent's loop
        with contextlib.suppress(BaseException):
            os.write(2, f"peerkit: error: the agent could not start the command: {exc}\n".encode())
        os._exit(1)
    status = 1
    try:
        from .main import finish, run

        status = finish(run(sys.argv[1:]))
        # Done: the SIGTERM the agent sends when the caller, told below, hangs
        # up must not turn this exit status into a death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        # Told by the worker itself, so that the caller learns it even when
        # the agent died meanwhile (the worker then got SIGTERM and stopped).
        with contextlib.suppress(OSError):
            os.write(report, frame(b"exit", b"%d" % status))
    finally:
        os._exit(status)


def run_agent(path: str, note: Callable[[str], None]) -> str:
    """Serve commands on ``path`` until stopped; return why it stopped."""
    agent = Agent(path, note)
    agent.serve()
    return agent.stopping
