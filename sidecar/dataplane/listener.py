"""HTTP/1.1 from the app on an asyncio protocol with httptools' request parser (llhttp):
framing checks (nothing ambiguous is ever forwarded), header and body limits, deadlines
for the request head and a stalled or trickling body, Expect, upgrades declined, CONNECT
refused, half-close, pipelining in order, flow control. Each connection is the
`Downstream` of the request it is answering."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from time import perf_counter
from typing import Any, Protocol

import httptools

from sidecar.dataplane.downstream import ResponseWriter
from sidecar.dataplane.flow import WRITE_HIGH, WRITE_LOW
from sidecar.dataplane.headers import REQUEST_DROP, Headers, header_block, refused_header
from sidecar.dataplane.seam import Reply, Request
from sidecar.policy.errors import error_body
from sidecar.supervise import cancel_and_wait

# aiohttp's limits, which the app's clients already live with.
MAX_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = MAX_LINE * MAX_HEADERS
# The request head must arrive within this (slowloris); idle keep-alive connections close
# after KEEPALIVE_S.
HEAD_TIMEOUT_S = 10.0
# A body that stops arriving: 408 once no byte came for this long (checked by the same
# sweep, so the bound is between this and twice this, plus a sweep). The same order as the
# head's: a client that is still sending never waits on it, and one that stalled holds a
# connection (and a buffered partial body) for at most ~20 s.
BODY_IDLE_S = 10.0
# A body that keeps trickling (a byte every 9 s never stalls): 408 once it has taken longer
# than BODY_GRACE_S plus a second per BODY_MIN_RATE bytes received — Apache
# mod_reqtimeout's default (`body=20,MinRate=500`). An honest client on the slowest link
# sends far faster; a slowloris must pay 500 bytes (all buffered against
# SIDECAR_MAX_BODY_BYTES) for every second it holds a connection past the first 20.
BODY_GRACE_S = 20.0
BODY_MIN_RATE = 500.0
KEEPALIVE_S = 75.0
SWEEP_S = 1.0
SELECTOR_HEADER = b"x-sidecar-selector"
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# llhttp's reason for a forbidden character in a header value; httptools raises it as a
# plain HttpParserError (no errno), so its text is the only way to tell it apart.
_BAD_VALUE = "Invalid header value char"
EAGER_TASKS = sys.version_info >= (3, 12)

Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]


class ListenerEvents(Protocol):
    """Where the listener reports what never reaches the request logic (events.py's
    `Events`): each refused request once, and each request that failed inside."""

    def refused(self, status: int, reason: str) -> None: ...
    def internal_error(self) -> None: ...


class Refused(Exception):
    """A request that must not be forwarded: answered with `status`, then closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _incomplete() -> Refused:
    return Refused(400, "incomplete_request", "the client ended its side of the connection "
                   "before the request was whole")


