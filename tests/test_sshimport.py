"""asyncssh is imported without starting ldconfig, gcc or ld, and loses nothing it would have found."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peerkit import sshimport

# Counts the subprocesses an import starts, in a fresh interpreter.
PROBE = """
import json, sys
started = []
sys.addaudithook(lambda event, args: event == "subprocess.Popen" and started.append(list(args[1])))
import ctypes.util
original = ctypes.util.find_library
import {module}
import asyncssh.crypto.umac as umac
by_import = list(started)  # the lookup below starts ldconfig itself
import asyncssh
print(json.dumps({{"started": by_import, "restored": ctypes.util.find_library is original,
                  "nettle": umac._nettle_lib is not None, "nettle_by_ctypes": original("nettle") is not None,
                  "x509": "cryptography.x509" in sys.modules,
                  "x509_algs": [a.decode() for a in asyncssh.public_key.get_x509_certificate_algs()],
                  "finders": [type(f).__name__ for f in sys.meta_path],
                  "ed25519": b"ssh-ed25519" in asyncssh.public_key.get_public_key_algs()}}))
"""


def probe(module: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out.splitlines()[-1])


def test_importing_the_client_starts_no_subprocess_and_keeps_what_asyncssh_finds():
    result = probe("peerkit.client")
    assert result["started"] == []
    assert result["restored"]
    # UMAC stays available wherever ctypes itself finds nettle.
    assert result["nettle"] == result["nettle_by_ctypes"]


def test_asyncssh_alone_does_start_library_lookups():
    # The control: what the module exists to avoid still happens without it.
    started = probe("asyncssh")["started"]
    assert started and any(cmd[0].endswith("ldconfig") for cmd in started)


def test_x509_certificate_support_is_left_out():
    # Peers are pinned by raw keys: no certificate parser to attack, no
    # cryptography.x509 import on every client start.
    ours, plain = probe("peerkit.client"), probe("asyncssh")
    assert not ours["x509"] and ours["x509_algs"] == []
    assert ours["ed25519"]
    assert "_Skip" not in ours["finders"]  # only during the import
    # The control: asyncssh alone imports cryptography.x509 (and offers
    # X.509 algorithms only where pyOpenSSL is installed too).
    assert plain["x509"]


def test_each_directory_is_listed_once_for_all_lookups(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("libpka.so.1", "libpkb.so", "libpkb.so.2", "libpkb.socket", "libpkb.so.x", "libpkc.so.1.so"):
        (lib / name).write_bytes(own_elf_header())
    listed = []
    monkeypatch.setattr(sshimport.os, "listdir", lambda d, real=sshimport.os.listdir: listed.append(d) or real(d))
    indexes: dict = {}
    dirs = [str(lib), str(tmp_path / "missing")]
    assert sshimport.find_library("pka", dirs, indexes=indexes) == str(lib / "libpka.so.1")
    assert sshimport.find_library("pkb", dirs, indexes=indexes) == str(lib / "libpkb.so")  # the plain name first
    assert sshimport.find_library("pkc.so.1", dirs, indexes=indexes) == str(lib / "libpkc.so.1.so")
    assert sshimport.find_library("pkabsent", dirs, indexes=indexes) is None
    assert listed == [str(lib), str(tmp_path / "missing")]
    assert sorted(indexes[str(lib)]["libpkb"]) == ["libpkb.so", "libpkb.so.2"]  # not .socket, not .so.x


def own_elf_header() -> bytes:
    with open("/proc/self/exe", "rb") as fh:
        return fh.read(64)


def test_a_library_in_ld_library_path_is_found(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libpkfake.so.3").write_bytes(own_elf_header())
    (lib / "libpkfake.so-gdb.py").write_bytes(own_elf_header())  # not a library name
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{lib}")
    assert sshimport.find_library("pkfake") == str(lib / "libpkfake.so.3")
    assert sshimport.find_library("libpkfake") == str(lib / "libpkfake.so.3")
    (lib / "libpkfake.so").symlink_to("libpkfake.so.3")
    assert sshimport.find_library("pkfake") == str(lib / "libpkfake.so")
    assert sshimport.find_library("pkabsent") is None


def test_only_a_library_this_interpreter_can_load_is_returned(tmp_path, monkeypatch):
    # asyncssh loads what it is given without a fallback: a linker script or
    # another architecture's library would break its import.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libpkscript.so").write_bytes(b"/* GNU ld script */\nGROUP ( libpkscript.so.1 )\n")
    header = bytearray(own_elf_header())
    header[18] ^= 0xFF  # another machine
    (lib / "libpkother.so.1").write_bytes(bytes(header))
    monkeypatch.setenv("LD_LIBRARY_PATH", str(lib))
    assert sshimport.find_library("pkscript") is None
    assert sshimport.find_library("pkother") is None
    (lib / "libpkscript.so.1").write_bytes(own_elf_header())
    assert sshimport.find_library("pkscript") == str(lib / "libpkscript.so.1")
    assert sshimport.elf_abi(str(lib / "libpkscript.so.1")) == sshimport.elf_abi(sys.executable)


def test_ld_so_conf_directories_and_includes_are_searched(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "libpkconf.so.1").write_bytes(own_elf_header())
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "x.conf").write_text(f"# comment\n{tmp_path / 'b'}  # trailing\n")
    conf = tmp_path / "ld.so.conf"
    conf.write_text(f"{tmp_path / 'a'}\ninclude conf.d/*.conf\nnot-absolute\n")
    monkeypatch.setattr(sshimport, "_LD_CONF", str(conf))
    dirs = sshimport.library_dirs()
    assert dirs.index(str(tmp_path / "a")) < dirs.index(str(tmp_path / "b"))
    assert "not-absolute" not in dirs and "/usr/lib" in dirs
    assert sshimport.find_library("pkconf") == str(tmp_path / "b" / "libpkconf.so.1")


def test_an_include_loop_ends(tmp_path, monkeypatch):
    conf = tmp_path / "ld.so.conf"
    conf.write_text(f"include {conf}\n{tmp_path}\n")
    monkeypatch.setattr(sshimport, "_LD_CONF", str(conf))
    assert sshimport.library_dirs().count(str(tmp_path)) == 1


@pytest.mark.parametrize("module", ["peerkit.server", "peerkit.rsync", "peerkit.push"])
def test_every_module_that_uses_asyncssh_imports_it_through_sshimport(module):
    assert probe(module)["started"] == []


# -- connection options built in the event loop ------------------------------------------

def test_client_connection_options_are_built_without_a_worker_thread():
    import asyncio
    import threading

    asyncssh = sshimport.asyncssh

    async def build() -> tuple[object, set, set]:
        before = set(threading.enumerate())
        options = await asyncssh.SSHClientConnectionOptions.construct(
            None, host="peer.example", port=2222, username="peerkit", config=None, known_hosts=None,
            client_keys=None, agent_path=None, x509_trusted_certs=None)
        return options, before, set(threading.enumerate())

    options, before, after = asyncio.run(build())
    assert after - before == set()  # asyncssh's own construct starts the loop's thread pool here
    assert (options.host, options.port, options.username) == ("peer.example", 2222, "peerkit")
    assert options.known_hosts is None and options.client_keys is None
    # Replaced where the client and server classes each look it up, not on their shared base.
    shared = asyncssh.connection.SSHConnectionOptions.__dict__["construct"]
    assert asyncssh.SSHClientConnectionOptions.construct.__func__ is not shared.__func__


def test_server_connection_options_are_built_without_a_worker_thread_or_a_dns_lookup(monkeypatch):
    """As `peerkit serve` asks for them: at listen(), and again at every login (reload=True)."""
    import asyncio
    import socket
    import threading

    asyncssh = sshimport.asyncssh

    def no_dns(*args: object) -> str:
        raise AssertionError("looked up a host name")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    host_key = asyncssh.generate_private_key("ssh-ed25519")

    async def build() -> tuple[object, object, set, set]:
        before = set(threading.enumerate())
        options = await asyncssh.SSHServerConnectionOptions.construct(
            None, server_host_keys=[host_key], config=None, gss_host=None, gss_kex=False, gss_auth=False,
            allow_pty=False)
        again = await asyncssh.SSHServerConnectionOptions.construct(
            options=options, reload=True, accept_addr="127.0.0.1", accept_port=2222, username="peer",
            client_host="127.0.0.1", client_addr="127.0.0.1")
        return options, again, before, set(threading.enumerate())

    options, again, before, after = asyncio.run(build())
    assert after - before == set()
    for built in (options, again):
        assert built.gss_host is None and not built.authorized_client_keys
        assert list(built.server_host_keys.values())[0].public_data == host_key.public_data
    shared = asyncssh.connection.SSHConnectionOptions.__dict__["construct"]
    assert asyncssh.SSHServerConnectionOptions.construct.__func__ is not shared.__func__


class _Options:
    def __init__(self, options: object = None, *, loop: object = None, **kwargs: object) -> None:
        self.loop, self.kwargs = loop, kwargs


class _Expected(_Options):
    @classmethod
    async def construct(cls, options: object = None, **kwargs: object) -> object:
        raise AssertionError("the original ran")


def test_options_in_loop_replaces_construct_on_the_class_given_only():
    import asyncio

    class Client(_Expected):
        pass

    assert sshimport.options_in_loop(Client) is True

    async def build() -> tuple[object, object]:
        return await Client.construct(None, host="h"), asyncio.get_running_loop()

    options, loop = asyncio.run(build())
    assert isinstance(options, Client) and options.kwargs == {"host": "h"} and options.loop is loop
    assert "construct" not in _Options.__dict__
    with pytest.raises(AssertionError, match="the original ran"):  # the base class keeps its own
        asyncio.run(_Expected.construct(None))


def test_options_in_loop_leaves_any_other_construct_alone():
    class Synchronous(_Options):
        @classmethod
        def construct(cls, options: object = None, **kwargs: object) -> object:
            return cls(options, **kwargs)

    class OtherSignature(_Options):
        @classmethod
        async def construct(cls, options: object = None, *, loop: object = None, **kwargs: object) -> object:
            return cls(options, loop=loop, **kwargs)

    class Static(_Options):
        @staticmethod
        async def construct(options: object = None, **kwargs: object) -> object:
            return None

    for cls in (Synchronous, OtherSignature, Static, _Options):
        before = cls.__dict__.get("construct")
        assert sshimport.options_in_loop(cls) is False
        assert cls.__dict__.get("construct") is before


def test_public_key_auth_sends_the_signed_request_first():
    from asyncssh import auth

    handler = auth._client_auth_handlers[b"publickey"]
    assert handler is not auth._ClientPublicKeyAuth and issubclass(handler, auth._ClientPublicKeyAuth)
    assert auth._client_auth_handlers[b"none"] is auth._ClientNullAuth  # everything else is asyncssh's own


def test_signed_first_leaves_any_other_handler_alone():
    import types

    class Theirs:
        async def _start(self) -> None:
            pass

    class Expected:
        def _send_signed_request(self) -> None:
            pass

    for handler, expected in ((Theirs, Expected), (Expected, Theirs), (Theirs, Theirs)):
        module = types.SimpleNamespace(_client_auth_handlers={b"publickey": handler}, _ClientPublicKeyAuth=expected)
        assert sshimport.signed_first(module) is False
        assert module._client_auth_handlers == {b"publickey": handler}
    module = types.SimpleNamespace(_client_auth_handlers={b"publickey": Expected}, _ClientPublicKeyAuth=Expected)
    assert sshimport.signed_first(module) is True
    assert issubclass(module._client_auth_handlers[b"publickey"], Expected)


def test_publickey_first_changes_only_asyncssh_s_initial_method_list():
    import types

    conn = types.SimpleNamespace(_auth_methods=[b"none"])
    sshimport.publickey_first(conn)
    assert conn._auth_methods == [b"publickey"]
    for methods in ([b"publickey", b"password"], [], [b"none", b"publickey"]):
        conn = types.SimpleNamespace(_auth_methods=list(methods))
        sshimport.publickey_first(conn)
        assert conn._auth_methods == methods
    bare = types.SimpleNamespace()
    sshimport.publickey_first(bare)
    assert not hasattr(bare, "_auth_methods")
