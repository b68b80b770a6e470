"""Mid-stream resume: a chat stream that breaks after content continues on another endpoint
of the pool, and the app sees one complete answer, exactly once."""

from __future__ import annotations

import json

import openai
import orjson

from sidecar.dataplane.resume import (
    MAX_TRANSCRIPT_BYTES,
    ContinuationFrames,
    Transcript,
    continuation,
)
from tests.conftest import CHAT, base, chat, pool


def frame(delta: dict, finish: str | None = None, sid: str = "chatcmpl-1") -> bytes:
    return b"data: " + orjson.dumps({"id": sid, "created": 5, "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def test_transcript_forwards_only_complete_frames():
    t = Transcript()
    one, two = frame({"role": "assistant", "content": ""}), frame({"content": "Hel"})
    assert t.feed(one + two[:7]) == one
    assert t.feed(two[7:]) == two
    assert t.answer() == ("Hel", 1, "chatcmpl-1", 5)
    assert t.flush() == b""


def test_transcript_refuses_to_resume_a_finished_or_odd_stream():
    finished = Transcript()
    finished.feed(frame({"content": "x"}) + frame({}, finish="stop"))
    assert finished.answer() is None
    tools = Transcript()
    tools.feed(frame({"tool_calls": [{"index": 0}]}))
    assert tools.answer() is None
    big = Transcript()
    chunk = frame({"content": "y" * 1000})
    for _ in range(MAX_TRANSCRIPT_BYTES // len(chunk) + 2):
        assert big.feed(chunk)
    assert big.overflowed and big.answer() is None


def test_continuation_appends_the_partial_answer_and_shrinks_the_limit():
    body = orjson.loads(continuation(orjson.dumps({**CHAT, "max_tokens": 20}), "tok0 tok1 ", 2))
    assert body["messages"][-1] == {"role": "assistant", "content": "tok0 tok1 "}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_tokens"] == 18
    assert continuation(b"not json", "x", 1) is None
    assert continuation(orjson.dumps({**CHAT, "n": 2}), "x", 1) is None


def test_continuation_frames_drop_the_preamble_and_keep_the_stream_id():
    frames = ContinuationFrames("chatcmpl-1", 5)
    out = frames.feed(frame({"role": "assistant", "content": ""}, sid="other")
                      + frame({"content": "lo"}, sid="other") + b"data: [DONE]\n\n")
    events = [e for e in out.split(b"\n\n") if e]
    assert len(events) == 2 and events[-1] == b"data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["id"] == "chatcmpl-1" and first["created"] == 5
    assert first["choices"][0]["delta"] == {"content": "lo"}


async def test_a_stream_broken_after_10_chunks_resumes_exactly_once(pods, sidecar, http):
    a, b = await pods(2, max_tokens=20)
    running = await sidecar({"small": pool([a, b], resume=True)})
    status, headers, whole = await chat(http, running, "resume", {**CHAT, "max_tokens": 20})
    assert status == 200
    expected = whole["choices"][0]["message"]["content"]
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    first.fake.behaviour.update({"drop_after_chunks": 11, "drop_next": 1})  # role + 10
    async with http.post(base(running) + "/v1/chat/completions",
                         json={**CHAT, "max_tokens": 20, "stream": True},
                         headers={"x-session-id": "resume"}) as r:
        raw = await r.read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected, "the complete answer, no duplicated or missing text"
    assert sum("role" in c["choices"][0]["delta"] for c in chunks if c["choices"]) == 1
    assert len({c["id"] for c in chunks}) == 1, "one stream id throughout"
    assert first.fake.counters.dropped_streams == 1
    assert other.fake.last_request["continue_final_message"] is True
    assert other.fake.last_request["max_tokens"] == 10
    counters = running.sidecar.proxy.counters
    assert counters.resumes == 1 and counters.broken_streams == 1
    # The session now lives on the endpoint that finished the answer.
    _, headers, _ = await chat(http, running, "resume")
    assert headers["x-sidecar-endpoint"] == other.url


async def test_the_openai_sdk_sees_one_answer_even_when_the_continuation_breaks_too(
        pods, sidecar):
    a, b = await pods(2, max_tokens=12)
    running = await sidecar({"small": pool([a, b], resume=True)})
    # Each pod breaks its next stream after 6 frames: the answer is resumed twice.
    for pod in (a, b):
        pod.fake.behaviour.update({"drop_after_chunks": 6, "drop_next": 1})
    client = openai.AsyncOpenAI(base_url=base(running) + "/v1", api_key="x", max_retries=0,
                                default_headers={"x-session-id": "sdk-resume"})
    try:
        stream = await client.chat.completions.create(
            model="small-model", messages=CHAT["messages"], stream=True, max_tokens=12)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    finally:
        await client.close()
    words = text.split()
    assert len(words) == 12 and words[1:] == [f"tok{i}" for i in range(1, 12)]
    assert running.sidecar.proxy.counters.resumes == 2
    assert a.fake.counters.dropped_streams == b.fake.counters.dropped_streams == 1


async def test_without_resume_the_break_stays_visible(pods, sidecar, http):
    a, b = await pods(2, max_tokens=20)
    running = await sidecar({"small": pool([a, b])})
    for pod in (a, b):
        pod.fake.behaviour.update({"drop_after_chunks": 11, "drop_next": 1})
    try:
        async with http.post(base(running) + "/v1/chat/completions",
                             json={**CHAT, "stream": True}, headers={"x-session-id": "x"}) as r:
            raw = await r.read()
    except Exception:  # the aborted connection
        raw = b""
    assert b"[DONE]" not in raw
    assert running.sidecar.proxy.counters.resumes == 0
