"""HTTP/1.1 to the model servers on asyncio protocols with httptools' response parser
(llhttp): per-endpoint keep-alive pools, the first-byte and stream-idle deadlines, flow
control. It is the `Upstream` of seam.py; its connections are the `Reply`s."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from time import perf_counter
from urllib.parse import urlsplit

import httptools

from sidecar.dataplane.headers import RESPONSE_DROP, Headers, header_block
from sidecar.dataplane.seam import Broken
from sidecar.errors import Outcome

# vLLM (uvicorn) closes idle keep-alive connections after 5 s: ours go after 3 s plus at
# most one sweep, so we never reuse a connection the server is closing at that instant.
IDLE_S = 3.0
SWEEP_S = 1.0
# Deadlines (first byte, stream idle) are checked by one tick for every connection instead
# of a timer each: uvloop's call_at + cancel costs ~9 µs, a set add + discard ~0.1 µs. So a
# first-byte timeout fires up to this much late.
TICK_S = 0.05
# LLM calls are long and each holds a connection, so the per-endpoint bound is generous.
PER_ENDPOINT = 256
# uvloop's default low-water mark is 16 bytes; these bound what one stream keeps in memory.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024
_BODYLESS = (204, 304)


class Origin:
    """One endpoint's address and its pool of keep-alive connections."""

    __slots__ = ("host", "host_header", "idle", "in_use", "port", "tls", "waiters")

    def __init__(self, base_url: str, tls: ssl.SSLContext | None) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        secure = parts.scheme == "https"
        self.port = parts.port or (443 if secure else 80)
        self.tls = tls if secure else None
        self.host_header = parts.netloc.encode()
        self.idle: list[Connection] = []
        self.in_use = 0
        self.waiters: list[asyncio.Future[None]] = []