class ClientConnection(ResponseWriter, asyncio.Protocol):
    __slots__ = ("_answered", "_begun_at", "_body", "_body_seen", "_body_since", "_body_size",
                 "_chunked", "_close_delimited", "_connection", "_continue_sent", "_continued",
                 "_corked", "_expect", "_forward", "_half_closed", "_head_bytes", "_head_tail",
                 "_headers", "_hosts", "_in_body", "_in_head", "_keys", "_method", "_parser",
                 "_queue", "_refused_behind", "_resume", "_selector", "_stash", "_te",
                 "_unreadable", "_url",
                 "_version", "closed", "connection_id", "deadline", "head_only", "keep_alive",
                 "listener", "source", "started", "task", "transport")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # (request, keep-alive, a 100 Continue already went out for it)
        self._queue: deque[tuple[Request, bool, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.connection_id = ""
        self.deadline = time.monotonic() + KEEPALIVE_S
        self.source: Reply | None = None
        self._in_head = False
        self._in_body = False
        self._half_closed = False  # the app's FIN came while an answer was owed
        self._continued = False  # the request being answered got a 100 Continue
        self._body_since = 0.0  # when the body's wait began (its head's last read)
        self._head_bytes = 0
        self._head_tail = b""  # a head's last, unfinished line when it spans reads
        self._resume: bytes | None = None  # see `_decline_upgrade`
        self._stash: tuple[bytes, list[bytes], Headers, list[bytes]] | None = None
        self._unreadable = False  # the parser failed behind a whole request
        self._refused_behind = False  # ... and that refusal was counted
        self._version = (1, 1)
        self._begun_at = 0.0
        self._begin()
        self._response_reset(False)

    # -- protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        # Apps that send no session header get one session per TCP connection.
        self.connection_id = (f"conn:{peer[0]}:{peer[1]}" if isinstance(peer, tuple)
                              else f"conn:{id(self):x}")
        self.listener.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        began = self._in_head  # the head being read began in an earlier read
        if began:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(Refused(431, "headers_too_large", "request header section "
                                     f"over {MAX_HEAD_BYTES} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._decline_upgrade(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(cause if isinstance(cause, Refused) else
                         Refused(400, "bad_request", str(exc)))
        except httptools.HttpParserError as exc:
            self._refuse(self._malformed(data, began, exc) if self._in_head else
                         Refused(400, "bad_request", f"malformed HTTP request: {exc}"))
        else:
            if self._in_head:  # a head in pieces: keep its unfinished line (for `_malformed`)
                tail = self._head_tail + data
                self._head_tail = tail[tail.rfind(b"\n") + 1:]
            elif self._body_seen < 0:
                # A head ended in this read and its body did not: the body's clock starts
                # now, and what came with the head is not progress at the first look.
                now = time.monotonic()
                self._body_seen = self._body_size
                self._body_since = now
                self.deadline = now + BODY_IDLE_S

    def eof_received(self) -> bool:
        # A FIN is a half-close ("that was my last request": batch clients, `nc -N`) or a
        # client gone for good; TCP only tells them apart once we write.
        if self.task is None and not self._queue:
            if self._in_head or self._in_body:  # a request cut short: never forwarded
                self._refuse(_incomplete())
            self.closed = True
            return False
        if self._version < (1, 1):
            # No 1xx may go to an HTTP/1.0 client (RFC 9110 §15.2), so nothing would tell
            # its half-close from its leaving: taken as gone, which cancels its upstream
            # request (`connection_lost`).
            self.closed = True
            return False
        # What came whole is answered, then the connection closes. Our writes tell a peer
        # that left for good: its kernel answers them with a reset, which the sweep finds
        # (`_peer_reset`) and which cancels the upstream request. Before the answer's head
        # a 100 Continue (HTTP/1.1 clients skip it, RFC 9110 §15.2) is that write — once
        # per request, never inside an answer.
        self._unreadable = True
        self._half_closed = True
        if not self.started and not self._continued and self.transport is not None:
            self._continued = True
            self.transport.write(CONTINUE)
        self.deadline = time.monotonic()  # looked at by the next sweep
        return True

    def _decline_upgrade(self, rest: bytes) -> None:
        """An upgrade we do not take (h2c from Java clients, websocket): RFC 9110 §7.8 lets
        a server ignore it and answer in HTTP/1.1. llhttp has stopped after the head (a body
        is skipped: httptools asks it to), so a fresh parser reads what follows — for a
        request with a body, after a head made up to frame that body (`_resume`)."""
        resume, self._resume = self._resume, None
        if resume is not None:
            self._stash = (self._parser.get_method(), self._url, self._headers, self._forward)
            rest = resume + rest
        self._parser = httptools.HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _malformed(self, data: bytes, began: bool, exc: Exception) -> Refused:
        """A head llhttp refused: named by its header when a header's value is at fault.
        Only the refused head's own lines are looked at: `data` may hold whole requests
        (and their bodies) before it."""
        name = None
        if str(exc) == _BAD_VALUE:
            if began:  # every byte since the head began is in `_head_tail` + `data`
                name = refused_header(self._head_tail + data)
            else:  # it began in this read: at its request line, whole since llhttp passed it
                line = b"%s %s " % (self._parser.get_method(), b"".join(self._url))
                start = data.rfind(line)
                if start >= 0:
                    name = refused_header(data[start:])
        if name is None:
            return Refused(400, "bad_request", f"malformed HTTP request: {exc}")
        lower = name.lower()
        if lower == self.listener.session_header:
            return Refused(400, "invalid_session_id", f"header {lower.decode()} must be "
                           "1-256 printable ASCII characters")
        if lower == SELECTOR_HEADER:
            return Refused(400, "invalid_selector", "header x-sidecar-selector must be an "
                           "integer 0-15")
        return Refused(400, "bad_request", f"malformed HTTP request: header "
                       f"{name.decode('latin-1')} has a character HTTP does not allow in "
                       f"its value ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the app went away: so does its upstream request

    def pause_writing(self) -> None:
        if self.source is not None:
            self.source.pause()  # the app reads slower than the model writes

    def resume_writing(self) -> None:
        if self.source is not None:
            self.source.resume()

    # -- parser callbacks --------------------------------------------------------------
    def _begin(self) -> None:
        self._url: list[bytes] = []
        self._headers: Headers = []
        self._forward: list[bytes] = []  # the header lines that go upstream
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_seen = 0  # `_body_size` at the sweep's last look (-1: the head's read)
        self._method: bytes | None = None  # an upgrade's own, read through a made-up head
        # The session-key headers' values (sessionkeys.watched), first of each name; None
        # until one arrives, so a request without any allocates nothing.
        self._keys: dict[bytes, bytes] | None = None
        self._selector: bytes | None = None
        self._connection: bytes | None = None
        self._expect: bytes | None = None
        self._te: bytes | None = None
        self._hosts = 0
        self._continue_sent = False

    def on_message_begin(self) -> None:
        if self._stash is not None:  # the made-up head of `_decline_upgrade`: kept apart
            self._url, self._headers, self._forward = [], [], []
            return
        self._begun_at = perf_counter()  # the request's clock starts at its first bytes
        self._begin()
        self._in_head = True
        self._head_bytes = 0
        self._head_tail = b""
        self.deadline = time.monotonic() + HEAD_TIMEOUT_S

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        if sum(map(len, self._url)) > MAX_LINE:
            raise Refused(414, "uri_too_long", f"request target over {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise Refused(431, "too_many_headers", f"more than {MAX_HEADERS} headers")
        if len(name) + len(value) + 2 > MAX_LINE:
            raise Refused(431, "header_too_large", f"a header line over {MAX_LINE} bytes")
        if not self._in_head and self._stash is None:
            # A chunked body's trailer field: dropped (RFC 9110 §6.5.1 lets a proxy discard
            # them; merged into the header section they would read as the app's headers,
            # a session header among them). They count against the body's limit.
            self._count_body(len(name) + len(value))
            return
        headers.append((name, value))
        lower = name.lower()
        if lower not in REQUEST_DROP:
            self._forward.append(b"%s: %s\r\n" % (name, value))
        if lower in self.listener.special:
            if lower in self.listener.watched:
                keys = self._keys
                if keys is None:
                    self._keys = {lower: value}
                elif lower not in keys:
                    keys[lower] = value
            elif lower == SELECTOR_HEADER:
                self._selector = value
            elif lower == b"connection":
                self._connection = value if self._connection is None else \
                    self._connection + b"," + value
            elif lower == b"expect":
                self._expect = value
            elif lower == b"transfer-encoding":
                self._te = value
            elif lower == b"host":
                self._hosts += 1

    def on_headers_complete(self) -> None:
        if self._stash is not None:
            self._method, self._url, self._headers, self._forward = self._stash
            self._stash = None
            return
        self._in_head = False
        self._in_body = True
        # The body's stall clock starts at the end of this read (`data_received`), unless
        # the body is whole by then (`on_message_complete` clears the deadline).
        self._body_seen = -1
        upgrade = self._parser.should_upgrade()  # (CONNECT is one to llhttp)
        if upgrade and self._parser.get_method() == b"CONNECT":
            # A tunnel is a forward proxy's job; llhttp would also take whatever follows
            # the head as tunnel bytes, never as this request's body.
            raise Refused(501, "method_not_supported", "CONNECT is not supported: the "
                          "sidecar is a reverse proxy")
        version = self._parser.get_http_version()
        if self._hosts > 1 or (self._hosts == 0 and version != "1.0"):
            # RFC 9112 §3.2: exactly one Host in HTTP/1.1, never two.
            raise Refused(400, "bad_host", "an HTTP/1.1 request needs exactly one Host header")
        if self._te is not None and version == "1.0":
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
            raise Refused(400, "bad_transfer_encoding", "Transfer-Encoding in an HTTP/1.0 "
                          "request")
        if self._te is not None and self._te.strip().lower() != b"chunked":
            # llhttp accepts e.g. "gzip, chunked"; we forward a de-chunked body with a
            # Content-Length, which would drop the gzip coding: refuse it instead.
            raise Refused(400, "bad_transfer_encoding", "Transfer-Encoding other than "
                          "`chunked` is not supported")
        listener = self.listener
        length = None  # llhttp has checked it is one plain number
        for name, value in self._headers:
            if name.lower() == b"content-length":
                length = int(value)
        if length is not None and length > listener.max_body:
            raise Refused(413, "body_too_large", "request body exceeds "
                          f"SIDECAR_MAX_BODY_BYTES={listener.max_body}")
        if self._expect is not None:
            if self._expect.strip().lower() != b"100-continue":
                raise Refused(417, "expectation_failed", "only Expect: 100-continue is "
                              "supported")
            if version == "1.1" and self.transport is not None and self.task is None \
                    and not self._queue:
                # We buffer the body ourselves, so the app may send it now; the upstream
                # never sees Expect. (Not while an earlier request is owed its answer, which
                # must come first, RFC 9112 §9.3.2: the app's wait for it times out, RFC
                # 9110 §10.1.1.)
                self._continue_sent = True
                self.transport.write(CONTINUE)
        if upgrade and (length or self._te is not None):
            # httptools makes llhttp skip an upgrading request's body: once it stops, the
            # body is read through a head that frames it like this one did. Its method is
            # a plain POST, whatever this one's: a method llhttp reads as a tunnel would
            # have it take the body for a new request.
            keep_alive = self._parser.should_keep_alive()
            self._resume = b"POST / HTTP/%s\r\n%s%s\r\n" % (
                version.encode(),
                b"Content-Length: %d\r\n" % length if length else
                b"Transfer-Encoding: chunked\r\n",
                (b"Connection: keep-alive\r\n" if version == "1.0" else b"") if keep_alive
                else b"Connection: close\r\n")

    def on_body(self, body: bytes) -> None:
        self._count_body(len(body))
        self._body.append(body)

    def _count_body(self, size: int) -> None:
        self._body_size += size
        if self._body_size > self.listener.max_body:
            raise Refused(413, "body_too_large", "request body exceeds "
                          f"SIDECAR_MAX_BODY_BYTES={self.listener.max_body}")

    def on_message_complete(self) -> None:
        if self._resume is not None:  # the body follows the upgrade's stop
            return
        self._in_body = False
        self.deadline = 0.0
        parser = self._parser
        body = self._body
        request = Request(
            parser.get_method() if self._method is None else self._method, b"".join(self._url),
            _VERSIONS.get(parser.get_http_version(), (1, 0)), self._headers,
            b"".join(self._forward) if self._connection is None else
            header_block(self._headers, REQUEST_DROP, self._connection),
            body[0] if len(body) == 1 else b"".join(body), self._keys, self._selector,
            self.connection_id, self._begun_at)
        self._queue.append((request, parser.should_keep_alive(), self._continue_sent))
        self._begin()
        if self.task is None:
            self._next()
        elif self.transport is not None:
            self.transport.pause_reading()  # pipelined: one waits, read no further

    # -- dispatch ----------------------------------------------------------------------
    def _next(self) -> None:
        request, keep_alive, self._continued = self._queue.popleft()
        self._response_reset(request.method == b"HEAD")
        self._version = request.version
        self.keep_alive = keep_alive and not self.listener.draining
        task = self.listener.start(self._serve(request))
        if not task.done():  # an eager task may have answered (and moved on) already
            self.task = task

    async def _serve(self, request: Request) -> None:
        # What follows an answer runs here, not in a done callback: one loop turn less.
        try:
            await self.listener.handle(request, self)
        except BaseException as exc:
            # Whatever ended the handler (a bug, a cancellation from inside), the app gets
            # a clear end: an error if nothing was sent yet, else an aborted connection.
            self.task = None
            self.source = None
            if not (self.closed and isinstance(exc, asyncio.CancelledError)):
                self._unanswered(exc)  # (else the app went away, which cancelled this)
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise
            return
        self.task = None
        self.source = None
        if self.closed:
            return
        if not self._answered:
            self._unanswered(None)
            return
        if not self.keep_alive or (self._unreadable and not self._queue):
            if self._half_closed and self.keep_alive and (self._in_head or self._in_body):
                self._refuse(_incomplete())  # what the half-close cut, behind this answer
                return
            self._close()
            return
        # A half-closed pipeline's next answer is watched for the peer's reset as this one
        # was (`timed_out`).
        self.deadline = time.monotonic() + (0.0 if self._half_closed else KEEPALIVE_S)
        if self._queue:
            self._next()
        elif self.transport is not None:
            self.transport.resume_reading()

    def _peer_reset(self) -> bool:
        """The peer answered our write with a reset (it had closed, not half-closed)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            return True

    def _unanswered(self, exc: BaseException | None) -> None:
        listener = self.listener
        listener.events.internal_error()
        listener.log_error(exc if exc is not None else
                           RuntimeError("the request handler returned without an answer"))
        self.keep_alive = False
        if not self.started:
            self.respond(500, error_body("internal error in the sidecar", "internal_error"))
        self.uncork()  # what the handler held back goes out before the close
        self._close()

    def _refuse(self, refused: Refused) -> None:
        if self.task is not None or self._queue:
            # Bytes after a request that asked to close, or garbage behind good requests:
            # answer what came whole, forward nothing more, then close (in `_serve`). The
            # parser stays failed, so later reads would refuse the same bytes again.
            if not self._refused_behind:
                self._refused_behind = True
                self.listener.events.refused(refused.status, refused.code)
            self._unreadable = True
            if self.transport is not None:
                self.transport.pause_reading()
            return
        # Framed for the refused request's own method, not the last answer's: a refused
        # HEAD gets the head alone (RFC 9110 §9.3.2), any other request its body.
        self.listener.events.refused(refused.status, refused.code)
        self._response_reset(self._refused_method() == b"HEAD")
        self.keep_alive = False
        self.respond(refused.status, error_body(str(refused), refused.code))
        self._close()

    def _refused_method(self) -> bytes | None:
        """The method of the request being read, once its request line got that far."""
        if self._method is not None:  # an upgrade's, read through a made-up head
            return self._method
        if not self._url:  # llhttp calls `on_url` only after the method
            return None
        try:
            return self._parser.get_method()
        except httptools.HttpParserError:
            return None

    def shut(self) -> None:
        """Close the connection now: the listener is shutting down."""
        self._close()

    def timed_out(self, now: float) -> None:
        """The sweep found a head that took too long, a body that stopped arriving, a
        keep-alive connection idle, or a half-closed one to look at."""
        if self.task is not None:
            if not self._half_closed:
                self.deadline = 0.0  # an answer is running: `_serve` sets the next deadline
            elif self._peer_reset():
                self._close()  # the app is gone: `connection_lost` cancels the task
            else:
                self.deadline = now + SWEEP_S
            return
        if self._in_head:
            self._refuse(Refused(408, "request_timeout", "request head not received within "
                                 f"{HEAD_TIMEOUT_S:.0f} s"))
        elif self._in_body:
            # Nothing was forwarded: a request goes upstream only once its body is whole.
            if self._body_size == self._body_seen:
                self._refuse(Refused(408, "request_timeout", "request body stalled: no "
                                     f"bytes for {BODY_IDLE_S:.0f} s"))
            elif now > self._body_since + BODY_GRACE_S + self._body_size / BODY_MIN_RATE:
                self._refuse(Refused(408, "request_timeout", "request body too slow: under "
                                     f"{BODY_MIN_RATE:.0f} bytes/s on average"))
            else:  # still arriving: look again later
                self._body_seen = self._body_size
                self.deadline = now + BODY_IDLE_S
        else:
            self._close()


class Listener:
    """The proxy listener: its connections, the head/keep-alive sweep, graceful drain."""

    def __init__(self, handle: Handler, session_header: str, max_body: int,
                 log_error: Callable[[BaseException], None], events: ListenerEvents,
                 watched: frozenset[bytes] = frozenset()) -> None:
        self.loop = asyncio.get_running_loop()
        self.handle = handle
        self.session_header = session_header.encode()
        # Session keys, parents and the end mark: kept for the exchange (sessionkeys.pick).
        self.watched = watched | {self.session_header}
        self.special = self.watched | {SELECTOR_HEADER, b"connection", b"expect",
                                       b"transfer-encoding", b"host"}
        self.max_body = max_body
        self.log_error = log_error
        self.events = events
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self._sweeper = self.loop.create_task(self._sweep_forever())

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A request's task. Where asyncio can (3.12+) it starts eagerly: the request runs
        up to its first real wait (the upstream's answer) inside this read, a loop turn
        and a scheduling round sooner."""
        if EAGER_TASKS:
            return asyncio.Task(coro, loop=self.loop, eager_start=True)  # type: ignore[call-arg]
        return self.loop.create_task(coro)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for conn in [c for c in self.connections if 0 < c.deadline < now]:
                conn.timed_out(now)

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let answers in flight finish (up to `grace_s`), close the rest."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        busy = []
        for conn in list(self.connections):
            if conn.task is None:
                conn.shut()
            else:
                conn.keep_alive = False
                busy.append(conn.task)
        if busy:
            await asyncio.wait(busy, timeout=grace_s)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn.shut()
        await cancel_and_wait((self._sweeper,))
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1)
