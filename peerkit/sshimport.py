"""Import asyncssh without the subprocesses its library lookups start.

At import, asyncssh looks for liboqs (post-quantum sntrup761 key exchange)
and nettle (UMAC) with ``ctypes.util.find_library``.  On Linux each lookup
runs ``ldconfig -p``, and one that finds nothing then runs ``gcc`` and
``ld`` where they are installed: about 30 ms of every client command (ping,
pull, push) on a host with a compiler, mostly spent looking for liboqs,
which few hosts have.

While asyncssh is being imported, and only then, library lookups look
where the dynamic loader would: LD_LIBRARY_PATH, the directories
ld.so.conf lists, and the default ones.  A host with liboqs or nettle in
any of them keeps what asyncssh builds on them; after the import,
``ctypes.util.find_library`` is ctypes' own again.  asyncssh's X.509
certificate module, which peerkit never uses, is not imported at all
(``_Skip``), each connection's options, client or server, are built in
the event loop instead of a worker thread (``options_in_loop``), and a
client authenticates with one signed public key request instead of three
requests (``signed_first``, ``publickey_first``).  Modules that use
asyncssh import it from here (``from .sshimport import asyncssh``).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

_LD_CONF = "/etc/ld.so.conf"
_DEFAULT_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib")


def _conf_dirs(path: str, depth: int = 0) -> list[str]:
    """Return the directories an ld.so.conf file lists, following its includes."""
    dirs: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include") and depth < 4:
            pattern = line[len("include"):].strip()
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for inc in sorted(glob.glob(pattern)):
                dirs += _conf_dirs(inc, depth + 1)
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def library_dirs() -> list[str]:
    """Return where the dynamic loader looks for a library, in its order."""
    env = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    multiarch = getattr(sys.implementation, "_multiarch", "")
    arch = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    seen: list[str] = []
    for d in env + _conf_dirs(_LD_CONF) + arch + list(_DEFAULT_DIRS):
        if d not in seen:
            seen.append(d)
    return seen


def elf_abi(path: str) -> bytes | None:
    """Return an ELF file's class, byte order and machine (None if it is not ELF)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return head[4:6] + head[18:20]


def _so_index(directory: str) -> dict[str, list[str]]:
    """Map each library stem in ``directory`` (``libz``) to its names there (``libz.so``, ``libz.so.1``)."""
    index: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return index
    for entry in names:
        stem, so, version = entry.rpartition(".so")
        # lib<name>.so, or lib<name>.so.<digit>... (the loader's sonames), nothing else
        if so and (not version or (version[0] == "." and version[1:2].isdigit())):
            index.setdefault(stem, []).append(entry)
    return index


def find_library(name: str, dirs: list[str] | None = None, own: bytes | None = None,
                 indexes: dict[str, dict[str, list[str]]] | None = None) -> str | None:
    """Return the path of lib``name``.so (or a versioned one) where the loader would find it.

    Only a library this interpreter can load counts: asyncssh loads what it
    is given without a fallback, so a linker script (``libc.so`` is one) or
    another architecture's library would break its import.  ``dirs`` and
    ``own`` (our ELF ABI) are looked up when not given; ``indexes`` keeps
    each directory's listing between lookups (one import makes three).
    """
    stem = name if name.startswith("lib") else "lib" + name
    own = own or elf_abi("/proc/self/exe") or elf_abi(sys.executable)
    indexes = {} if indexes is None else indexes
    for d in library_dirs() if dirs is None else dirs:
        index = indexes.get(d)
        if index is None:
            index = indexes[d] = _so_index(d)
        names = index.get(stem, ())
        plain = stem + ".so"
        for entry in ([plain] if plain in names else []) + sorted(n for n in names if n != plain):
            path = os.path.join(d, entry)
            if own is not None and elf_abi(path) == own:
                return path
    return None


class _Skip:
    """Refuse, during asyncssh's import only, its optional modules peerkit never uses.

    X.509 certificates: peers are pinned by their raw host key and
    authorized by their raw ed25519 key (``x509_trusted_certs=None`` on
    every connection), so certificate parsing is attack surface we do not
    need.  The module imports ``cryptography.x509`` (20-30 ms of every
    client start) before it needs pyOpenSSL; without pyOpenSSL asyncssh
    already catches the ImportError and offers no X.509 algorithms, and
    with it, that is what skipping the module does too.
    """

    NAMES = frozenset({"asyncssh.crypto.x509"})

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in self.NAMES:
            raise ImportError(f"{name} is not used by peerkit", name=name)
        return None


