"""The seam between the request logic and an HTTP engine, shaped like httpx's transport:
an `Upstream` sends a request and answers a `Reply` (or an `Outcome`), a `Downstream` is
the app's side of one request. Only plain bytes and header lists cross it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from sidecar.dataplane.headers import Headers
from sidecar.policy.errors import Outcome


class Request:
    """One complete request from the app, body buffered (it is replayed on failover)."""

    __slots__ = ("body", "connection", "forward", "headers", "keys", "method", "received_at",
                 "selector", "target", "version")

    def __init__(self, method: bytes, target: bytes, version: tuple[int, int],
                 headers: Headers, forward: bytes, body: bytes,
                 keys: dict[bytes, bytes] | None,
                 selector: bytes | None, connection: str, received_at: float) -> None:
        self.method = method
        self.target = target  # path and query, as sent
        self.version = version
        self.headers = headers  # as received, names as sent
        self.forward = forward  # the header lines to send upstream (hop-by-hop dropped)
        self.body = body
        # Values of the session-key headers (lowercase name → first value), if any were sent
        self.keys = keys
        self.selector = selector
        self.connection = connection  # names the TCP connection (connection sessions)
        self.received_at = received_at  # perf_counter() when its first bytes were read


class Reply(Protocol):
    """An upstream's answer. Its body is pushed to one sink as it arrives."""

    status: int
    reason: bytes
    headers: Headers  # as received
    forward: bytes  # the header lines to send the app (hop-by-hop and framing dropped)
    event_stream: bool  # Content-Type: text/event-stream
    length: int | None  # Content-Length; None: chunked or close-delimited
    sent_at: float  # perf_counter() when the request was written
    arrived_at: float  # perf_counter() when its latest bytes were received

    def pipe(self, sink: Callable[[bytes], None]) -> Awaitable[Outcome | None]:
        """Deliver body chunks to `sink` (buffered ones first); resolves None when the body
        ended cleanly, else the Outcome that broke it."""
        ...

    async def read(self) -> bytes:
        """The whole body; raises `Broken` if it did not arrive whole."""
        ...

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def settle(self) -> None:
        """No first-byte deadline any more (the caller got what it waited for)."""
        ...
    def release(self) -> None:
        """Done with it: its connection is reused only if the body was complete."""
        ...


class Broken(Exception):
    """A body that did not arrive whole."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class Upstream(Protocol):
    async def send(self, base_url: str, method: bytes, target: bytes, headers: bytes,
                   body: bytes, deadline: float) -> Reply | Outcome:
        """Send once; return the reply once its head arrived, or why it did not (connect
        error or timeout, no head before `deadline`, connection lost)."""
        ...

    def in_use(self) -> int:
        """Connections currently leased to requests (0 when nothing is in flight)."""
        ...

    async def aclose(self) -> None: ...


class Downstream(Protocol):
    """The app's side of one request."""

    head_only: bool  # a HEAD request: the head is sent, a body never

    def start(self, status: int, reason: bytes, headers: bytes, length: int | None) -> None:
        ...
    def send(self, status: int, reason: bytes, headers: bytes, length: int | None,
             body: bytes) -> None:
        """A whole answer at once (start + write + end in one write)."""
        ...
    def write(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def abort(self) -> None:
        """End visibly incomplete: no terminating chunk, the connection closed."""
        ...
    def respond(self, status: int, body: bytes, headers: bytes = b"") -> None:
        """A whole response of the sidecar's own (JSON errors, /v1/models)."""
        ...
    def cork(self) -> None:
        """Hold writes until `uncork` (or the end): what is at hand leaves in one write."""
        ...
    def uncork(self) -> None: ...
    def follow(self, reply: Reply | None) -> None:
        """Pause `reply` while the app reads slower than it arrives."""
        ...
