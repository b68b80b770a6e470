"""A response body on its way to the app: the SSE preamble held until the first content,
then every chunk tallied (tokens, time to first token, inter-token gaps) and, for resumable
chat streams, passed through the transcript and the continuation's frame rewriter."""

from __future__ import annotations

import asyncio
from time import perf_counter

from sidecar.dataplane.events import Events
from sidecar.dataplane.resume import ContinuationFrames, Transcript
from sidecar.dataplane.seam import Downstream
from sidecar.dataplane.sse import MAX_HELD_BYTES, first_content
from sidecar.dataplane.usage import usage_in
from sidecar.policy.errors import error_body

BROKEN_EVENT = b"data: " + error_body("the upstream broke mid-stream; the answer is incomplete",
                                      "upstream_broken_mid_stream") + b"\n\n"


class Preamble:
    """Sink for a stream's first bytes: ready at the first content frame (any first bytes
    when the stream is not SSE), at the end, or when too much preamble piled up. Whatever
    arrives after that is kept for the relay."""

    __slots__ = ("_buffer", "_scanned", "ready", "sse")

    def __init__(self, loop: asyncio.AbstractEventLoop, sse: bool) -> None:
        self.ready: asyncio.Future[None] = loop.create_future()
        self.sse = sse
        self._buffer = b""
        self._scanned = 0  # complete preamble frames end here

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if self.ready.done():
            return
        if self.sse:
            content, self._scanned = first_content(self._buffer, self._scanned)
            if content < 0 and len(self._buffer) <= MAX_HELD_BYTES:
                return
        self.ready.set_result(None)

    def ended(self, _: object) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def take(self) -> bytes:
        held, self._buffer = self._buffer, b""
        return held


class Relay:
    """The sink of one response body (every source of it, resumes included)."""

    __slots__ = ("completion_frames", "down", "events", "first_content", "frames",
                 "last_content", "model", "pool", "started", "transcript", "usage")

    def __init__(self, down: Downstream, events: Events, pool: str, model: str,
                 started: float, transcript: Transcript | None) -> None:
        self.down = down
        self.events = events
        self.pool = pool
        self.model = model
        self.started = started
        self.transcript = transcript
        self.frames: ContinuationFrames | None = None  # set once the stream was resumed
        self.usage: tuple[int, int] | None = None  # (prompt, completion) as reported
        self.completion_frames = 0  # streamed content frames: the estimate without usage
        self.first_content = 0.0
        self.last_content = 0.0

    def feed(self, chunk: bytes) -> None:
        # A find in C per content key; no JSON parsing on the stream path.
        content = _content_frames(chunk)
        if content:
            self._timing(content)
        if b'"usage"' in chunk:
            self.usage = usage_in(chunk) or self.usage
        if self.frames is None and self.transcript is None:
            self.down.write(chunk)
            return
        if self.frames is not None:
            chunk = self.frames.feed(chunk)
        if self.transcript is not None:
            chunk = self.transcript.feed(chunk)
        if chunk:
            self.down.write(chunk)

    def _timing(self, content: int) -> None:
        now = perf_counter()
        if not self.first_content:
            self.first_content = now
            self.events.content(self.pool, self.model, now - self.started)
        self.completion_frames += content
        self.last_content = now

    def inter_token_s(self) -> float | None:
        """The stream's mean gap between content events (time per output token): one
        sample per stream, not one per event, keeps the relay's per-chunk work small."""
        if self.completion_frames < 2:
            return None
        return (self.last_content - self.first_content) / (self.completion_frames - 1)

    def finish(self) -> None:
        """The upstream ended cleanly."""
        if self.transcript is not None and (rest := self.transcript.flush()):
            self.down.write(rest)
        self.down.end()

    def end_broken(self, sse: bool) -> None:
        """Bytes already reached the app: end visibly incomplete, never like an answer."""
        if sse:
            # The OpenAI SDKs raise on an event whose data carries "error".
            self.down.write(BROKEN_EVENT)
        self.down.abort()

    def generation_s(self) -> float | None:
        if not self.first_content or self.last_content <= self.first_content:
            return None
        return self.last_content - self.first_content

    def tokens(self, prompt_bytes: int) -> tuple[int, int]:
        """Reported usage, else an estimate (~4 bytes per token of request, a token per
        streamed content frame)."""
        if self.usage is not None:
            return self.usage
        return prompt_bytes // 4, self.completion_frames


# A role-only delta carries no token: vLLM sends `"content":""`, llama.cpp `"content":null`.
# Counting them as content would put the first token's time at the preamble and add a token
# to every estimate. Text is always a JSON string, so counting string values that are not
# empty skips both in two scans (JSON written with a space after the colon, as Python's
# json module does, is counted the same way when it has no compact key at all).
_TEXT, _EMPTY = b'"content":"', b'"content":""'
_SPACED_TEXT, _SPACED_EMPTY = b'"content": "', b'"content": ""'


def _content_frames(chunk: bytes) -> int:
    """How many `"content":` values in `chunk` carry text (not null, not empty)."""
    found = chunk.count(_TEXT)
    if found:
        return found - chunk.count(_EMPTY)
    found = chunk.count(_SPACED_TEXT)
    return found - chunk.count(_SPACED_EMPTY) if found else 0
