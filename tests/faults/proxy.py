"""A small fault-injecting TCP proxy on 127.0.0.1 (netem is not available on these kernels).

It forwards every connection to one target and applies one plan, counted
in bytes from the server to the client ("down") or the other way ("up"):

* ``latency``: seconds to wait before forwarding each chunk, both ways;
* ``stall_at`` / ``stall_for``: stop forwarding at that down offset, for that
  long (``None``: for good; the connection stays open, nothing moves);
* ``reset_at`` (with ``reset_dir`` "down" or "up"): forward up to that offset,
  then reset both sides (SO_LINGER 0: a RST, not a FIN);
* ``corrupt_at``: flip one bit of the down byte at that offset.

The proxy runs its own asyncio loop in a thread; ``events`` records what it did.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any


class FaultProxy:
    def __init__(self, target: tuple[str, int], **plan: Any) -> None:
        self.target = target
        self.plan = plan
        self.port = 0
        self.events: list[str] = []
        self.bytes = {"down": 0, "up": 0}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._forever: asyncio.Event | None = None
        self._writers: list[asyncio.StreamWriter] = []

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._forever = asyncio.Event()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        writer.transport.abort()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers += [client_w, server_w]
        self.events.append("connect")
        both = (client_w, server_w)
        await asyncio.gather(self._pipe(client_r, server_w, "up", both), self._pipe(server_r, client_w, "down", both),
                             return_exceptions=True)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str,
                    both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        plan = self.plan
        while True:
            data = await src.read(65536)
            if not data:
                dst.close()
                return
            start = self.bytes[direction]
            end = start + len(data)
            if plan.get("latency"):
                await asyncio.sleep(plan["latency"])
            if direction == plan.get("reset_dir", "down") and plan.get("reset_at") is not None \
                    and end > plan["reset_at"]:
                keep = max(0, plan["reset_at"] - start)
                if keep:
                    dst.write(data[:keep])
                    await dst.drain()
                self.bytes[direction] += keep
                self.events.append(f"reset {direction} at {plan['reset_at']}")
                for writer in both:
                    self._reset(writer)
                return
            if direction == "down" and plan.get("corrupt_at") is not None and start <= plan["corrupt_at"] < end:
                i = plan["corrupt_at"] - start
                data = data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:]
                self.events.append(f"corrupt at {plan['corrupt_at']}")
            if direction == "down" and plan.get("stall_at") is not None and start <= plan["stall_at"] < end:
                i = plan["stall_at"] - start
                dst.write(data[:i])
                self.bytes[direction] += i
                await dst.drain()
                self.events.append(f"stall at {plan['stall_at']}")
                if plan.get("stall_for") is None:
                    assert self._forever is not None
                    await self._forever.wait()  # never set: the link is dead, the sockets stay open
                await asyncio.sleep(plan["stall_for"])
                self.events.append("resume")
                data = data[i:]
                plan = {**plan, "stall_at": None}
                self.plan = plan
            dst.write(data)
            self.bytes[direction] += len(data)
            await dst.drain()
