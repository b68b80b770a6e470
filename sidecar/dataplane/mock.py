"""An in-memory `Upstream` (seam.py) for testing the request logic without sockets, in the
manner of httpx's `MockTransport`: each send is answered from a script per endpoint URL or
by a handler, with a canned `MockReply` or the `Outcome` of a failed attempt."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from sidecar.dataplane.headers import Headers
from sidecar.dataplane.seam import Broken
from sidecar.policy.errors import Outcome


class MockReply:
    """A canned answer: `body` whole (Content-Length), or `chunks` as a stream that ends
    cleanly or, with `broken`, breaks after them. Counts its releases."""

    def __init__(self, status: int = 200, body: bytes = b"{}", *,
                 headers: Headers | None = None, chunks: Sequence[bytes] | None = None,
                 broken: Outcome | None = None) -> None:
        self.status = status
        self.reason = b""
        self.headers: Headers = list(headers) if headers is not None else [
            (b"Content-Type", b"application/json")]
        self.forward = b"".join(b"%s: %s\r\n" % pair for pair in self.headers)
        self.event_stream = any(name.lower() == b"content-type" and
                                value.startswith(b"text/event-stream")
                                for name, value in self.headers)
        self.chunks = list(chunks) if chunks is not None else [body]
        self.length: int | None = len(body) if chunks is None else None
        if self.length is not None:
            self.headers.append((b"Content-Length", b"%d" % self.length))
        self.broken = broken
        self.released = 0
        self.paused = False
        self.sent_at = self.arrived_at = 0.0

    def pipe(self, sink: Callable[[bytes], None]) -> asyncio.Future[Outcome | None]:
        for chunk in self.chunks:
            sink(chunk)
        done: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        done.set_result(self.broken)
        return done

    async def read(self) -> bytes:
        if self.broken is not None:
            raise Broken(self.broken)
        return b"".join(self.chunks)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def settle(self) -> None:
        pass

    def release(self) -> None:
        self.released += 1


class Sent:
    """One request as the mock upstream received it."""

    __slots__ = ("base_url", "body", "headers", "method", "target")

    def __init__(self, base_url: str, method: bytes, target: bytes, headers: bytes,
                 body: bytes) -> None:
        self.base_url = base_url
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body


# What a send is answered with: a status (a JSON `{}` answer), a canned reply, or why the
# attempt failed.
Answer = int | MockReply | Outcome
Handler = Callable[[Sent], Answer]


class MockUpstream:
    """Answers each send with the next entry of `script[base_url]`, or `handler(sent)`."""

    def __init__(self, script: dict[str, list[Answer]] | None = None,
                 handler: Handler | None = None) -> None:
        self.script = script if script is not None else {}
        self.handler = handler
        self.received: list[Sent] = []
        self.replies: list[MockReply] = []

    @property
    def sent(self) -> list[str]:
        """The endpoint of every send, in order."""
        return [s.base_url for s in self.received]

    async def send(self, base_url: str, method: bytes, target: bytes, headers: bytes,
                   body: bytes, deadline: float) -> MockReply | Outcome:
        sent = Sent(base_url, method, target, headers, body)
        self.received.append(sent)
        answer = self.script[base_url].pop(0) if self.script.get(base_url) else self._handle(sent)
        if isinstance(answer, Outcome):
            return answer
        reply = MockReply(answer) if isinstance(answer, int) else answer
        self.replies.append(reply)
        return reply

    def _handle(self, sent: Sent) -> Answer:
        if self.handler is None:
            raise AssertionError(f"no answer scripted for {sent.base_url}")
        return self.handler(sent)

    def in_use(self) -> int:
        return sum(1 for reply in self.replies if not reply.released)

    async def aclose(self) -> None:
        pass
