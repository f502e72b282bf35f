"""Push an app to a paired peer: the mirror of pull, decided by the receiver.

We stream the app (tar, optionally zstd, or rsync with ``--incremental``) to
the peer's ``receive-app``; the peer runs its own receiving pipeline and
rules (push permission, pre-backup, staging, checks, swap, hooks, rollback)
and answers with a short result.  Our own app is only read.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

from .sshimport import asyncssh

from . import grammar
from .apps import ZSTD_SEND, archive_size, tar_command
from .client import PeerConnection, StreamResult, last_json, open_peer, raise_remote, remote_error, shown
from .compress import choose, zstd_binary
from .config import Config
from .errors import (BadSlug, NoSuchApp, PeerkitError, PeerRefused, PeerUnreachable,
                     ProtocolError, TransferIncomplete)
from .install import NoteFn, ProgressFn, Report, run_transfer
from .state import PeerStore

_CHUNK = 1 << 20
# Held back until our tar (and zstd) succeeded: covers tar's last 10 KiB record.
_TAIL = 20 << 10
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


def _receive_command(app: str, *, compressed: bool, keep_urls: bool, skip_backup: bool,
                     domain: str | None) -> str:
    words = ["receive-app", app]
    if compressed:
        words.append("--zstd")
    if keep_urls:
        words.append("--keep-urls")
    if skip_backup:
        words.append("--no-pre-backup")
    if domain:
        words += ["--domain", domain]
    return " ".join(words)


async def _send_tar(conn: PeerConnection, cfg: Config, app: str, command: str, compressed: bool,
                    report: Report, progress: ProgressFn | None) -> dict[str, Any]:
    """Pipe our tar (| zstd) into the peer's receive-app; return its answer."""
    live = cfg.apps_dir / app
    total = archive_size(live)
    # Plain pipes between tar and zstd (no event-loop buffering in between);
    # we read the last one's output in a worker thread.
    procs = [subprocess.Popen(tar_command(live), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=_ENV, close_fds=True)]
    if compressed:
        procs.append(subprocess.Popen([zstd_binary() or "zstd", *ZSTD_SEND[1:]],
                                      stdin=procs[0].stdout, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, env=_ENV, close_fds=True))
        procs[0].stdout.close()
    source = procs[-1].stdout
    assert source is not None
    loop = asyncio.get_running_loop()

    async def read_chunk() -> bytes:
        return await loop.run_in_executor(None, os.read, source.fileno(), _CHUNK)

    proc = await conn.conn.create_process(command, encoding=None, stdin=asyncssh.PIPE,
                                          stdout=asyncssh.PIPE, stderr=asyncssh.PIPE)
    out = bytearray()
    err = bytearray()

    async def drain(stream: Any, buf: bytearray) -> None:
        # Both are read all along: stdout and stderr share the flow-control window.
        while data := await stream.read(1 << 16):
            if len(buf) < 1 << 20:
                buf.extend(data)

    readers = [asyncio.ensure_future(drain(proc.stdout, out)), asyncio.ensure_future(drain(proc.stderr, err))]
    sent = 0

    async def send(data: bytes) -> None:
        nonlocal sent
        proc.stdin.write(data)
        await proc.stdin.drain()
        sent += len(data)
        if progress is not None:
            progress("transfer", sent, None if compressed else total)

    async def feed_remote() -> None:
        # The last _TAIL bytes (tar's end-of-archive record, or the end of the
        # zstd frame) go out only once tar and zstd exited 0: a tar that could
        # not read a file still writes a well-formed archive, which the peer
        # must not install.  Without that end, it discards the stream.
        held = b""
        while data := await read_chunk():
            held += data
            if len(held) > _TAIL:
                await send(held[:-_TAIL])
                held = held[-_TAIL:]
        statuses = await loop.run_in_executor(None, lambda: [p.wait() for p in procs])
        if any(statuses):
            raise PeerkitError(f"reading our app failed (tar/zstd exited {statuses})")
        await send(held)
        proc.stdin.write_eof()

    writer = asyncio.ensure_future(feed_remote())
    finished = asyncio.ensure_future(proc.wait())
    try:
        with report.stage("transfer"):
            # The receiver may stop early (refusal, unsafe archive, full
            # disk): its exit ends the transfer, whatever we still had.
            await asyncio.wait({writer, finished}, return_when=asyncio.FIRST_COMPLETED)
            stopped_early = not writer.done()
            if stopped_early:
                writer.cancel()
                report.notes.append("the peer stopped reading before the end")
            elif writer.exception() is not None and not finished.done():
                failure = writer.exception()
                if isinstance(failure, PeerkitError):
                    raise failure  # our tar failed: the peer got no end of archive
                raise TransferIncomplete(f"sending failed: {failure}")
            result = await finished
            await asyncio.gather(*readers)
            report.bytes = sent
            if stopped_early:
                for p in procs:
                    p.kill()
            source.close()
            statuses = [p.wait() for p in procs]
            if not stopped_early and any(statuses) and result.exit_status == 0:
                raise PeerkitError(f"reading our app failed (tar/zstd exited {statuses})")
    except BaseException:
        for task in (writer, finished, *readers):
            task.cancel()
        for p in procs:
            p.kill()
            p.wait()
        proc.close()
        raise
    status = result.exit_status
    if status != 0:
        raise_remote(conn.peer.name, StreamResult(status, sent, bytes(err), remote_error(bytes(err))))
    answer = last_json(bytes(out))
    if answer is None or answer.get("ok") is not True:
        raise ProtocolError(f"{conn.peer.name}: no result from receive-app")
    return answer


