"""The real-process world of the hostile and fault suites: throwaway users, one private sshd, peerkit instances.

Built on tests/support/sshd.py (ThrowawayUser, Sshd, PeerkitInstance) and
shared by tests/hostile and tests/faults: it is made once per session, on
first use, and torn down by ``pytest_sessionfinish`` (both conftests call
:func:`shutdown`).  Everything runs as the instances' owners through the
real CLI, a real sshd and real forced commands.

Instances (peer names in brackets):

* ``cmd-src`` [pkh-cmd-src] serves ``cmd-caller`` [pkh-cmd-caller] through
  the real peer-shell; the caller may see only the app ``shared``.
* ``src`` [pkh-src] is the source of every pull.  Its key line for each
  puller runs the stand-in (tests/hostile/standin.py): crafted, cut, paced
  or killed streams when a test leaves a plan, the real peer-shell otherwise.
* ``dst`` [pkh-dst], ``disk`` [pkh-disk] (apps_dir on an 8 MiB tmpfs) and
  ``px`` [pkh-px] (reaches src through a fault-injecting proxy) pull from
  ``src``.  Their stop/start/post_restore hooks log every run with the
  version of the app they ran on, and obey per-app control scripts.

Without root or OpenSSH the tests that need this skip, or fail under CI=true.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import sshd as harness
from tests.trees import snapshot
from tests.support import ci

ROLES = ("cmd-src", "cmd-caller", "src", "dst", "disk", "px")
PEER = {role: f"pkh-{role}" for role in ROLES}
STAGING_PREFIX = ".peerkit-staging-"
ASIDE_PREFIX = ".peerkit-aside-"
MTIME = 1_650_000_000
HOOK_TIMEOUT = 3
DISK_SIZE = "8m"
EXIT = {"ok": 0, "error": 1, "peer-unreachable": 40, "host-key-mismatch": 41, "refused": 42, "bad-response": 43, "no-such-app": 50,
        "transfer-incomplete": 52, "unsafe-archive": 53, "backup-failed": 54, "hook-failed": 55, "busy": 56,
        "no-space": 58, "interrupted": 130}
PULL_TIMEOUT = 120

_HOOK = r'''#!/bin/sh
# Test hook: logs "<hook> <app> <version of the app it runs on> begin|ok", and
# sources the control script <ctl>/<app>.<hook> when a test left one (it may
# sleep, touch a marker, or exit non-zero; $ver says which version it runs on).
ver=$(cat "$PEERKIT_APP_DIR/VERSION" 2>/dev/null || echo none)
echo "$1 $PEERKIT_APP $ver begin" >> @LOG@
ctl=@CTL@/$PEERKIT_APP.$1
[ -f "$ctl" ] && . "$ctl"
echo "$1 $PEERKIT_APP $ver ok" >> @LOG@
exit 0
'''


class Unavailable(Exception):
    """This machine cannot run the real-process tests (not root, no sshd, ...)."""


def unavailable(reason: str) -> None:
    ci.unavailable("the hostile/fault suite (root and OpenSSH)", reason)


# -- running the CLI ---------------------------------------------------------------

@dataclass
class Run:
    """One finished CLI call: exit status, every stdout JSON line, stderr, wall time."""

    returncode: int
    lines: list[dict]
    stdout: str
    stderr: str
    seconds: float = 0.0

    @property
    def result(self) -> dict:
        assert self.lines, f"no JSON on stdout (exit {self.returncode}); stderr: {self.stderr[-2000:]}"
        return self.lines[-1]

    @property
    def code(self) -> str:
        """The machine error code ("ok" for success)."""
        return "ok" if self.returncode == 0 and self.result.get("ok") else self.result.get("error", "?")

    @property
    def stages(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.result.get("stages", [])}

    def outcomes(self) -> list[tuple[str, str]]:
        return [(s["name"], s["outcome"]) for s in self.result.get("stages", [])]

    def why(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"


def parse_lines(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
    return out


def cli(inst: harness.PeerkitInstance, *args: str, timeout: float = PULL_TIMEOUT) -> Run:
    """Run ``peerkit ARGS --json`` as the instance's owner and wait for it."""
    started = time.monotonic()
    proc = inst.user.run([str(inst.peerkit), *args, "--json"], env=inst.user.env(extra_path=[inst.bin_dir]),
                         text=True, timeout=timeout)
    return Run(proc.returncode, parse_lines(proc.stdout), proc.stdout, proc.stderr, time.monotonic() - started)


