"""HTTP/1.1 as bytes, for the data path's wire tests: a strict reader of requests and
responses that keeps exactly what crossed the socket, and builders of the messages the tests
send."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
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

def post(target: bytes = b"/v1/chat/completions", body: bytes = b'{"model":"m"}',
         headers: Iterable[bytes] = ()) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (b"POST " + target + b" HTTP/1.1\r\nHost: sidecar\r\n" + head
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def get(target: bytes = b"/v1/files", headers: Iterable[bytes] = (),
        method: bytes = b"GET") -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return method + b" " + target + b" HTTP/1.1\r\nHost: sidecar\r\n" + head + b"\r\n"


def without_sidecar_headers(headers: list[Header]) -> list[Header]:
    """The response headers the upstream's own would map to: minus the x-sidecar-* ones
    the sidecar adds by contract and the framing it may redo."""
    framing = (b"content-length", b"transfer-encoding", b"connection", b"keep-alive")
    return [(k, v) for k, v in headers
            if not k.lower().startswith(b"x-sidecar-") and k.lower() not in framing]

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
