"""Raw HTTP/1.1 on real sockets for the data path's wire tests: an upstream server that
records exactly the bytes it receives and answers with scripted bytes, a raw client
connection to the sidecar, and a strict reader of messages on either side."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

TIMEOUT_S = 5.0  # every wait in these tests is bounded by this (a hang is a failure)

Header = tuple[bytes, bytes]


@dataclass
class Message:
    """One request or response as it crossed the socket."""

    start: bytes  # request line or status line, without its CRLF
    headers: list[Header]  # names as sent, values without surrounding whitespace
    body: bytes = b""  # the content, de-chunked
    raw: bytes = b""  # exactly the bytes of this message on the wire
    trailers: list[Header] = field(default_factory=list)
    complete: bool = True  # False: the connection ended before the framing said it would
    chunked: bool = False
    size: int = 0  # content bytes received

    @property
    def status(self) -> int:
        return int(self.start.split(b" ")[1])

    @property
    def method(self) -> bytes:
        return self.start.split(b" ")[0]

    @property
    def target(self) -> bytes:
        return self.start.split(b" ")[1]

    def values(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == key]

    def header(self, name: str) -> bytes | None:
        found = self.values(name)
        assert len(found) <= 1, f"{name} appears {len(found)} times: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        return {k.decode().lower() for k, _ in self.headers}


class Wire:
    """Reads a stream and keeps every byte it hands out."""

    def __init__(self, reader: asyncio.StreamReader, record: bool = True) -> None:
        self.reader = reader
        self.record = record  # False: keep nothing once handed out (for huge bodies)
        self.buffer = bytearray()
        self.seen = bytearray()  # everything received so far, consumed or not
        self.taken = 0  # bytes handed out
        self.eof = False

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            raise EOFError
        self.buffer += data
        if self.record:
            self.seen += data

    def _take(self, n: int) -> bytes:
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.taken += n
        return out

    async def until(self, separator: bytes) -> bytes:
        while (end := self.buffer.find(separator)) < 0:
            await self._fill()
        return self._take(end + len(separator))

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        return self._take(n)

    async def rest(self) -> bytes:
        """Everything until the peer closes."""
        with contextlib.suppress(EOFError, ConnectionError):
            while True:
                await self._fill()
        return self._take(len(self.buffer))

    async def at_eof(self) -> bool:
        """True when the peer closed with nothing more to read."""
        if self.buffer:
            return False
        try:
            await self._fill()
        except (EOFError, ConnectionError):
            return True
        return False


def parse_head(head: bytes) -> tuple[bytes, list[Header]]:
    lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return lines[0], headers


async def read_message(wire: Wire, *, request: bool, method: bytes = b"GET",
                       keep: bool = True) -> Message | None:
    """The next message on `wire`, or None if the peer closed before sending a byte.
    With `keep` False the content is counted (`size`) but not kept."""
    start_at = wire.taken
    try:
        head = await wire.until(b"\r\n\r\n")
    except (EOFError, ConnectionError):
        if wire.taken == start_at and not wire.buffer:
            return None
        raise
    start, headers = parse_head(head)
    message = Message(start, headers)
    lower = [(k.lower(), v) for k, v in headers]
    codings = b",".join(v for k, v in lower if k == b"transfer-encoding")
    lengths = [v for k, v in lower if k == b"content-length"]
    bodiless = False
    if not request:
        status = message.status
        bodiless = method == b"HEAD" or 100 <= status < 200 or status in (204, 304)
    body = Content(keep)
    try:
        if bodiless:
            pass
        elif codings and codings.split(b",")[-1].strip().lower() == b"chunked":
            message.chunked = True
            while True:
                size = int((await wire.until(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (line := await wire.until(b"\r\n")) != b"\r\n":
                        message.trailers.append(parse_head(b"x\r\n" + line + b"\r\n")[1][0])
                    break
                body += await wire.exactly(size)
                assert await wire.exactly(2) == b"\r\n", "chunk not ended by CRLF"
        elif lengths:
            need = int(lengths[0])
            while len(body) < need:
                body += await wire.exactly(min(65536, need - len(body)))
        elif not request:
            body += await wire.rest()  # close-delimited
    except (EOFError, ConnectionError):
        message.complete = False
        body += wire._take(len(wire.buffer))
    message.body, message.size = bytes(body.kept), body.size
    if wire.record:
        message.raw = bytes(wire.seen[start_at:wire.taken])
    return message


class Content:
    """A message's content as it is read: kept, or only counted."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.kept = bytearray()
        self.size = 0

    def __iadd__(self, data: bytes) -> Content:
        self.size += len(data)
        if self.keep:
            self.kept += data
        return self

    def __len__(self) -> int:
        return self.size


# --- the upstream -------------------------------------------------------------------------


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


def response(body: bytes = b"ok", status: bytes = b"200 OK",
             headers: Iterable[bytes] = (b"Content-Type: text/plain",)) -> bytes:
    """A Content-Length framed response."""
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"HTTP/1.1 " + status + b"\r\n" + head + b"Content-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunked(pieces: Iterable[bytes], headers: Iterable[bytes] = (b"Content-Type: text/plain",),
            trailers: bytes = b"") -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return (b"HTTP/1.1 200 OK\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n" + body
            + b"0\r\n" + trailers + b"\r\n")


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


def post(target: bytes = b"/v1/chat/completions", body: bytes = b'{"model":"m"}',
         headers: Iterable[bytes] = ()) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"POST " + target + b" HTTP/1.1\r\nHost: sidecar\r\n" + head
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def get(target: bytes = b"/v1/models", headers: Iterable[bytes] = (),
        method: bytes = b"GET") -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return method + b" " + target + b" HTTP/1.1\r\nHost: sidecar\r\n" + head + b"\r\n"


def without_sidecar_headers(headers: list[Header]) -> list[Header]:
    """The response headers the upstream's own would map to: minus the x-sidecar-* ones
    the sidecar adds by contract and the framing it may redo."""
    framing = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive")
    return [(k, v) for k, v in headers
            if not k.lower().startswith(b"x-sidecar-") and k.lower() not in framing]


async def proxied(sidecar: Callable[..., Awaitable[Any]],
                  upstreams: Callable[[Respond], Awaitable[Upstream]], respond: Respond,
                  **env: str) -> tuple[Any, Upstream]:
    """An upstream answering through `respond` and an in-process sidecar whose one pool is
    it."""
    upstream = await upstreams(respond)
    return await sidecar(pools_for(upstream), **env), upstream


def echo_target(request: Message) -> bytes:
    return response(request.target)


def error_of(answer: Message) -> dict[str, Any]:
    """The sidecar's JSON error in `answer` ({"error": {"message", "type", "code"}})."""
    try:
        error = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"not the sidecar's JSON error shape: {answer.raw[:300]!r}"
                             ) from None
    assert isinstance(error, dict) and error.get("code"), answer.raw[:300]
    return error