async def _send_rsync(conn: PeerConnection, cfg: Config, app: str, report: Report) -> dict[str, Any]:
    from .rsync import run_push

    with report.stage("transfer"):
        report.bytes, stderr = await run_push(conn, app, cfg.apps_dir / app)
    answer = last_json(stderr)
    return answer if answer and answer.get("ok") is True else {"ok": True}


async def push_app(cfg: Config, peer_name: str, app: str, *, pre_backup: bool = True,
                   keep_urls: bool = False, incremental: bool = False, compress: str = "auto",
                   progress: ProgressFn | None = None, note: NoteFn | None = None) -> Report:
    """Push ``app`` to ``peer_name``; raise a PeerkitError with ``.report`` on failure."""
    report = Report(peer_name, app)

    async def work() -> None:
        answer = await _push(cfg, peer_name, app, pre_backup, keep_urls, incremental, compress, progress,
                             note, report)
        report.files, report.rewritten, peer_note = from_peer(answer)
        report.notes.append(peer_note)

    await run_transfer(cfg, "push", report, work(), "the peer discards a push it did not receive whole")
    return report


def from_peer(answer: dict[str, Any]) -> tuple[int, list[str], str]:
    """Return the files, rewritten paths and a note of the stages from a receiving peer's ``answer``.

    All of it is shown to the user: printable ASCII only, bounded, so the
    peer cannot write escape sequences to our terminal.
    """
    files = answer.get("files")
    count = files if isinstance(files, int) and not isinstance(files, bool) and 0 <= files < 1 << 40 else 0
    paths = answer.get("rewritten")
    rewritten = [shown(r, 4096) for r in (paths if isinstance(paths, list) else [])[:1000] if isinstance(r, str)]
    stages = answer.get("stages")
    note = "peer: " + ", ".join(f"{shown(s.get('name'), 32)} {shown(s.get('outcome'), 32)}"
                                for s in (stages if isinstance(stages, list) else [])[:64] if isinstance(s, dict))
    return count, rewritten, note


async def _push(cfg: Config, peer_name: str, app: str, pre_backup: bool, keep_urls: bool,
                incremental: bool, compress: str, progress: ProgressFn | None, note: NoteFn | None,
                report: Report) -> dict[str, Any]:
    if not grammar.is_slug(app):
        raise BadSlug(repr(app[:80]))
    live = cfg.apps_dir / app
    if not live.is_dir() or live.is_symlink():
        raise NoSuchApp(f"no local app {app} in {cfg.apps_dir}")
    try:
        with PeerStore(cfg.db_path) as store, report.stage("ping"):
            conn = await open_peer(cfg, store, peer_name, note)
        async with conn:
            # Shell peers and older peerkits have no receive-app: say so plainly.
            if "receive-app" not in conn.features:
                raise PeerRefused(f"{peer_name} does not accept pushes (its peer-shell has no receive-app)")
            from .rsync import rsync_binary

            if incremental and rsync_binary() and "rsync" in conn.features:
                if keep_urls is False and cfg.domain:
                    report.notes.append("incremental push: the peer does not rewrite URLs")
                return await _send_rsync(conn, cfg, app, report)
            if incremental:
                text = "rsync is not available on both sides: falling back to a full transfer"
                report.notes.append(text)
                if note is not None:
                    note(f"note: {text}")
            compressed, why = choose(compress, host=conn.peer.config["host"], link_mbps=cfg.link_mbps,
                                     measured_mbps=conn.peer.config.get("link_mbps"),
                                     remote_has_zstd="zstd" in conn.features)
            report.notes.append(f"{'zstd' if compressed else 'no'} compression: {why}")
            command = _receive_command(app, compressed=compressed, keep_urls=keep_urls,
                                       skip_backup=not pre_backup, domain=cfg.domain)
            return await _send_tar(conn, cfg, app, command, compressed, report, progress)
    except PeerUnreachable as exc:
        if any(s.name == "transfer" for s in report.stages):
            raise TransferIncomplete(exc.detail) from None
        raise
