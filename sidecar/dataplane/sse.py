"""Server-sent events: telling a stream's preamble from its content.

A chat stream usually opens with frames that carry no generated text (the role-only first
delta, keep-alive comments). Holding those back until the first content frame arrives means
a failure during prefill has sent the app nothing yet, so it can still be retried on another
endpoint. Only frames before the first content are parsed; the rest pass through untouched.
"""

from __future__ import annotations

from typing import Any

import orjson

# A preamble larger than this is sent on rather than held (it is not a preamble any more).
MAX_HELD_BYTES = 64 * 1024
_CONTENT_KEYS = ("content", "tool_calls", "function_call", "reasoning_content", "refusal")


def split_frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete frames (each with its blank-line terminator) and the incomplete rest."""
    frames = []
    start = 0
    while True:
        end = buffer.find(b"\n\n", start)
        end_crlf = buffer.find(b"\r\n\r\n", start)
        if end == -1 and end_crlf == -1:
            return frames, buffer[start:]
        crlf_first = end_crlf != -1 and (end == -1 or end_crlf < end)
        stop = end_crlf + 4 if crlf_first else end + 2
        frames.append(buffer[start:stop])
        start = stop


def frame_end(buffer: bytes, start: int = 0) -> int:
    """Where the frame beginning at `start` ends (after its blank line), or -1."""
    end = buffer.find(b"\n\n", start)
    end_crlf = buffer.find(b"\r\n\r\n", start)
    if end_crlf != -1 and (end == -1 or end_crlf < end):
        return end_crlf + 4
    return end + 2 if end != -1 else -1


def first_content(buffer: bytes, start: int = 0) -> tuple[int, int]:
    """Where the first frame that carries something starts, scanning complete frames from
    `start` (-1: none yet), and where the scan stopped. Frames after it are not even
    split: the whole point is to stop at the first content."""
    while (end := frame_end(buffer, start)) != -1:
        if not is_preamble(buffer[start:end]):
            return start, end
        start = end
    return -1, start


def is_preamble(frame: bytes) -> bool:
    """True for a frame that carries nothing generated: comments, role-only deltas."""
    data = []
    for line in frame.splitlines():
        if not line or line.startswith(b":"):
            continue  # blank line or comment (keep-alive)
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif not line.startswith((b"event:", b"id:", b"retry:")):
            return False
    if not data:
        return True
    try:
        event = orjson.loads(b"\n".join(data))
    except orjson.JSONDecodeError:
        return False  # e.g. [DONE]: the end, not a preamble
    return _carries_nothing(event)


def _carries_nothing(event: Any) -> bool:
    if not isinstance(event, dict) or "error" in event or event.get("usage"):
        return False
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        if choice.get("text"):
            return False
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(key) for key in _CONTENT_KEYS):
            return False
    return True
