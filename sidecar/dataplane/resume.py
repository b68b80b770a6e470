"""Mid-stream resume for chat completion streams (opt-in per pool: `"resume": true`).

While a resumable stream is relayed, only complete SSE frames are forwarded and their bytes
are kept (bounded); nothing is parsed on that path. If the upstream breaks after content
reached the app, the transcript is parsed once and the conversation is re-sent to another
endpoint of the pool with the answer so far as a partial assistant message
(`continue_final_message`, as vLLM's OpenAI server accepts). The continuation's preamble is
dropped and its frames carry the original stream's `id` and `created`, so the app sees one
uninterrupted answer.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.dataplane.sse import is_preamble, split_frames

# Past this much forwarded text a stream is relayed plainly (no resume): bounded memory.
MAX_TRANSCRIPT_BYTES = 1024 * 1024


class Transcript:
    """The frames forwarded to the app so far; holds back an incomplete trailing frame."""

    __slots__ = ("_frames", "_pending", "_size", "finished", "overflowed")

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._pending = b""
        self._size = 0
        self.overflowed = False
        self.finished = False  # a frame with a finish_reason was forwarded

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now: every complete frame (all of it, once overflowed)."""
        if self.overflowed:
            return data
        data = self._pending + data
        cut = max(data.rfind(b"\n\n") + 2, data.rfind(b"\r\n\r\n") + 4, 0)
        ready, self._pending = data[:cut], data[cut:]
        if ready:
            if b'"finish_reason":"' in ready or b'"finish_reason": "' in ready:
                self.finished = True
            self._frames.append(ready)
            self._size += len(ready)
            if self._size > MAX_TRANSCRIPT_BYTES:
                self.overflowed = True
                self._frames.clear()
                ready, self._pending = ready + self._pending, b""
        return ready

    def flush(self) -> bytes:
        """At the upstream's clean end: an incomplete trailing frame, forwarded as it is."""
        rest, self._pending = self._pending, b""
        return rest

    def answer(self) -> tuple[str, int, Any, Any] | None:
        """(text so far, content frames, id, created) of the forwarded chat stream."""
        if self.overflowed:
            return None
        frames, _ = split_frames(b"".join(self._frames))
        text: list[str] = []
        content_frames = 0
        stream_id = created = None
        for frame in frames:
            for line in frame.splitlines():
                if not line.startswith(b"data:"):
                    continue
                try:
                    event = orjson.loads(line[5:].strip())
                except orjson.JSONDecodeError:
                    return None  # [DONE] or something we do not understand: no resume
                if not isinstance(event, dict) or "error" in event:
                    return None
                stream_id = event.get("id", stream_id)
                created = event.get("created", created)
                for choice in event.get("choices") or []:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        return None  # n > 1 is not resumed
                    if choice.get("finish_reason") is not None:
                        return None  # the answer was complete
                    delta = choice.get("delta") or {}
                    if delta.get("tool_calls") or delta.get("function_call"):
                        return None
                    piece = delta.get("content")
                    if piece:
                        text.append(piece)
                        content_frames += 1
        if not text:
            return None
        return "".join(text), content_frames, stream_id, created


def continuation(payload: bytes, text: str, content_frames: int) -> bytes | None:
    """The request that continues the answer `text` from where it broke."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or body.get("n", 1) != 1:
        return None
    body["messages"] = [*messages, {"role": "assistant", "content": text}]
    body["continue_final_message"] = True
    body["add_generation_prompt"] = False
    # One content frame is about one token; what is left of the app's token limit.
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            body[key] = max(1, limit - content_frames)
    return orjson.dumps(body)


class ContinuationFrames:
    """Turns the continuation's stream into frames of the original one."""

    __slots__ = ("_created", "_id", "_pending", "_started")

    def __init__(self, stream_id: Any, created: Any) -> None:
        self._id = stream_id
        self._created = created
        self._pending = b""
        self._started = False

    def feed(self, data: bytes) -> bytes:
        frames, self._pending = split_frames(self._pending + data)
        out = []
        for frame in frames:
            if not self._started and is_preamble(frame):
                continue  # the app already had a role frame
            self._started = True
            out.append(self._rewrite(frame))
        return b"".join(out)

    def _rewrite(self, frame: bytes) -> bytes:
        body = frame.strip()
        if not body.startswith(b"data:"):
            return frame
        try:
            event = orjson.loads(body[5:].strip())
        except orjson.JSONDecodeError:
            return frame  # [DONE]
        if isinstance(event, dict):
            if self._id is not None:
                event["id"] = self._id
            if self._created is not None:
                event["created"] = self._created
        return b"data: " + orjson.dumps(event) + b"\n\n"
