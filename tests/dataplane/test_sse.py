"""Telling an SSE stream's preamble from its content."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from sidecar.dataplane.sse import first_content, is_preamble, split_frames


def frame(event: object) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_role_only_first_delta_and_comments_are_preamble():
    assert is_preamble(frame(chunk({"role": "assistant", "content": ""})))
    assert is_preamble(frame(chunk({"role": "assistant"})))
    assert is_preamble(b": keep-alive\n\n")
    assert is_preamble(b"event: message\n\n")


def test_anything_generated_is_content():
    assert not is_preamble(frame(chunk({"content": "Hi"})))
    assert not is_preamble(frame(chunk({"tool_calls": [{"index": 0}]})))
    assert not is_preamble(frame(chunk({"reasoning_content": "hmm"})))
    assert not is_preamble(frame(chunk({}, finish="stop")))
    assert not is_preamble(frame({"choices": [{"index": 0, "text": "Hi",
                                               "finish_reason": None}]}))
    assert not is_preamble(frame({"choices": [], "usage": {"total_tokens": 3}}))
    assert not is_preamble(frame({"error": {"message": "x"}}))
    assert not is_preamble(b"data: [DONE]\n\n")
    assert not is_preamble(b"data: not json\n\n")


def test_split_frames_keeps_terminators_and_the_incomplete_rest():
    frames, rest = split_frames(b"data: a\n\ndata: b\r\n\r\ndata: c")
    assert frames == [b"data: a\n\n", b"data: b\r\n\r\n"]
    assert rest == b"data: c"


@given(st.lists(st.binary(min_size=1, max_size=40).filter(
    lambda b: b"\n\n" not in b and b"\r\n\r\n" not in b and not b.endswith(b"\n")
    and not b.endswith(b"\r") and not b.startswith(b"\n")), max_size=8),
    st.integers(min_value=1, max_value=17))
def test_split_frames_in_any_chunking_gives_the_same_frames(bodies, size):
    stream = b"".join(b + b"\n\n" for b in bodies)
    whole, rest = split_frames(stream)
    assert rest == b""
    pending = b""
    pieces = []
    for i in range(0, len(stream), size):
        frames, pending = split_frames(pending + stream[i:i + size])
        pieces.extend(frames)
    assert pieces == whole
    assert b"".join(pieces) == stream


FRAMES = [b": keep-alive\n\n", b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
          b'data: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\n', b"data: [DONE]\n\n"]


@given(st.lists(st.sampled_from(FRAMES), max_size=8))
def test_first_content_agrees_with_splitting_every_frame(frames):
    stream = b"".join(frames)
    whole, _ = split_frames(stream)
    at, _ = first_content(stream)
    expected = next((sum(map(len, whole[:i])) for i, f in enumerate(whole)
                     if not is_preamble(f)), -1)
    assert at == expected
