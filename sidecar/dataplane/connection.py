"""One upstream connection on an asyncio protocol with httptools' response parser (llhttp),
and the `UpstreamReply` each request it carries gets: the answer to that one request (head,
body pushed to one sink, flow control), which alone gives the connection back, once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

import httptools

from sidecar.dataplane.flow import BODYLESS, WRITE_HIGH, WRITE_LOW
from sidecar.dataplane.headers import RESPONSE_DROP, Headers, header_block
from sidecar.dataplane.seam import Broken
from sidecar.policy.errors import Outcome


class ConnectionPool(Protocol):
    """Where a connection lives between requests (upstream.py's `Origin`)."""

    def give_back(self, conn: Connection, reusable: bool) -> None:
        """The request is done with `conn`: keep it idle if `reusable`, else close it."""
        ...

    def lost(self, conn: Connection) -> None:
        """An idle `conn` was closed by its peer."""
        ...


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
        self.on_chunk_header = conn.close


class UpstreamReply:
    """The answer to one request: the seam's `Reply`. It holds its connection's lease until
    `release`, which alone hands the connection back to its pool; a released reply is
    detached — whatever its connection carries next never reaches it."""

    __slots__ = ("_conn", "_done", "_sink", "arrived_at", "body", "event_stream",
                 "finished", "forward", "headers", "keep_alive", "length", "outcome",
                 "paused", "reason", "sent_at", "status")

    # The head's fields (status, reason, forward, event_stream, length) are set by the
    # connection when the head is whole, before anyone is given the reply; `sent_at` by the
    # upstream as the request leaves, `arrived_at` as bytes arrive.
    status: int
    reason: bytes
    forward: bytes
    event_stream: bool
    length: int | None
    sent_at: float
    arrived_at: float

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self.headers: Headers = []
        self.finished = False  # the answer is complete, or `outcome` says why not
        self.outcome: Outcome | None = None
        self.keep_alive = False
        self.paused = False
        self.body: list[bytes] = []  # chunks that arrived before `pipe`
        self._sink: Callable[[bytes], None] | None = None
        self._done: asyncio.Future[Outcome | None] | None = None

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
        conn = self._conn
        if not self.paused and conn is not None and not self.finished:
            self.paused = True
            conn.pause_reading()

    def resume(self) -> None:
        conn = self._conn
        if self.paused and conn is not None:
            self.paused = False
            conn.resume_reading()

    def settle(self) -> None:
        conn = self._conn
        if conn is not None:
            conn._deadline = 0.0  # (once per request: no second call)

    def release(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._sink = None
        # The connection stops feeding this reply: whatever it carries next is another's.
        conn.reply = None
        conn._deadline = 0.0
        transport = conn.transport
        reusable = self.finished and self.outcome is None and self.keep_alive and \
            transport is not None and not transport.is_closing()
        if reusable and self.paused:
            self.paused = False
            conn.resume_reading()
        conn.pool.give_back(conn, reusable)

    # -- internals (the connection calls `finish`) ---------------------------------------
    def _done_future(self) -> asyncio.Future[Outcome | None]:
        done = self._done
        if done is None:
            done = self._done = asyncio.get_running_loop().create_future()
            if self.finished:
                done.set_result(self.outcome)
        return done

    def finish(self, outcome: Outcome | None) -> None:
        """The answer is whole (None) or ended early (why)."""
        if self.finished:
            return
        self.finished = True
        self.outcome = outcome
        done = self._done
        if done is not None and not done.done():
            done.set_result(outcome)


class Connection(asyncio.Protocol):
    """One upstream connection: the bytes and the parser. While a request is on it, the
    parser's results go to that request's `UpstreamReply` (`reply`), and to nothing else."""

    __slots__ = ("_deadline", "_head", "_last", "_opening", "_parser", "_reason",
                 "close_delimited", "head_only", "idle_since", "in_body", "interim", "loop",
                 "pool", "reply", "reused", "transport")

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.reply: UpstreamReply | None = None  # the request it carries (None: idle)
        self.idle_since = 0.0
        self.reused = False  # it carried an earlier request
        self._head: asyncio.Future[UpstreamReply | Outcome] | None = None
        # Set afresh by each answer's head before they are read (when it has a body).
        self.close_delimited = False
        self._last = 0.0
        self._reset(False, 0.0)

    def _reset(self, head_only: bool, deadline: float) -> None:
        self._reason = b""
        self.head_only = head_only
        self.in_body = False
        self.interim = False
        self._deadline = deadline  # loop time the first byte is due by (0: none)
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
        reply = self.reply
        if reply is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        # From here on the time is the sidecar's own (x-sidecar-overhead-ms).
        reply.arrived_at = perf_counter()
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
            self.close()
            return
        if self.head_only and reply.finished:
            # llhttp cannot know a HEAD response has no body: start the next one afresh.
            self._parser = httptools.HttpResponseParser(self)
            if reply.body:  # it read bytes after the head as a body: nobody's answer
                reply.body = []
                self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reply = self.reply
        if reply is None:
            self.pool.lost(self)
            return
        reply.keep_alive = False
        if reply.finished:
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

    # -- parser callbacks (only while a reply is attached: `data_received` checks) ------
    def on_message_begin(self) -> None:
        if self.reply.finished:  # type: ignore[union-attr]
            # Bytes after the whole answer, before this lease ends: not an answer to
            # anything we sent. Parsing stops here (the reply stays exactly the first
            # response) and `data_received` closes the connection: out of step, never reused.
            raise _Unasked

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # (mostly one piece: b"" + reason is reason, no copy)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # trailers are dropped; the body still completes
            self.reply.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        reply = self.reply
        assert reply is not None
        status = self._parser.get_status_code()
        if status < 200 and status != 101:  # interim (103 Early Hints …): not forwarded
            self.interim = True
            reply.headers = []
            self._reason = b""
            return
        reply.status = status
        reply.reason = self._reason
        coding = None
        lines = []
        connection = None
        length = None
        event_stream = False
        for name, value in reply.headers:
            lower = name.lower()
            if lower not in RESPONSE_DROP:
                lines.append(b"%s: %s\r\n" % (name, value))
                if lower == b"content-type":
                    event_stream = value.startswith(b"text/event-stream")
            elif lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif lower == b"connection":
                connection = value if connection is None else connection + b"," + value
        reply.event_stream = event_stream
        # Hop-by-hop fields are gone; so are the ones a Connection header names.
        reply.forward = b"".join(lines) if connection is None else header_block(
            reply.headers, RESPONSE_DROP, connection)
        if coding is not None and coding.strip().lower() != b"chunked":
            # De-chunked, a gzip (or any other) coding would reach the app undeclared
            # (RFC 9112 §6.1, §7): the answer is refused as malformed, a 502 — a HEAD's or
            # a 204's too, whose Transfer-Encoding only describes the body they lack.
            raise _BadCoding(coding)
        if self.head_only or status in BODYLESS:
            # No body follows. A HEAD answer keeps its Content-Length for the app.
            if not self.head_only:
                length = None
            reply.length = length
            if self.head_only:
                self._finish_message()
        else:
            reply.length = length
            self.close_delimited = length is None and coding is None
            self.in_body = True
            self._last = self.loop.time()
        self._answer(reply)

    def on_body(self, body: bytes) -> None:
        self._last = self.loop.time()
        reply = self.reply
        sink = reply._sink  # type: ignore[union-attr]
        if sink is None:
            reply.body.append(body)  # type: ignore[union-attr]
        else:
            sink(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.reply.finished:  # type: ignore[union-attr]
            self._finish_message()

    # -- the request on it ---------------------------------------------------------------
    def begin(self, head_only: bool, deadline: float) -> asyncio.Future[UpstreamReply | Outcome]:
        """A request goes out on this connection: its reply, once the head is here."""
        self._reset(head_only, deadline)
        if head_only:  # (between answers: nothing half-parsed is lost)
            self._parser = httptools.HttpResponseParser(_HeadAnswer(self))
        self.reply = UpstreamReply(self)
        self._head = head = self.loop.create_future()
        return head

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _answer(self, result: UpstreamReply | Outcome) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_result(result)

    def _finish_message(self) -> None:
        reply = self.reply
        assert reply is not None
        reply.keep_alive = self._parser.should_keep_alive()
        self.in_body = False
        reply.finish(None)

    def _finish(self, outcome: Outcome | None) -> None:
        reply = self.reply
        if reply is None or reply.finished:
            return
        self.in_body = False
        reply.finish(outcome)

    def _fail(self, outcome: Outcome) -> None:
        reply = self.reply
        if reply is None:
            return
        head = self._head
        if head is not None and not head.done():
            reply.finished = True
            reply.outcome = outcome
            head.set_result(outcome)
        else:
            self._finish(outcome)

    def check(self, now: float, idle_timeout: float) -> None:
        """The tick: a first byte overdue, or a stream silent for too long."""
        if 0.0 < self._deadline <= now:
            self._deadline = 0.0
            self._fail(Outcome.FIRST_BYTE_TIMEOUT)
            self.close()
        elif self.in_body and now - self._last >= idle_timeout:
            # Silent for too long: a broken stream, or (before its first content) a live
            # pod we hung up on, which must not count as a dead one that may be retried.
            self._fail(Outcome.FIRST_BYTE_TIMEOUT if self._deadline else Outcome.BROKEN_STREAM)
            self.close()

    def close(self) -> None:
        if self.reply is not None:
            self.reply.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