class Connection(asyncio.Protocol):
    """One upstream connection; while leased, the reply to the request it carries."""

    __slots__ = ("_deadline", "_done", "_head", "_last", "_parser", "_reason", "_sink",
                 "arrived_at", "body", "close_delimited", "event_stream", "finished", "forward",
                 "head_only", "headers", "idle_since", "in_body", "interim", "keep_alive",
                 "leased", "length", "loop", "origin", "outcome", "owner", "paused", "reason",
                 "reused", "sent_at", "status", "transport")

    def __init__(self, owner: HttpUpstream, origin: Origin) -> None:
        self.owner = owner
        self.origin = origin
        self.loop = owner.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.leased = False
        self.idle_since = 0.0
        self.arrived_at = 0.0
        self.sent_at = 0.0
        self.reused = False  # it carried an earlier request
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self.status = 0
        self.reason = b""
        self._reason: list[bytes] = []
        self.headers: Headers = []
        self.forward = b""
        self.event_stream = False
        self.length: int | None = None
        self.head_only = head_only
        self.close_delimited = False
        self.in_body = False
        self.interim = False
        self.finished = False
        self.keep_alive = False
        self.paused = False
        self.outcome: Outcome | None = None
        self.body: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._head: asyncio.Future[Connection | Outcome] | None = None
        self._done: asyncio.Future[Outcome | None] | None = None
        self._deadline = 0.0  # loop time the first byte is due by (0: none)
        self._last = 0.0

    # -- protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.leased:  # bytes nobody asked for: the connection cannot be trusted
            self._close()
            return
        # From here on the time is the sidecar's own (x-sidecar-overhead-ms).
        self.arrived_at = perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(Outcome.CONNECT_ERROR if self._head is not None
                       and not self._head.done() else Outcome.BROKEN_STREAM)
            self._close()
            return
        if self.head_only and self.finished:
            # llhttp cannot know a HEAD response has no body: start the next one afresh.
            self._parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        origin = self.origin
        if not self.leased:
            with contextlib.suppress(ValueError):
                origin.idle.remove(self)
        self.keep_alive = False
        if self.finished:
            return
        if self._head is not None and not self._head.done():
            # Closed before any answer. On a reused keep-alive connection that is most
            # likely the server's idle close racing our send (retried once, fresh); on a
            # fresh one the server took the connection and dropped it.
            self._answer(Outcome.CONNECTION_LOST if self.reused else Outcome.CONNECT_ERROR)
        elif self.in_body and self.close_delimited:
            self._finish(None)  # the close is the body's end
        else:
            self._fail(Outcome.BROKEN_STREAM)

    def pause_writing(self) -> None:  # a huge request body: the kernel buffer is full
        pass

    def resume_writing(self) -> None:
        pass

    # -- parser callbacks --------------------------------------------------------------
    def on_status(self, reason: bytes) -> None:
        self._reason.append(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # trailers are dropped; the body still completes
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 and status != 101:  # interim (103 Early Hints …): not forwarded
            self.interim = True
            self.headers = []
            self._reason = []
            return
        self.status = status
        self.reason = b"".join(self._reason)
        chunked = False
        lines = []
        connection = None
        for name, value in self.headers:
            lower = name.lower()
            if lower not in RESPONSE_DROP:
                lines.append(b"%s: %s\r\n" % (name, value))
                if lower == b"content-type":
                    self.event_stream = value.startswith(b"text/event-stream")
            elif lower == b"content-length":
                self.length = int(value)
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"connection":
                connection = value if connection is None else connection + b"," + value
        # Hop-by-hop fields are gone; so are the ones a Connection header names.
        self.forward = b"".join(lines) if connection is None else header_block(
            self.headers, RESPONSE_DROP, connection)
        if self.head_only or status in _BODYLESS:
            # No body follows. A HEAD answer keeps its Content-Length for the app.
            if not self.head_only:
                self.length = None
            else:
                self._finish_message()
        else:
            self.close_delimited = self.length is None and not chunked
            self.in_body = True
            self._last = self.loop.time()
        self._answer(self)

    def on_body(self, body: bytes) -> None:
        self._last = self.loop.time()
        sink = self._sink
        if sink is None:
            self.body.append(body)
        else:
            sink(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.finished:
            self._finish_message()

    # -- Reply -------------------------------------------------------------------------
    def pipe(self, sink: Callable[[bytes], None]) -> asyncio.Future[Outcome | None]:
        self._sink = sink
        if self.body:
            held, self.body = self.body, []
            for chunk in held:
                sink(chunk)
        return self._done_future()

    async def read(self) -> bytes:
        # Head and body mostly arrive in one read: then there is nothing to wait for.
        outcome = self.outcome if self.finished else await self._done_future()
        if outcome is not None:
            raise Broken(outcome)
        return b"".join(self.body)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.finished:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def settle(self) -> None:
        self._deadline = 0.0

    def release(self) -> None:
        if not self.leased:
            return
        self.leased = False
        self._deadline = 0.0
        self.owner.watched.discard(self)
        self._sink = None
        origin = self.origin
        origin.in_use -= 1
        if self.finished and self.outcome is None and self.keep_alive and \
                self.transport is not None and not self.transport.is_closing() and \
                not self.owner.closing:
            self.resume()
            self.body = []
            self.idle_since = self.loop.time()
            origin.idle.append(self)
        else:
            self._close()
        if origin.waiters:
            waiter = origin.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)

    # -- internals ---------------------------------------------------------------------
    def begin(self, head_only: bool, deadline: float) -> asyncio.Future[Connection | Outcome]:
        self._reset(head_only)
        self.leased = True
        self._head = head = self.loop.create_future()
        self._deadline = deadline
        self.owner.watched.add(self)
        return head

    def _done_future(self) -> asyncio.Future[Outcome | None]:
        done = self._done
        if done is None:
            done = self._done = self.loop.create_future()
            if self.finished:
                done.set_result(self.outcome)
        return done

    def _answer(self, result: Connection | Outcome) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_result(result)

    def _finish_message(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._finish(None)

    def _finish(self, outcome: Outcome | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.in_body = False
        self.outcome = outcome
        done = self._done
        if done is not None and not done.done():
            done.set_result(outcome)

    def _fail(self, outcome: Outcome) -> None:
        head = self._head
        if head is not None and not head.done():
            self.finished = True
            self.outcome = outcome
            head.set_result(outcome)
        else:
            self._finish(outcome)

    def check(self, now: float) -> None:
        """The tick: a first byte overdue, or a stream silent for too long."""
        if 0.0 < self._deadline <= now:
            self._deadline = 0.0
            self._fail(Outcome.FIRST_BYTE_TIMEOUT)
            self._close()
        elif self.in_body and now - self._last >= self.owner.idle_timeout:
            self._fail(Outcome.BROKEN_STREAM)  # silent for too long: a broken stream
            self._close()

    def _close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpUpstream:
    """Every endpoint's pool, one per sidecar."""

    def __init__(self, connect_timeout: float, idle_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.tls = tls if tls is not None else ssl.create_default_context()
        self.closing = False
        self.connections_opened = 0
        self._origins: dict[str, Origin] = {}
        self.watched: set[Connection] = set()  # leased: deadlines checked by the tick
        self._sweeper = self.loop.create_task(self._sweep_forever())
        self._ticker = self.loop.create_task(self._tick_forever())

    async def send(self, base_url: str, method: bytes, target: bytes, headers: bytes,
                   body: bytes, deadline: float) -> Connection | Outcome:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url, self.tls)
        conn = self._idle(origin)
        if conn is None:
            conn = await self._acquire(origin, deadline)
            if not isinstance(conn, Connection):
                return conn
        head = conn.begin(method == b"HEAD", deadline)
        framing = b"Content-Length: %d\r\n\r\n" % len(body) if body or method in (
            b"POST", b"PUT", b"PATCH") else b"\r\n"
        transport = conn.transport
        assert transport is not None
        request = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s" % (method, target, origin.host_header,
                                                            headers, framing)
        if body:  # never an empty buffer (asyncio on 3.13 would then never finish a close)
            transport.writelines((request, body))
        else:
            transport.write(request)
        conn.sent_at = perf_counter()  # until the answer arrives, the time is upstream's
        try:
            result = await head
        except BaseException:
            conn.release()
            raise
        if result is not conn:
            conn.release()
        return result

    def _idle(self, origin: Origin) -> Connection | None:
        """A kept-alive connection still fresh enough to reuse, if there is one."""
        idle = origin.idle
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing() and \
                    now - conn.idle_since < IDLE_S:
                origin.in_use += 1
                conn.reused = True
                return conn
            conn._close()
        return None

    async def _acquire(self, origin: Origin, deadline: float) -> Connection | Outcome:
        """A fresh connection, waiting for a slot when the endpoint's bound is reached."""
        while True:
            if (conn := self._idle(origin)) is not None:
                return conn
            if origin.in_use < PER_ENDPOINT:
                break
            waiter = self.loop.create_future()
            origin.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return Outcome.FIRST_BYTE_TIMEOUT
            finally:
                with contextlib.suppress(ValueError):
                    origin.waiters.remove(waiter)
        origin.in_use += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self, origin), origin.host, origin.port,
                    ssl=origin.tls, server_hostname=origin.host if origin.tls else None)
        except TimeoutError:
            origin.in_use -= 1
            return Outcome.CONNECT_TIMEOUT
        except (OSError, ssl.SSLError):
            origin.in_use -= 1
            return Outcome.CONNECT_ERROR
        except BaseException:
            origin.in_use -= 1
            raise
        self.connections_opened += 1
        return conn

    def in_use(self) -> int:
        return sum(origin.in_use for origin in self._origins.values())

    def idle(self) -> int:
        return sum(len(origin.idle) for origin in self._origins.values())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = self.loop.time()
            for origin in self._origins.values():
                expired = [c for c in origin.idle if now - c.idle_since >= IDLE_S]
                for conn in expired:
                    origin.idle.remove(conn)
                    conn._close()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if self.watched:
                now = self.loop.time()
                for conn in list(self.watched):
                    conn.check(now)

    async def aclose(self) -> None:
        self.closing = True
        for task in (self._sweeper, self._ticker):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for origin in self._origins.values():
            for conn in origin.idle:
                conn._close()
            origin.idle.clear()
