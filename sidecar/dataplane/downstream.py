"""The app's side of one answer, written on the client connection's transport: framing
chosen per answer (Content-Length, chunked, or close-delimited for HTTP/1.0), a cork that
sends what is at hand in one write, and flow control that pauses the upstream while the app
reads slowly. It is the `Downstream` of seam.py."""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus

from sidecar.dataplane.flow import BODYLESS
from sidecar.dataplane.seam import Reply

CLOSE = b"Connection: close\r\n"
# RFC 9112 §9.3: an HTTP/1.0 client keeps the connection only when the answer says so.
KEEP_ALIVE_1_0 = b"Connection: keep-alive\r\n"
# Every answer says how often the call was sent upstream; the listener's own (a refused
# request, an internal error) sent it nowhere.
ATTEMPTS = b"x-sidecar-attempts:"
NOT_SENT = b"x-sidecar-attempts: 0\r\n"


def status_line(status: int, reason: bytes = b"") -> bytes:
    if not reason:
        with contextlib.suppress(ValueError):
            reason = HTTPStatus(status).phrase.encode()
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


class ResponseWriter:
    """Mixed into the client connection, which holds these attributes in its slots."""

    __slots__ = ()
    transport: asyncio.Transport | None
    closed: bool
    head_only: bool
    keep_alive: bool
    started: bool
    source: Reply | None
    _version: tuple[int, int]
    _answered: bool  # the answer was written whole, or the connection aborted
    _chunked: bool
    _close_delimited: bool
    _corked: list[bytes] | None

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _response_reset(self, head_only: bool) -> None:
        self.head_only = head_only
        self.started = False
        self._answered = False
        self._corked: list[bytes] | None = None
        self._chunked = False
        self._close_delimited = False
        self.keep_alive = True

    def start(self, status: int, reason: bytes, headers: bytes, length: int | None,
              body: bytes = b"") -> None:
        self.started = True
        if status < 200 or status in BODYLESS:  # flow.has_body, inline: once per answer
            framing = b""
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.head_only:
            framing = b""
        elif self._version >= (1, 1):
            self._chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            self._close_delimited = True  # HTTP/1.0: the close ends the body
            self.keep_alive = False
            framing = b""
        if not self.keep_alive:
            framing += CLOSE
        elif self._version < (1, 1):
            framing += KEEP_ALIVE_1_0
        if self.transport is not None and not self.closed:
            self._write_head(b"%s%s%s\r\n" % (status_line(status, reason), headers, framing),
                             body)

    def send(self, status: int, reason: bytes, headers: bytes, length: int | None,
             body: bytes) -> None:
        self._answered = True
        self.start(status, reason, headers, length, body)

    def write(self, data: bytes) -> None:
        if not data or self.head_only or self.closed:
            return
        transport = self.transport
        assert transport is not None
        if self._chunked:
            size = len(data)
            if size < 16384:  # an SSE event: one small copy beats three buffers
                self._out(b"%x\r\n%s\r\n" % (size, data))
            else:
                self._out(b"%x\r\n" % size)
                self._out(data)
                self._out(b"\r\n")
        else:
            self._out(data)

    def end(self) -> None:
        self._answered = True
        if self.closed:
            return
        if self._chunked and not self.head_only:
            self._out(b"0\r\n\r\n")
        self.uncork()
        if self._close_delimited:
            self._close()

    def abort(self) -> None:
        self._answered = True
        self.keep_alive = False
        self.uncork()
        self._close()

    def respond(self, status: int, body: bytes, headers: bytes = b"") -> None:
        if ATTEMPTS not in headers:
            headers += NOT_SENT
        self.started = True
        self._answered = True
        close = (CLOSE if not self.keep_alive else
                 KEEP_ALIVE_1_0 if self._version < (1, 1) else b"")
        if self.transport is not None and not self.closed:
            self._write_head(b"%sContent-Type: application/json\r\n%sContent-Length: %d\r\n"
                             b"%s\r\n" % (status_line(status), headers, len(body), close), body)

    def _write_head(self, head: bytes, body: bytes) -> None:
        """One write (one syscall) for a head and, when it is whole, its body. Never an
        empty buffer: asyncio on 3.13 then never calls connection_lost after a close."""
        if not body or self.head_only:
            self._out(head)
        elif self._corked is not None:
            self._corked += (head, body)
        else:
            assert self.transport is not None
            self.transport.writelines((head, body))

    def _out(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        else:
            assert self.transport is not None
            self.transport.write(data)

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked, self._corked = self._corked, None
        if corked and self.transport is not None and not self.closed:
            if len(corked) == 1:
                self.transport.write(corked[0])
            else:
                self.transport.writelines(corked)

    def follow(self, reply: Reply | None) -> None:
        self.source = reply
