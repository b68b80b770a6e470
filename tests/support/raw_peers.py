"""The two peers of the sidecar in the wire tests, on real loopback sockets: an upstream
that records every connection and byte it receives and answers with scripted bytes, and a
raw client connection to the sidecar's proxy listener."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from tests.support.raw_http import TIMEOUT_S, Message, Wire, read_message


class Conn:
    """One connection the upstream accepted."""

    def __init__(self, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.wire = Wire(reader)
        self.writer = writer
        self.requests: list[Message] = []
        self.closed_by_peer = asyncio.Event()  # the sidecar closed its side

    async def send(self, data: bytes, *, pieces: Iterable[int] = (), pause_s: float = 0.0
                   ) -> None:
        """Write `data`, cut at the offsets in `pieces`, pausing between the writes."""
        last = 0
        for cut in [*pieces, len(data)]:
            if cut > last:
                self.writer.write(data[last:cut])
                await self.writer.drain()
                last = cut
                if pause_s and cut < len(data):
                    await asyncio.sleep(pause_s)

    def close(self) -> None:
        self.writer.close()


# Answers one request on a connection; returns False to close the connection after it.
Respond = Callable[[Conn, Message], Awaitable[bool]]


def always(reply: bytes | Callable[[Message], bytes]) -> Respond:
    """A responder that writes fixed bytes (or bytes made from the request) and keeps the
    connection open."""

    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(reply(request) if callable(reply) else reply)
        return True

    return respond


class Upstream:
    """A model server made of raw bytes: records every connection, every byte and every
    request it receives, and answers through `respond`."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.conns: list[Conn] = []
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def requests(self) -> list[Message]:
        return [r for c in self.conns for r in c.requests]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.wire.seen) for c in self.conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(len(self.conns) + 1, reader, writer)
        self.conns.append(conn)
        try:
            while True:
                request = await read_message(conn.wire, request=True)
                if request is None:
                    conn.closed_by_peer.set()
                    break
                conn.requests.append(request)
                if not await self.respond(conn, request):
                    break
        except (EOFError, ConnectionError):
            conn.closed_by_peer.set()
        except asyncio.CancelledError:
            pass  # stopped: end quietly (asyncio logs a cancelled connection callback)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self.conns:
            conn.writer.close()
        if self._tasks:  # closed sockets end most; a responder still waiting is cancelled
            await asyncio.wait(list(self._tasks), timeout=1)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def upstream_factory() -> AsyncIterator[Callable[[Respond], Awaitable[Upstream]]]:
    made: list[Upstream] = []

    async def make(respond: Respond) -> Upstream:
        upstream = await Upstream(respond).start()
        made.append(upstream)
        return upstream

    try:
        yield make
    finally:
        for upstream in made:
            await upstream.stop()


def pools_for(*upstreams: Upstream) -> dict[str, Any]:
    return {"m": {"model": "m", "endpoints": [u.url for u in upstreams]}}


# --- the client ---------------------------------------------------------------------------


class Client:
    """One raw connection to the sidecar's proxy listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.wire = Wire(reader)
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int = 0, sndbuf: int = 0) -> Client:
        """Small `rcvbuf`/`sndbuf` keep the kernel from hiding how much the sidecar
        itself holds."""
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # pieces go out as cut
        for option, size in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
                sock, ("127.0.0.1", port)), TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT_S)

    async def response(self, method: bytes = b"GET", timeout: float = TIMEOUT_S,
                       keep: bool = True) -> Message:
        """The next response, interim (1xx) ones included."""
        try:
            message = await asyncio.wait_for(
                read_message(self.wire, request=False, method=method, keep=keep), timeout)
        except TimeoutError:
            raise AssertionError(f"no response from the sidecar within {timeout} s") from None
        assert message is not None, "the sidecar closed the connection without answering"
        return message

    async def final(self, method: bytes = b"GET", timeout: float = TIMEOUT_S,
                    keep: bool = True) -> Message:
        """The next final (non-1xx) response."""
        while True:
            message = await self.response(method, timeout, keep)
            if message.status >= 200:
                return message

    async def closed(self, timeout: float = TIMEOUT_S) -> bool:
        """True when the sidecar closes the connection within `timeout` with nothing more
        sent; False if it stays open (or sends more)."""
        try:
            return await asyncio.wait_for(self.wire.at_eof(), timeout)
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


async def exchange(port: int, data: bytes, method: bytes = b"GET") -> Message:
    """Send raw bytes on a fresh connection and read the final answer."""
    client = await Client.open(port)
    try:
        await client.send(data)
        return await client.final(method)
    finally:
        client.close()


async def proxied(sidecar: Callable[..., Awaitable[Any]],
                  upstreams: Callable[[Respond], Awaitable[Upstream]], respond: Respond,
                  **env: str) -> tuple[Any, Upstream]:
    """An upstream answering through `respond` and an in-process sidecar whose one pool is
    it."""
    upstream = await upstreams(respond)
    return await sidecar(pools_for(upstream), **env), upstream

