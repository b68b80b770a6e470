"""A model server made of raw bytes for the differential wire tests: it listens on several
loopback ports, reads what the sidecar sends with h11 (an independent HTTP/1.1 parser) and
records every request exactly — which port and connection it came on, its head as sent —
then answers with an echo that names it, or with a scripted byte sequence."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field

import h11

ECHO_TYPE = b"text/plain"


@dataclass
class Received:
    """One request as the upstream read it."""

    seq: int  # across every port and connection, in arrival order
    port: int
    conn: int  # which upstream connection carried it (numbered across ports)
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercased by h11, values as h11 reads them
    raw_head: bytes  # the head exactly as it crossed the socket
    body: bytes = b""
    error: str = ""  # h11 could not read what the sidecar sent (always a defect)


@dataclass
class Script:
    """What to answer on a port instead of the echo: `data` written in `pieces` (cut
    offsets) with `pause_s` between them, then the connection closed or kept."""

    data: bytes
    pieces: tuple[int, ...] = ()
    pause_s: float = 0.0
    close: bool = True


def echo(request: Received) -> bytes:
    """The answer that names the request it belongs to (body: its seq and a digest of the
    body it carried), so a mixed-up answer cannot pass."""
    body = b"echo %d %s %s" % (request.seq, request.target,
                               hashlib.sha256(request.body).hexdigest()[:16].encode())
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: " + ECHO_TYPE + b"\r\nX-Echo-Seq: %d\r\n"
            b"Content-Length: %d\r\n\r\n" % (request.seq, len(body)))
    return head if request.method == b"HEAD" else head + body


@dataclass
class Recorder:
    """The upstream: `ports` listeners, one shared record."""

    ports: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    scripts: dict[int, Script] = field(default_factory=dict)  # port -> script
    open_conns: int = 0
    conns: int = 0
    _servers: list[asyncio.Server] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, count: int) -> Recorder:
        for _ in range(count):
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports[index]}"

    def since(self, mark: int) -> list[Received]:
        return self.requests[mark:]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        port = writer.get_extra_info("sockname")[1]
        self.conns += 1
        self.open_conns += 1
        number = self.conns
        try:
            await self._read_requests(reader, writer, port, number)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # stopped: end quietly
        finally:
            self.open_conns -= 1
            self._writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    async def _read_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             port: int, number: int) -> None:
        raw = bytearray()  # this connection's bytes not yet attributed to a request
        leftover = b""
        closed = False
        while True:
            # A fresh h11 connection per request: what we write back is raw bytes of our
            # choosing, which h11's own state machine would not allow.
            parser = h11.Connection(h11.SERVER)
            if leftover:
                parser.receive_data(leftover)
            if closed:
                parser.receive_data(b"")
            request: Received | None = None
            body = bytearray()
            while True:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    self.requests.append(Received(len(self.requests), port, number, b"", b"",
                                                  b"", [], bytes(raw), error=str(exc)))
                    return
                if event is h11.NEED_DATA:
                    if closed:
                        return
                    data = await reader.read(65536)
                    raw += data
                    if not data:
                        closed = True
                    parser.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    request = Received(
                        len(self.requests), port, number, bytes(event.method),
                        bytes(event.target), bytes(event.http_version),
                        [(bytes(k), bytes(v)) for k, v in event.headers], b"")
                    self.requests.append(request)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            request.body = bytes(body)
            leftover, closed = parser.trailing_data
            consumed = len(raw) - len(leftover)
            request.raw_head = bytes(raw[:consumed - len(body)])
            del raw[:consumed]
            script = self.scripts.get(port)
            if script is None:
                writer.write(echo(request))
                await writer.drain()
                continue
            await self._play(writer, script)
            if script.close:
                return

    async def _play(self, writer: asyncio.StreamWriter, script: Script) -> None:
        last = 0
        for cut in [*script.pieces, len(script.data)]:
            if cut > last:
                writer.write(script.data[last:cut])
                await writer.drain()
                last = cut
                if script.pause_s and cut < len(script.data):
                    await asyncio.sleep(script.pause_s)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