class Background:
    """A CLI call left running; stdout lines arrive on a queue as they are printed."""

    def __init__(self, argv: list[str], *, user: harness.ThrowawayUser | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.started = time.monotonic()
        kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        if user is not None:
            self.proc = user.popen(argv, env=env, **kw)
        else:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **kw)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, daemon=True),
                         threading.Thread(target=self._drain, daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self.err.append(self.proc.stderr.read())

    def wait_for(self, predicate, timeout: float = 30) -> dict | None:
        """Return the first stdout JSON object for which ``predicate`` holds (None if stdout ends first)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line within {timeout}s; so far: {self.out[-5:]}")
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.queue.put(None)
                return None
            self.out.append(line)
            obj = parse_lines(line)
            if obj and predicate(obj[0]):
                return obj[0]

    def finish(self, timeout: float = PULL_TIMEOUT) -> Run:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=10)
        while True:
            try:
                line = self.queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.out.append(line)
        stdout = "".join(self.out)
        return Run(rc, parse_lines(stdout), stdout, "".join(self.err), time.monotonic() - self.started)


# -- trees -----------------------------------------------------------------------------

def as_owner(path: Path, user: harness.ThrowawayUser) -> None:
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(top, name), user.uid, user.gid, follow_symlinks=False)


def make_tree(path: Path, spec: dict[str, Any], user: harness.ThrowawayUser, mtime: int = MTIME) -> None:
    """Create ``path`` from {relpath: bytes | (bytes, mode) | None (dir) | ("link", target)}, owned by ``user``."""
    if os.path.lexists(path):
        shutil.rmtree(path)
    path.mkdir(parents=True)
    for rel, what in spec.items():
        full = path / rel
        full.parent.mkdir(parents=True, exist_ok=True)
        if what is None:
            full.mkdir(exist_ok=True)
        elif isinstance(what, tuple) and what[0] == "link":
            os.symlink(what[1], full)
        else:
            data, mode = what if isinstance(what, tuple) else (what, 0o644)
            full.write_bytes(data)
            os.chmod(full, mode)
    as_owner(path, user)
    for top, dirs, files in os.walk(path, topdown=False):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (mtime, mtime), follow_symlinks=False)
    os.utime(path, (mtime, mtime))
    os.chmod(path, 0o755)


def app_spec(version: str, size: int = 64 << 10, seed: int = 0, files: int = 6) -> dict[str, Any]:
    """A small app whose VERSION file says which version it is."""
    import random
    rng = random.Random(f"{version}-{seed}")
    spec: dict[str, Any] = {"VERSION": version.encode(), "conf": None,
                            "conf/app.ini": (f"name={version}\n".encode(), 0o600), "data": None,
                            "data/blob.bin": rng.randbytes(size), "current": ("link", "data/blob.bin")}
    for i in range(files):
        spec[f"data/f{i}.txt"] = f"{version} {i}\n".encode() * (i + 1)
    return spec


def as_pulled_by(snap: dict, user: harness.ThrowawayUser) -> dict:
    """A source snapshot with owners as a non-root puller gets them: all its own."""
    return {rel: {**rec, "uid": user.uid, "gid": user.gid} for rel, rec in snap.items()}


def leftovers(apps_dir: Path) -> list[str]:
    """Staging and aside directories in an apps_dir."""
    try:
        names = os.listdir(apps_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith((STAGING_PREFIX, ASIDE_PREFIX)))


def resolve(inst: harness.PeerkitInstance, value: str) -> Path:
    if value == "~" or value.startswith("~/"):
        return inst.user.home / value[2:]
    path = Path(value)
    return path if path.is_absolute() else inst.user.home / path


def write_config(inst: harness.PeerkitInstance, data: dict) -> None:
    text = "# peerkit hostile/fault suite configuration\n" + yaml.safe_dump(data, sort_keys=False)
    inst.user.write_file(inst.config_path, text.encode("utf-8"), mode=0o600)
    inst.settings = copy.deepcopy(data)


# -- the source and its pullers ---------------------------------------------------------

class Source:
    """``src``: serves pulls; its key line for each puller runs the stand-in."""

    def __init__(self, inst: harness.PeerkitInstance) -> None:
        self.inst = inst
        self.dir = inst.user.home / "standin"
        for sub in ("", "plans", "payloads", "holds", "marks"):
            inst.user.run(["mkdir", "-p", "-m", "755", str(self.dir / sub)], check=True)
        program = (Path(__file__).with_name("standin.py").read_text()
                   .replace("@DIR@", str(self.dir)).replace("@PEER_SHELL@", str(inst.peer_shell)))
        self.program = self.dir / "peer-shell-standin"
        inst.user.write_file(self.program, f"#!{sys.executable} -I\n{program}".encode(), mode=0o755)

    def use_standin_for(self, puller: harness.PeerkitInstance) -> None:
        """Point the forced command of ``puller``'s key line at the stand-in, keeping every option."""
        src = self.inst
        lines = src.authorized_keys.read_text().splitlines()
        marker = f" peerkit:{puller.name}"
        [i] = [n for n, line in enumerate(lines) if line.endswith(marker)]
        prefix = f'command="{src.peer_shell} '
        assert lines[i].startswith("restrict,") and prefix in lines[i], lines[i]
        lines[i] = lines[i].replace(prefix, f'command="{self.program} ', 1)
        src.user.write_file(src.authorized_keys, ("\n".join(lines) + "\n").encode(), mode=0o600)

    def app(self, slug: str, spec: dict[str, Any]) -> dict:
        """Create the app on the source; return its snapshot."""
        path = self.inst.apps_dir / slug
        make_tree(path, spec, self.inst.user)
        return snapshot(path)

    def archive(self, slug: str) -> bytes:
        """What the real peer-shell streams for ``slug`` (tar run as the source's owner)."""
        from peerkit.apps import tar_command

        return self.inst.user.run(tar_command(self.inst.apps_dir / slug), check=True).stdout

    def plan(self, slug: str, payload: bytes, **plan: Any) -> dict:
        """Serve ``stream-app <slug>`` from ``payload`` as planned (see standin.py)."""
        path = self.dir / "payloads" / f"{slug}.tar"
        path.write_bytes(payload)
        os.chmod(path, 0o644)
        full = {"payload": str(path), **plan}
        target = self.dir / "plans" / f"{slug}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(full))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        return full

    def clear_plan(self, slug: str) -> None:
        for path in (self.dir / "plans" / f"{slug}.json", self.dir / "payloads" / f"{slug}.tar"):
            if path.exists():
                path.unlink()

    def mark(self, name: str) -> Path:
        path = self.dir / "marks" / name
        if path.exists():
            path.unlink()
        return path

    def hold(self, puller: "Puller", verb: str, seconds: float) -> Path:
        """Hold ``verb`` (ping, list-apps, app-info, with-app-info) for ``seconds`` when ``puller`` calls; return the started marker."""
        path = self.dir / "holds" / f"{puller.inst.name}.{verb}"
        started = path.with_name(path.name + ".started")
        if started.exists():
            started.unlink()
        path.write_text(str(seconds))
        os.chmod(path, 0o644)
        return started

    def release(self, puller: "Puller", verb: str) -> None:
        for name in (f"{puller.inst.name}.{verb}", f"{puller.inst.name}.{verb}.started"):
            path = self.dir / "holds" / name
            if path.exists():
                path.unlink()


class Puller:
    """An instance that pulls from ``src``, with logging hooks."""

    def __init__(self, inst: harness.PeerkitInstance, source: Source) -> None:
        self.inst = inst
        self.source = source
        home = inst.user.home
        self.hook_log = home / "hooks.log"
        self.hook = home / "hook.sh"
        self.ctl = home / "hookctl"
        inst.user.run(["mkdir", "-p", "-m", "755", str(self.ctl)], check=True)
        inst.user.write_file(self.hook, _HOOK.replace("@LOG@", str(self.hook_log))
                             .replace("@CTL@", str(self.ctl)).encode(), mode=0o755)
        self.baseline = copy.deepcopy(inst.settings)
        self.baseline["hooks"].update(stop=[[str(self.hook), "stop"]], start=[[str(self.hook), "start"]],
                                      post_restore=[[str(self.hook), "post_restore"]], timeout=HOOK_TIMEOUT)
        self.configure()

    @property
    def apps_dir(self) -> Path:
        return resolve(self.inst, self.inst.settings["apps_dir"])

    @property
    def backups_dir(self) -> Path:
        return resolve(self.inst, self.inst.settings["backups_dir"])

    def configure(self, **sections: Any) -> None:
        """Write the baseline config with ``sections`` merged in (one level deep)."""
        data = copy.deepcopy(self.baseline)
        for key, value in sections.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        write_config(self.inst, data)

    def local_app(self, slug: str, spec: dict[str, Any]) -> dict:
        path = self.apps_dir / slug
        make_tree(path, spec, self.inst.user, mtime=MTIME + 1000)
        return snapshot(path)

    def live(self, slug: str) -> dict | None:
        path = self.apps_dir / slug
        return snapshot(path) if os.path.lexists(path) else None

    def leftovers(self, slug: str | None = None) -> list[str]:
        names = leftovers(self.apps_dir)
        return [n for n in names if slug is None or n.startswith((f"{STAGING_PREFIX}{slug}-", f"{ASIDE_PREFIX}{slug}-"))]

    def set_hook(self, app: str, hook: str, script: str) -> None:
        path = self.ctl / f"{app}.{hook}"
        path.write_text(script)
        os.chmod(path, 0o644)

    def clear_hooks(self, app: str) -> None:
        for hook in ("stop", "start", "post_restore"):
            path = self.ctl / f"{app}.{hook}"
            if path.exists():
                path.unlink()

    def hook_lines(self, app: str) -> list[tuple[str, str, str]]:
        """(hook, version, begin|ok) for every hook run on ``app``."""
        try:
            lines = self.hook_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            hook, name, version, what = line.split(" ")
            if name == app:
                out.append((hook, version, what))
        return out

    def argv(self, slug: str, *flags: str) -> list[str]:
        return [str(self.inst.peerkit), "pull", self.source.inst.name, slug, *flags, "--json"]

    def pull(self, slug: str, *flags: str, timeout: float = PULL_TIMEOUT) -> Run:
        return cli(self.inst, "pull", self.source.inst.name, slug, *flags, timeout=timeout)

    def start_pull(self, slug: str, *flags: str) -> Background:
        return Background(self.argv(slug, *flags), user=self.inst.user,
                          env=self.inst.user.env(extra_path=[self.inst.bin_dir]))


# -- the world ---------------------------------------------------------------------------

class World:
    _current: "World | None" = None
    _failure: str | None = None

    @classmethod
    def get(cls) -> "World":
        if cls._failure is not None:
            raise Unavailable(cls._failure)
        if cls._current is None:
            problems = harness.missing_prerequisites()
            if problems:
                cls._failure = "; ".join(problems)
                raise Unavailable(cls._failure)
            cls._current = World()
        return cls._current

    def __init__(self) -> None:
        self.root = harness.make_root("peerkit-hostile-")
        self.users: dict[str, harness.ThrowawayUser] = {}
        self.mounts: list[Path] = []
        self.instances: dict[str, harness.PeerkitInstance] = {}
        self._source: Source | None = None
        self._pullers: dict[str, Puller] = {}
        self._cmd: tuple[harness.PeerkitInstance, harness.PeerkitInstance] | None = None
        try:
            for role in ROLES:
                self.users[role] = harness.ThrowawayUser.create(self.root, prefix="pkh")
            problem = harness.check_runs_as(self.users["src"], harness.venv_bin() / "peer-shell")
            if problem:
                raise harness.HarnessError(problem)
            self.sshd = harness.Sshd(self.root / "sshd", [u.name for u in self.users.values()])
            self.sshd.start()
        except BaseException:
            self.shutdown()
            raise

    def instance(self, role: str) -> harness.PeerkitInstance:
        if role not in self.instances:
            self.instances[role] = harness.PeerkitInstance(self.users[role], PEER[role], self.sshd,
                                                           harness.venv_bin()).init()
        return self.instances[role]

    # -- command pair -------------------------------------------------------------------

    def command_pair(self) -> tuple[harness.PeerkitInstance, harness.PeerkitInstance]:
        """(server, caller): the caller is paired on the server, which offers it only ``shared``."""
        if self._cmd is None:
            server, caller = self.instance("cmd-src"), self.instance("cmd-caller")
            server.pair(caller.token())
            for args in (("deny", caller.name, "--all-apps"), ("allow", caller.name, "--app", "shared")):
                run = cli(server, *args)
                assert run.returncode == 0, run.why()
            make_tree(server.apps_dir / "shared", {"index.html": b"<h1>shared</h1>\n"}, server.user)
            make_tree(server.apps_dir / "secret", {"key.pem": b"not a key\n"}, server.user)
            self._cmd = (server, caller)
        return self._cmd

    # -- source and pullers ----------------------------------------------------------------

    def source(self) -> Source:
        if self._source is None:
            inst = self.instance("src")
            data = copy.deepcopy(inst.settings)
            data["domain"] = "old.example.org"
            write_config(inst, data)
            self._source = Source(inst)
        return self._source

    def puller(self, role: str) -> Puller:
        """``dst``, ``disk`` or ``px``, paired both ways with ``src`` and served by its stand-in."""
        if role not in self._pullers:
            source = self.source()
            inst = self.instance(role)
            if role == "disk":
                self._mount_disk(inst)
            source.inst.pair(inst.token())
            inst.pair(source.inst.token())
            source.use_standin_for(inst)
            self._pullers[role] = Puller(inst, source)
        return self._pullers[role]

    def _mount_disk(self, inst: harness.PeerkitInstance) -> None:
        mount = self.root / "diskfs"
        mount.mkdir(mode=0o755, exist_ok=True)
        harness.run_root(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0755", "tmpfs", str(mount)])
        self.mounts.append(mount)
        apps = mount / "apps"
        apps.mkdir(mode=0o700)
        os.chown(apps, inst.user.uid, inst.user.gid)
        data = copy.deepcopy(inst.settings)
        data["apps_dir"] = str(apps)
        write_config(inst, data)

    # -- teardown -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        errors = []
        sshd = getattr(self, "sshd", None)
        if sshd is not None:
            sshd.stop()
        for mount in reversed(self.mounts):
            proc = harness.run_root(["umount", "-l", str(mount)], check=False)
            if proc.returncode != 0:
                errors.append(proc.stderr)
        for user in self.users.values():
            try:
                user.delete()
            except harness.HarnessError as exc:
                errors.append(str(exc))
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise harness.HarnessError("; ".join(errors))


def get_world() -> World:
    return World.get()


def shutdown() -> None:
    world, World._current = World._current, None
    if world is not None:
        world.shutdown()
