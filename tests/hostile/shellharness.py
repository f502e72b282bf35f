"""Run SSH_ORIGINAL_COMMAND values through peer-shell's real entry point, in-process.

``shell.serve(config, peer, command, env, stdin, stdout, stderr)`` is what
both sshd's forced command (through ``peer-shell``) and the embedded server
run.  Calling it in-process with files for stdout and stderr costs well
under a millisecond per command, which is what makes 100,000 generated
commands per run affordable.  Two test-only shortcuts, both outside the code
under test:

* the instance's config file is parsed once and the parsed object reused
  while the file is unchanged (``read_config`` costs ~0.9 ms, more than
  everything else together);
* ``subprocess.Popen`` is wrapped to record every process peer-shell starts,
  so "nothing ran" is checked, not assumed.

The instance ("alpha") serves the peer "beta", which may see one app,
``shared``; ``secret`` exists but is not offered to it; beta may not push.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from peerkit import audit, config as pk_config, pairing, permissions, shell
from peerkit.command import parse_command
from peerkit.errors import PeerkitError

from tests.hostile import spec

PEER_SHELL = Path(sys.executable).parent / "peer-shell"
SSH_CONNECTION = "192.0.2.7 50123 192.0.2.1 22"
REFUSAL_CODES = {"refused", "bad-slug"}
_PRINTABLE_LINE = re.compile(rb"[ -~]*\n")


def make_instance(root: Path, name: str) -> pk_config.Config:
    overrides = {
        "name": name, "apps_dir": str(root / "apps"), "backups_dir": str(root / "backups"),
        "state_dir": str(root / "state"), "peer_shell": str(PEER_SHELL),
        "ssh": {"user": "peer", "host": f"{name}.example.test", "port": 22, "identity": str(root / "id"),
                "authorized_keys": str(root / "ssh" / "authorized_keys"), "host_keys": []},
    }
    return pairing.init(root / "config.yaml", overrides).config


@dataclass
class Outcome:
    command: str
    status: int
    stdout: bytes
    stderr: bytes
    audit_lines: list[bytes]
    spawned: list[list[str]]

    @property
    def event(self) -> dict:
        return json.loads(self.audit_lines[0])


def tree_signature(root: Path, skip: set[str]) -> dict[str, tuple]:
    """(type, size, mode, uid, mtime_ns, inode) of every path under ``root`` except ``skip``."""
    out: dict[str, tuple] = {}
    stack = [str(root)]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for entry in it:
                if entry.path in skip:
                    continue
                st = entry.stat(follow_symlinks=False)
                out[entry.path] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mode, st.st_uid,
                                   st.st_mtime_ns, st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return out


class ShellHarness:
    """One throwaway server instance and the plumbing to run commands against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cfg = make_instance(root / "alpha", "alpha")
        self.caller = make_instance(root / "beta", "beta")
        pairing.pair(self.cfg, pairing.our_token(self.caller)[0])
        permissions.change(self.cfg, "beta", allow=False, all_apps=True)
        permissions.change(self.cfg, "beta", allow=True, apps=("shared",))
        for app, files in (("shared", {"index.html": b"<h1>shared</h1>\n"}),
                           ("secret", {"key.pem": b"-----BEGIN NOT A KEY-----\n"})):
            (self.cfg.apps_dir / app).mkdir(parents=True)
            for name, data in files.items():
                (self.cfg.apps_dir / app / name).write_bytes(data)
        self.config_path = str(self.cfg.path)
        self.audit_log = self.cfg.audit_log
        self.out_path = root / "stdout"
        self.err_path = root / "stderr"
        self.out_fd = os.open(self.out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.err_fd = os.open(self.err_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.in_fd = os.open(os.devnull, os.O_RDONLY)
        self.spawned: list[list[str]] = []
        self._patches: list[tuple[object, str, object]] = []
        self.env = {"SSH_CONNECTION": SSH_CONNECTION}
        # The audit log exists from the first call on; create it now so the
        # baseline below does not count its creation.
        shell.serve(self.config_path, "beta", "ping", self.env, self.in_fd, self.out_fd, self.err_fd)
        self.skip = {str(self.audit_log), str(self.out_path), str(self.err_path)}
        self.baseline = tree_signature(self.root, self.skip)

    # -- the two test-only shortcuts ---------------------------------------------

    def __enter__(self) -> "ShellHarness":
        real_read = pk_config.read_config
        cache: dict[tuple, pk_config.Config] = {}

        def cached_read(path=None):
            st = os.stat(path)
            key = (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
            if key not in cache:
                cache.clear()
                cache[key] = real_read(path)
            return cache[key]

        harness = self
        real_popen = subprocess.Popen

        class RecordingPopen(real_popen):  # type: ignore[misc, valid-type]
            def __init__(self, args, *a, **kw):
                harness.spawned.append([os.fsdecode(x) for x in ([args] if isinstance(args, (str, bytes)) else args)])
                super().__init__(args, *a, **kw)

        self._patch(pk_config, "read_config", cached_read)
        self._patch(subprocess, "Popen", RecordingPopen)
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, name, old in reversed(self._patches):
            setattr(obj, name, old)
        self._patches.clear()

    def _patch(self, obj: object, name: str, value: object) -> None:
        self._patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def close(self) -> None:
        for fd in (self.out_fd, self.err_fd, self.in_fd):
            os.close(fd)

    # -- running one command ---------------------------------------------------------

    def run(self, command: str | None) -> Outcome:
        for fd in (self.out_fd, self.err_fd):
            if os.lseek(fd, 0, os.SEEK_CUR):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
        offset = os.stat(self.audit_log).st_size
        self.spawned = []
        status = shell.serve(self.config_path, "beta", command, self.env, self.in_fd, self.out_fd, self.err_fd)
        with open(self.audit_log, "rb") as fh:
            fh.seek(offset)
            lines = fh.read().splitlines(keepends=True)
        out_size = os.lseek(self.out_fd, 0, os.SEEK_CUR)
        return Outcome(command, status, os.pread(self.out_fd, out_size, 0) if out_size else b"",
                       os.pread(self.err_fd, 1 << 16, 0), lines, self.spawned)

    def check(self, command: str, outcome: Outcome | None = None, *, tree: bool = True) -> bool:
        """Run ``command`` and assert the invariant; return True if it was refused.

        ``tree=False`` leaves the check that no file changed to a later
        ``check_tree()`` (once per batch: the walk costs more than the command).
        """
        out = outcome or self.run(command)
        form = spec.allowed(command)
        why = f"command {command!r}"
        # Exactly one audit line, one line of printable ASCII JSON, whatever the input.
        assert len(out.audit_lines) == 1, f"{why}: {len(out.audit_lines)} audit lines"
        line = out.audit_lines[0]
        assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii(), f"{why}: audit line {line!r}"
        assert _PRINTABLE_LINE.fullmatch(line), f"{why}: control byte in audit line {line!r}"
        event = json.loads(line)
        assert event["peer"] == "beta" and event["client"] == "192.0.2.7", f"{why}: {event}"
        try:
            request = parse_command(command)
        except PeerkitError:
            request = None
        if form is None:
            # Refused: by the parser, before anything else, with nothing sent and nothing run.
            assert request is None, f"{why}: parser accepted {request} but the specification refuses it"
            assert out.status != 0, f"{why}: exit status 0"
            assert out.stdout == b"", f"{why}: stdout {out.stdout[:200]!r}"
            reply = json.loads(out.stderr)
            assert out.stderr.count(b"\n") == 1 and reply == {"ok": False, "error": reply["error"]}, \
                f"{why}: stderr {out.stderr!r}"
            assert reply["error"] in REFUSAL_CODES, f"{why}: {reply}"
            assert event["outcome"] == reply["error"] and "verb" not in event, f"{why}: {event}"
            # As the log reader will see it (JSON pairs up a generated surrogate pair).
            assert event["command"] == json.loads(json.dumps(audit.clean(command))), f"{why}: {event}"
            assert out.spawned == [], f"{why}: started {out.spawned}"
            if tree:
                self.check_tree(why)
            return True
        # Allowed: the parser accepted it as exactly that command, and only its own work ran.
        assert request is not None, f"{why}: the specification allows it ({form}) but the parser refused it"
        assert request.canonical() == command and request.verb == spec.verb(form), f"{why}: {request}"
        assert event.get("verb") == request.verb and event.get("slug") == spec.slug_of(command), f"{why}: {event}"
        self._check_spawned(command, request, out)
        if request.info:
            # with-app-info: app-info's answer is stderr's first line, whatever follows.
            first = json.loads(out.stderr.split(b"\n", 1)[0])
            expected = {"slug": "shared", "size_kb": 10} if request.slug == "shared" else None
            assert first["ok"] is True and first["app"] == expected, f"{why}: stderr {out.stderr[:300]!r}"
            if expected is None:  # missing or not offered: rsync never started
                assert out.spawned == [] and out.status != 0, f"{why}: {out.spawned} {out.status}"
        if out.status != 0:
            reply = json.loads(out.stderr.splitlines()[-1])
            assert reply.get("ok") is False and event["outcome"] == reply["error"], f"{why}: {out.stderr!r}"
            # Everything else than "shared" looks the same: missing or not offered.
            if request.slug not in (None, "shared") and (request.verb == "stream-app" or request.info):
                assert reply["error"] == "no-such-app", f"{why}: {reply}"
        self.baseline = tree_signature(self.root, self.skip)
        return False

    def check_tree(self, why: str) -> None:
        """Nothing under the instance changed since the last allowed command (audit log aside)."""
        now = tree_signature(self.root, self.skip)
        assert now == self.baseline, f"{why}: files changed: {_changes(self.baseline, now)}"

    def _check_spawned(self, command: str, request, out: Outcome) -> None:
        why = f"command {command!r}"
        allowed_runs: list[list[str]] = []
        shared = str(self.cfg.apps_dir / "shared")
        if request.verb == "stream-app" and request.slug == "shared":
            from peerkit.apps import ZSTD_SEND, tar_command
            allowed_runs.append(tar_command(self.cfg.apps_dir / "shared"))
            if "--zstd" in request.flags:
                allowed_runs.append(ZSTD_SEND)
        for argv in out.spawned:
            if request.verb == "rsync" and request.rsync.sender and request.slug == "shared":
                # Rebuilt by peer-shell: its own rsync, the checked options, "--", our absolute path.
                assert argv[0].endswith("/rsync") and argv[1:3] == ["--server", "--sender"], f"{why}: {argv}"
                assert argv[-3:] == ["--", ".", shared + "/"], f"{why}: {argv}"
                assert argv[3:-3] == [request.rsync.flags, *request.rsync.options], f"{why}: {argv}"
                continue
            assert argv in allowed_runs, f"{why}: started {argv}"


def _changes(before: dict, after: dict) -> list[str]:
    out = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) != after.get(path):
            out.append(f"{path}: {before.get(path)} -> {after.get(path)}")
    return out[:20]
