"""The floor of any Python proxy on this machine: a byte splice on uvloop.

    python benchmarks/floor_proxy.py LISTEN_PORT UPSTREAM_PORT

Each client connection gets its own upstream connection and bytes are copied both ways
with no parsing at all: two reads and two writes per request, nothing else. No HTTP proxy
written in Python can cost less per request than this; `peers.py` runs it beside the
sidecar and Envoy as the yardstick for what an asyncio-protocol data path could reach. Not
a product: no routing, no timeouts, no limits.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, and set TCP_NODELAY
        # themselves.
        self.transport = cast(asyncio.Transport, transport)
        # Held: the loop keeps only a weak reference to a task.
        self.connecting = asyncio.get_running_loop().create_task(self._connect(self.transport))

    async def _connect(self, transport: asyncio.Transport) -> None:
        upstream, _ = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(transport), "127.0.0.1", self.upstream_port)
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: Client(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
