"""Each Patroni's only road to etcd: a TCP relay on loopback that the drill can cut, the way a network partition
cuts a machine off, while everything else about that machine (its PostgreSQL, its replication, its REST API) keeps
running.

Patroni is told its etcd "hosts" are proxies (`use_proxies: true`), so it never learns the members' own addresses
and cannot go around the cut. A cut is a black hole, not a refusal: connections open at the cut and new ones are
accepted, but nothing passes either way, so Patroni's requests time out as they would across a dead link. When the
cut is lifted, the dead connections are closed and new ones pass again.

The relays run on an event loop of their own, in a thread: a pause in the drill's own loop (its clients, its
checks) must not look like a partition to every node at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence


class CuttableProxy:
    """One node's relay to the etcd members (`upstreams`, tried in order on each new connection)."""

    def __init__(self, listen_port: int, upstreams: Sequence[int]) -> None:
        self.listen_port = listen_port
        self.upstreams = list(upstreams)
        self.cut = False
        self.server: asyncio.Server | None = None
        self.live: set[asyncio.StreamWriter] = set()
        self.dead: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self.live | self.dead:
            writer.close()

    def set_cut(self, cut: bool) -> None:
        self.cut = cut
        if cut:  # everything open now goes silent
            self.dead |= self.live
            self.live.clear()
        else:  # and is closed when the link comes back, so that the clients reconnect
            for writer in self.dead:
                writer.close()
            self.dead.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:  # the drill is ending (Proxies.stop)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            self.dead.add(writer)
            await self._swallow(reader)
            return
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        self.live |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self.live.discard(end)
                end.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for port in self.upstreams:
            with contextlib.suppress(OSError):
                return await asyncio.open_connection("127.0.0.1", port)
        return None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if writer not in self.live:  # cut: this connection is dead, its bytes go nowhere
                    await self._swallow(reader)
                    return
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            if writer in self.live:
                writer.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass


class Proxies:
    """The nodes' relays, on their own event loop in a daemon thread."""

    def __init__(self, proxies: Sequence[CuttableProxy]) -> None:
        self.proxies = list(proxies)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="etcd-proxies", daemon=True)

    def start(self) -> None:
        self.thread.start()
        for proxy in self.proxies:
            asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(timeout=10)

    def set_cut(self, index: int, cut: bool) -> None:
        """Cut or restore one relay, returning once the relays' loop has done it."""

        async def apply() -> None:
            self.proxies[index].set_cut(cut)

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(timeout=10)

    async def _stop_all(self) -> None:
        for proxy in self.proxies:
            await proxy.stop()
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop_all(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