def options_in_loop(cls: type) -> bool:
    """Make ``cls.construct`` (asyncssh's connection options) build them in the calling thread; return whether it did.

    asyncssh builds every connection's options in the event loop's default
    executor (the server's again at each login, to apply config ``Match``
    blocks), because they may read ~/.ssh/config, key files, known_hosts
    and authorized_keys files.  peerkit passes all of those as objects or
    turns them off: the client ``config=None``, our key, the pinned host
    key, no agent, no X.509; the server (`peerkit serve`) ``config=None``,
    its host key, no authorized_keys file (it checks keys itself), no
    GSSAPI host name to look up.  What is left is a few environment
    lookups and ``stat`` calls, and the hop to a worker thread and back
    (thread start-up, the GIL passed back and forth) costs more than they
    do: 15-18 ms of a `ping --all` to 50 peers that takes 0.28 s, and 6%
    of `peerkit serve`'s CPU per ping before the hop (README, Benchmarks).
    The one other caller, doctor's ``get_server_host_key``, lets asyncssh
    read the default key files: in a one-shot command whose loop has
    nothing else to do.  Anything but the method this was written against
    (an async classmethod ``construct(options=None, **kwargs)`` that
    returns ``cls(options, loop=loop, **kwargs)``) is left alone.
    """
    import asyncio
    import inspect

    # Defined on a base class (shared with the server's options): looked up
    # there, replaced on ``cls`` only.
    original = next((c.__dict__["construct"] for c in cls.__mro__ if "construct" in c.__dict__), None)
    if not (isinstance(original, classmethod) and inspect.iscoroutinefunction(original.__func__)
            and list(inspect.signature(original.__func__).parameters) == ["cls", "options", "kwargs"]):
        return False

    async def construct(cls: type, options: object = None, **kwargs: object) -> object:
        return cls(options, loop=asyncio.get_running_loop(), **kwargs)

    construct.__doc__ = original.__func__.__doc__
    cls.construct = classmethod(construct)  # type: ignore[attr-defined]
    return True


def signed_first(auth: Any) -> bool:
    """Make asyncssh's client public key auth send the signed request at once; return whether it did.

    asyncssh, like OpenSSH's client, first asks whether the server would
    take the key (a request without a signature), and signs only after the
    server's "yes".  RFC 4252 section 7 lets a client send the signature
    straight away, and with one key of our own, already in memory, asking
    first only costs: a round trip, and at OpenSSH's sshd 5-9 ms more, the
    least time it takes over every authentication request (against user
    enumeration by timing).  What the server checks, and what we send, is
    the same signed request as before.
    Anything but the class this was written against
    (``_ClientPublicKeyAuth`` with ``_send_signed_request``) is left alone.
    """
    original = auth._client_auth_handlers.get(b"publickey")
    if original is not getattr(auth, "_ClientPublicKeyAuth", None) or \
            not callable(getattr(original, "_send_signed_request", None)):
        return False

    class _SignedFirst(original):  # type: ignore[misc, valid-type]
        async def _start(self) -> None:
            self._keypair = await self._conn.public_key_auth_requested()
            if self._keypair is None:  # no (more) keys: the next method, as asyncssh does
                self._conn.try_next_auth(next_method=True)
                return
            await self._send_signed_request()

    auth._client_auth_handlers[b"publickey"] = _SignedFirst
    return True


def publickey_first(conn: Any) -> None:
    """Start ``conn``'s authentication (a client connection, not yet begun) with our key.

    asyncssh's first request is the "none" method, to learn which methods
    the server takes: another round trip, and at OpenSSH's sshd another
    5-9 ms (its least time per authentication request).  peerkit offers
    only its key, so it asks with that first; a server that takes no keys
    answers with its methods, and the connection fails as before
    (PermissionDenied).  Left alone unless asyncssh's method list is still
    its initial ``[b"none"]``.
    """
    if getattr(conn, "_auth_methods", None) == [b"none"]:
        conn._auth_methods = [b"publickey"]


def _import() -> None:
    if "asyncssh" in sys.modules:
        return
    import ctypes.util
    import importlib

    # Looked up once for the import's three lookups, not once per lookup.
    dirs, own = library_dirs(), elf_abi("/proc/self/exe") or elf_abi(sys.executable)
    indexes: dict[str, dict[str, list[str]]] = {}
    original = ctypes.util.find_library
    ctypes.util.find_library = lambda name: find_library(name, dirs, own, indexes)
    skip = _Skip()
    sys.meta_path.insert(0, skip)
    try:
        module = importlib.import_module("asyncssh")
    finally:
        ctypes.util.find_library = original
        sys.meta_path.remove(skip)
    options_in_loop(module.SSHClientConnectionOptions)
    options_in_loop(module.SSHServerConnectionOptions)
    signed_first(module.auth)


_import()
import asyncssh  # noqa: E402 - after _import() set it up

__all__ = ["asyncssh", "elf_abi", "find_library", "library_dirs", "publickey_first"]
