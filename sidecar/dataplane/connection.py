"""One upstream connection on an asyncio protocol with httptools' response parser (llhttp):
while leased, the `Reply` to the request it carries — its head, its body pushed to one
sink, flow control, and whether it may be reused once the answer is complete."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

import httptools

from sidecar.dataplane.headers import RESPONSE_DROP, Headers, header_block
from sidecar.dataplane.seam import Broken
from sidecar.errors import Outcome

if TYPE_CHECKING:
    from sidecar.dataplane.upstream import HttpUpstream, Origin

# uvloop's default low-water mark is 16 bytes; these bound what one stream keeps in memory.
WRITE_HIGH = 64 * 1024
WRITE_LOW = 16 * 1024
_BODYLESS = (204, 304)


class _Unasked(Exception):
    """A response began where none was asked for."""


class _BadCoding(Exception):
    """A response body in a transfer coding other than chunked alone."""


class _HeadAnswer:
    """The parser callbacks for a HEAD request's answer: the connection's own, and a chunk
    header — llhttp cannot know a HEAD answer has no body, so a chunk (`0\r\n\r\n` too,
    which makes no `on_body`) is bytes past the answer: the connection is out of step."""

    __slots__ = ("on_body", "on_chunk_header", "on_header", "on_headers_complete",
                 "on_message_begin", "on_message_complete", "on_status")

    def __init__(self, conn: Connection) -> None:
        self.on_body = conn.on_body
        self.on_header = conn.on_header
        self.on_headers_complete = conn.on_headers_complete
        self.on_message_begin = conn.on_message_begin
        self.on_message_complete = conn.on_message_complete
        self.on_status = conn.on_status
        self.on_chunk_header = conn._close


class Connection(asyncio.Protocol):
    """One upstream connection; while leased, the reply to the request it carries."""

    __slots__ = ("_deadline", "_done", "_head", "_last", "_opening", "_parser", "_reason",
                 "_sink", "arrived_at", "body", "close_delimited", "event_stream", "finished",
                 "forward", "head_only", "headers", "idle_since", "in_body", "interim",
                 "keep_alive", "leased", "length", "loop", "origin", "outcome", "owner",
                 "paused", "reason", "reused", "sent_at", "status", "transport")

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
        self._opening = b""  # the answer's first bytes: is it HTTP at all?

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
        if len(self._opening) < 5:
            self._opening += data[:5 - len(self._opening)]
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            # An HTTP server's malformed answer — its head, or its body's framing after a
            # valid head (a bad chunk size) — is a 502 (RFC 9110 §15.6.3): the pod took
            # the request and answered it, so it is not sent elsewhere. Bytes that are no
            # HTTP at all come from something else at that address (a wrong port), which
            # never took the request. After a whole answer (`_Unasked`, or garbage behind
            # it) the reply stands and `_fail` keeps it; only the connection goes.
            answered = self._head is not None and self._head.done()
            self._fail(Outcome.BAD_RESPONSE if answered or self._opening == b"HTTP/"
                       else Outcome.CONNECT_ERROR)
            self._close()
            return
        if self.head_only and self.finished:
            # llhttp cannot know a HEAD response has no body: start the next one afresh.
            self._parser = httptools.HttpResponseParser(self)
            if self.body:  # it read bytes after the head as a body: nobody's answer
                self.body = []
                self._close()

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
    def on_message_begin(self) -> None:
        if self.finished:
            # Bytes after the whole answer, before this lease ends: not an answer to
            # anything we sent. Parsing stops here (the reply stays exactly the first
            # response) and `data_received` closes the connection: out of step, never reused.
            raise _Unasked

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
        coding = None
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
                coding = value if coding is None else coding + b"," + value
            elif lower == b"connection":
                connection = value if connection is None else connection + b"," + value
        # Hop-by-hop fields are gone; so are the ones a Connection header names.
        self.forward = b"".join(lines) if connection is None else header_block(
            self.headers, RESPONSE_DROP, connection)
        if coding is not None and coding.strip().lower() != b"chunked":
            # De-chunked, a gzip (or any other) coding would reach the app undeclared
            # (RFC 9112 §6.1, §7): the answer is refused as malformed, a 502 — a HEAD's or
            # a 204's too, whose Transfer-Encoding only describes the body they lack.
            raise _BadCoding(coding)
        if self.head_only or status in _BODYLESS:
            # No body follows. A HEAD answer keeps its Content-Length for the app.
            if not self.head_only:
                self.length = None
            else:
                self._finish_message()
        else:
            self.close_delimited = self.length is None and coding is None
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
                not self.owner.closing and not origin.retired:
            self.resume()
            self.body = []
            self.idle_since = self.loop.time()
            origin.idle.append(self)
        else:
            self._close()
        origin.wake_one()

    # -- internals ---------------------------------------------------------------------
    def begin(self, head_only: bool, deadline: float) -> asyncio.Future[Connection | Outcome]:
        self._reset(head_only)
        if head_only:  # (between answers: nothing half-parsed is lost)
            self._parser = httptools.HttpResponseParser(_HeadAnswer(self))
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
            # Silent for too long: a broken stream, or (before its first content) a live
            # pod we hung up on, which must not count as a dead one that may be retried.
            self._fail(Outcome.FIRST_BYTE_TIMEOUT if self._deadline else Outcome.BROKEN_STREAM)
            self._close()

    def _close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
