"""What an HTTP-aware data path on raw asyncio protocols could cost: a yardstick.

    python benchmarks/l7_floor.py LISTEN_PORT UPSTREAM_PORT

A minimal HTTP/1.1 proxy on uvloop with httptools' C parser (llhttp) on both sides, doing
the per-request work the sidecar's hot path does once a session is warm: read the session
header, look its route up in a dict, drop hop-by-hop headers, add the `x-sidecar-*`
response headers, count, and relay the answer as it arrives (Content-Length or re-chunked)
over a pooled keep-alive upstream connection. No limits, timeouts, retries, TLS or
pipelining: it is the floor such a design starts from, not a product. `peers.py` runs it
as `python-l7-floor` (needs `pip install httptools`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import uvloop

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"content-length", b"host"})
SESSION_HEADER = b"x-session-id"


class Route:
    __slots__ = ("endpoint", "last_seen", "session")

    def __init__(self, session: bytes, endpoint: str) -> None:
        self.session = session
        self.endpoint = endpoint
        self.last_seen = 0.0


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.idle: list[UpstreamConnection] = []
        self.routes: dict[bytes, Route] = {}
        self.requests = 0
        self.endpoint = f"http://127.0.0.1:{upstream_port}"


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.headers: list[bytes] = []
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers += (name, b": ", value, b"\r\n")
        elif name.lower() == b"content-length":
            self.headers += (b"Content-Length: ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        client = self.client
        assert client is not None
        status = self.parser.get_status_code()
        self.chunked = b"Content-Length: " not in self.headers
        head = [b"HTTP/1.1 %d OK\r\n" % status, *self.headers,
                b"x-sidecar-session: ", client.route.session, b"\r\n",
                b"x-sidecar-endpoint: ", client.route.endpoint.encode(), b"\r\n"]
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        client.transport.writelines(head)
        self.headers = []

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        if self.chunked:
            self.client.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.client.transport.write(body)

    def on_message_complete(self) -> None:
        assert self.client is not None
        if self.chunked:
            self.client.transport.write(b"0\r\n\r\n")
        self.client = None
        self.proxy.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.proxy.idle:
            self.proxy.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()


class ClientConnection(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[bytes] = []
        self.session = b""
        self.body: list[bytes] = []
        self.route = Route(b"", "")
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == SESSION_HEADER:
            self.session = value
        if lower not in HOP_BY_HOP:
            self.headers += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        proxy = self.proxy
        proxy.requests += 1
        route = proxy.routes.get(self.session)
        if route is None:
            route = proxy.routes[self.session] = Route(self.session, proxy.endpoint)
        route.last_seen = asyncio.get_running_loop().time()
        self.route = route
        body = b"".join(self.body)
        request = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n",
                   b"Host: 127.0.0.1\r\n", *self.headers,
                   b"Content-Length: %d\r\n\r\n" % len(body), body]
        self.headers, self.body, self.session = [], [], b""
        if proxy.idle:
            self._send(proxy.idle.pop(), request)
        else:
            self.connecting = asyncio.get_running_loop().create_task(self._connect(request))

    async def _connect(self, request: list[bytes]) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(
            lambda: UpstreamConnection(self.proxy), "127.0.0.1", self.proxy.upstream_port)
        self._send(upstream, request)

    def _send(self, upstream: UpstreamConnection, request: list[bytes]) -> None:
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.writelines(request)


async def serve(port: int, upstream_port: int) -> None:
    proxy = Proxy(upstream_port)
    server = await asyncio.get_running_loop().create_server(
        lambda: ClientConnection(proxy), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
