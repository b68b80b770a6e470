"""The request logic under upstream faults, on real sockets: what a retry or a resume sends,
to whom, and how many times each pod is asked (fake-llm pods count their requests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct

import aiohttp
import pytest

from tests.conftest import CHAT, base, chat, dead_url, pool
from tests.support.polling import until
from tests.support.raw_http import Message
from tests.support.raw_peers import Client, Conn, always, upstream_factory

POOL_KEY = "sk-pool-key-0123456789"


async def test_a_resumed_stream_carries_the_pools_key_never_the_apps(pods, sidecar, http,
                                                                     monkeypatch):
    a, b = await pods(2, max_tokens=20)
    monkeypatch.setenv("TEST_POOL_KEY", POOL_KEY)
    running = await sidecar({"keyed": pool([a, b], resume=True, api_key_env="TEST_POOL_KEY")},
                            TEST_POOL_KEY=POOL_KEY)
    status, headers, _ = await chat(http, running, "keyed", Authorization="Bearer app-token")
    assert status == 200
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    assert first.fake.last_headers["Authorization"] == f"Bearer {POOL_KEY}"
    first.fake.behaviour.update({"drop_after_chunks": 6, "drop_next": 1})  # dies mid-stream
    before = other.requests
    async with http.post(base(running) + "/v1/chat/completions",
                         json={**CHAT, "max_tokens": 20, "stream": True},
                         headers={"x-session-id": "keyed",
                                  "Authorization": "Bearer app-token"}) as r:
        raw = await r.read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]", raw[-300:]
    assert other.requests == before + 1, "the continuation went to the other pod"
    assert other.fake.last_request is not None
    assert other.fake.last_request["continue_final_message"] is True
    assert other.fake.last_headers["Authorization"] == f"Bearer {POOL_KEY}"
    assert "app-token" not in json.dumps(other.fake.last_headers)
    assert running.sidecar.proxy.counters.resumes == 1


def starting_on(running, url: str, prefix: str) -> str:
    """A session id whose rendezvous choice in pool `small` is the endpoint at `url`."""
    pool_ = running.sidecar.pools.pools["small"]
    return next(s for s in (f"{prefix}-{i}" for i in range(200))
                if pool_.ranked(s.encode())[0].url == url)


async def test_a_slow_non_streamed_call_on_a_live_pod_is_sent_once_and_answered(
        pods, sidecar, http):
    # The whole answer takes longer than the streams' first-content budget: a model server
    # sends a non-streamed answer's head only when all of it is ready.
    a, b = await pods(2, ttft_ms=1200)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_FIRST_BYTE_TIMEOUT_S="0.3")
    status, headers, body = await chat(http, running, "long-generation")
    assert status == 200, body
    assert headers["x-sidecar-attempts"] == "1"
    assert a.requests + b.requests == 1, "one generation, not one per attempt"
    assert a.fake.counters.cancelled + b.fake.counters.cancelled == 0


@pytest.mark.parametrize("extra", [
    {"metadata": {"stream": True}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"stream": True}}}}]},
], ids=["metadata", "tool-schema"])
async def test_a_nested_stream_key_leaves_a_call_non_streamed_with_its_long_deadline(
        pods, sidecar, http, extra):
    # Only the top-level `stream` asks for a stream: a nested one read as it would give the
    # call the streams' first-content deadline, and its slow whole answer a 504.
    a, = await pods(1, ttft_ms=1200)
    running = await sidecar({"small": pool([a])}, SIDECAR_FIRST_BYTE_TIMEOUT_S="0.3")
    status, headers, body = await chat(http, running, "nested-stream", {**CHAT, **extra})
    assert status == 200, body
    assert headers["x-sidecar-attempts"] == "1"


async def test_a_slow_first_token_past_the_deadline_is_a_504_never_a_second_generation(
        pods, sidecar, http):
    a, b = await pods(2, ttft_ms=3000)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_FIRST_BYTE_TIMEOUT_S="0.3")
    async with http.post(base(running) + "/v1/chat/completions",
                         json={**CHAT, "stream": True},
                         headers={"x-session-id": "slow-stream"}) as r:
        assert r.status == 504
        assert r.headers["x-sidecar-attempts"] == "1"
        error = (await r.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "SIDECAR_FIRST_BYTE_TIMEOUT_S" in error["message"]
    assert a.requests + b.requests == 1, "the work was not started over elsewhere"
    slow = a if a.requests else b
    # The sidecar hung up, so the engine stops generating for nobody.
    await until(lambda: slow.fake.counters.cancelled == 1)
    assert all(e.outlier.consecutive_failures == 0 for e in running.sidecar.pools.all_endpoints())


async def test_a_non_streamed_call_past_the_response_deadline_is_closed_and_not_retried(
        pods, sidecar, http):
    a, b = await pods(2, ttft_ms=3000)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_RESPONSE_TIMEOUT_S="0.3")
    status, headers, body = await chat(http, running, "too-long")
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert "SIDECAR_RESPONSE_TIMEOUT_S=0.3" in body["error"]["message"]
    assert headers["x-sidecar-attempts"] == "1"
    assert a.requests + b.requests == 1
    slow = a if a.requests else b
    await until(lambda: slow.fake.counters.cancelled == 1)


async def test_a_refused_pod_then_a_good_one_is_two_attempts(pods, sidecar, http):
    [good] = await pods(1)
    dead = dead_url()
    running = await sidecar({"small": {"model": "m", "endpoints": [dead, good.url]}})
    session = starting_on(running, dead, "refused")
    status, headers, _ = await chat(http, running, session)
    assert status == 200 and headers["x-sidecar-endpoint"] == good.url
    assert headers["x-sidecar-attempts"] == "2"
    assert good.requests == 1


async def test_a_pod_that_resets_after_reading_the_request_is_known_dead_and_retried(
        pods, sidecar, http):
    async def reset(conn: Conn, request: Message) -> bool:
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()  # an RST: the pod died holding the request
        return False

    [good] = await pods(1)
    async with upstream_factory() as upstreams:
        resetter = await upstreams(reset)
        running = await sidecar({"small": {"model": "m",
                                           "endpoints": [resetter.url, good.url]}})
        session = starting_on(running, resetter.url, "reset")
        status, headers, _ = await chat(http, running, session)
        assert status == 200 and headers["x-sidecar-endpoint"] == good.url
        assert headers["x-sidecar-attempts"] == "2"
        assert len(resetter.requests) == 1 and good.requests == 1


async def test_a_declined_call_moves_on_and_a_failed_one_is_passed_through(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])})
    session = starting_on(running, a.url, "declined")
    a.fake.behaviour.update({"fail_next": 1, "fail_status": 429})
    status, headers, _ = await chat(http, running, session)
    assert status == 200 and headers["x-sidecar-attempts"] == "2"
    assert (a.requests, b.requests) == (1, 1)
    session = starting_on(running, b.url, "failed")
    b.fake.behaviour.update({"fail_next": 1, "fail_status": 500})
    status, headers, body = await chat(http, running, session)
    assert status == 500 and body["error"]["code"] == "injected"
    assert headers["x-sidecar-attempts"] == "1"
    assert (a.requests, b.requests) == (1, 2), "the pod did the work: nobody does it again"


async def test_the_sidecars_own_answers_say_how_many_sends_they_made(sidecar, http):
    dead = [dead_url(), dead_url()]
    running = await sidecar({"small": {"model": "m", "endpoints": dead}})
    status, headers, _ = await chat(http, running, "nobody-home")
    assert status == 503 and headers["x-sidecar-attempts"] == "2"
    status, headers, _ = await chat(http, running, "x" * 300)  # too long
    assert status == 400 and headers["x-sidecar-attempts"] == "0"


async def test_a_pod_silent_after_its_head_is_not_mistaken_for_a_dead_one(pods, sidecar, http):
    """A head at once, then nothing: the sidecar hangs up on a live pod at the stream idle
    timeout. That is the sidecar's doing, not the pod dying: no other pod starts over."""
    async def head_then_silence(conn: Conn, request: Message) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(10)
        return False

    [good] = await pods(1)
    async with upstream_factory() as upstreams:
        silent = await upstreams(head_then_silence)
        running = await sidecar({"small": {"model": "m", "endpoints": [silent.url, good.url]}},
                                SIDECAR_STREAM_IDLE_TIMEOUT_S="0.3")
        session = starting_on(running, silent.url, "silent")
        status, headers, body = await chat(http, running, session)
        assert status == 504 and body["error"]["code"] == "upstream_timeout"
        assert "SIDECAR_STREAM_IDLE_TIMEOUT_S=0.3" in body["error"]["message"]
        assert headers["x-sidecar-attempts"] == "1"
        assert len(silent.requests) == 1 and good.requests == 0
        await until(lambda: running.sidecar.upstream.in_use() == 0)


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /x HTTP/1.1\r\nHost: s\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"POST /x HTTP/1.1\r\nHost: s\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"CONNECT s:443 HTTP/1.1\r\nHost: s:443\r\n\r\n", 501),
], ids=["400", "431", "413", "501"])
async def test_the_listeners_refusals_say_the_call_was_sent_nowhere(sidecar, raw, status):
    running = await sidecar({"small": {"model": "m", "endpoints": [dead_url()]}})
    client = await Client.open(running.port)
    try:
        await client.send(raw)
        answer = await client.final()
    finally:
        client.close()
    assert answer.status == status
    assert answer.header("x-sidecar-attempts") == b"0"


async def test_an_internal_error_says_the_call_was_sent_nowhere(sidecar):
    running = await sidecar({"small": {"model": "m", "endpoints": [dead_url()]}})

    async def broken(request, down) -> None:
        raise RuntimeError("a bug")

    running.listener.handle = broken
    client = await Client.open(running.port)
    try:
        await client.send(b"GET /x HTTP/1.1\r\nHost: s\r\n\r\n")
        answer = await client.final()
    finally:
        client.close()
    assert answer.status == 500 and answer.header("x-sidecar-attempts") == b"0"


GOOD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
JSON_CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
SSE_CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
ROLE = (b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
        b'"delta":{"role":"assistant"},"finish_reason":null}]}\n\n')


def scripted(*parts: bytes, pause_s: float = 0.0, then_s: float = 0.0):
    """A pod that writes `parts` (pausing between them), waits `then_s`, and closes."""
    async def respond(conn: Conn, request: Message) -> bool:
        for i, part in enumerate(parts):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            await conn.send(part)
        await asyncio.sleep(then_s)
        return False

    return respond


async def test_a_malformed_chunked_body_after_a_valid_head_is_a_502_never_sent_elsewhere(
        sidecar, http):
    """The pod answered — a valid head, then a bad chunk-size line: its answer is malformed
    (502), not a connection that broke under the work, so no other pod is asked."""
    bad_json = scripted(JSON_CHUNKED + b"5\r\n{\"a\":\r\nzz\r\n1}\r\n", then_s=1)
    bad_sse = scripted(SSE_CHUNKED + b"%x\r\n%s\r\n" % (len(ROLE), ROLE), b"zz\r\nxx\r\n",
                       pause_s=0.05, then_s=1)
    async with upstream_factory() as upstreams:
        for respond, stream in ((bad_json, False), (bad_sse, True)):
            bad = await upstreams(respond)
            good = await upstreams(always(GOOD))
            running = await sidecar({"small": {"model": "m",
                                               "endpoints": [bad.url, good.url]}})
            session = starting_on(running, bad.url, "malformed")
            status, headers, body = await chat(http, running, session,
                                               {**CHAT, "stream": stream})
            assert status == 502, (stream, body)
            assert body["error"]["code"] == "upstream_error"
            assert headers["x-sidecar-attempts"] == "1"
            assert len(bad.requests) == 1 and good.requests == [], stream


async def test_a_body_that_stalls_after_its_head_is_held_never_sent_elsewhere(sidecar, http):
    """A head and part of a small Content-Length body, then silence: the sidecar hangs up
    on a live pod (the stream idle timeout), which is a 504, not a pod that died."""
    async with upstream_factory() as upstreams:
        slow = await upstreams(scripted(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n"
            b"\r\n{\"id\":", then_s=10))
        good = await upstreams(always(GOOD))
        running = await sidecar({"small": {"model": "m", "endpoints": [slow.url, good.url]}},
                                SIDECAR_STREAM_IDLE_TIMEOUT_S="0.3")
        session = starting_on(running, slow.url, "stalls")
        status, headers, body = await chat(http, running, session)
        assert status == 504 and body["error"]["code"] == "upstream_timeout", body
        assert headers["x-sidecar-attempts"] == "1"
        assert len(slow.requests) == 1 and good.requests == []
        await until(lambda: running.sidecar.upstream.in_use() == 0)


async def test_a_retry_gets_what_is_left_of_the_calls_deadline_not_a_new_one(sidecar, http):
    """Pod A holds the call 1 s and drops it (retryable); pod B would answer after another
    1 s — within a fresh 1.5 s window, but past the call's: the call ends in 504 at the
    call's deadline instead of taking both windows."""
    async def late(conn: Conn, request: Message) -> bool:
        await asyncio.sleep(1.0)
        await conn.send(GOOD)
        return True

    async with upstream_factory() as upstreams:
        drops = await upstreams(scripted(then_s=1.0))
        slow = await upstreams(late)
        running = await sidecar({"small": {"model": "m", "endpoints": [drops.url, slow.url]}},
                                SIDECAR_RESPONSE_TIMEOUT_S="1.5")
        session = starting_on(running, drops.url, "deadline")
        status, headers, body = await chat(http, running, session)
        assert status == 504 and body["error"]["code"] == "upstream_timeout", body
        assert headers["x-sidecar-attempts"] == "2"
        assert len(drops.requests) == 1 and len(slow.requests) == 1


async def test_a_malformed_chunk_after_content_reached_the_app_ends_the_stream_visibly(
        sidecar, http):
    """Content reached the app, then a bad chunk-size line: the stream ends with the error
    event and no [DONE]; nothing is sent to another pod."""
    content = (b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":'
               b'[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n')
    frames = b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in (ROLE, content))
    async with upstream_factory() as upstreams:
        bad = await upstreams(scripted(SSE_CHUNKED + frames, b"zz\r\nxx\r\n", pause_s=0.2,
                                       then_s=1))
        good = await upstreams(always(GOOD))
        running = await sidecar({"small": {"model": "m", "endpoints": [bad.url, good.url]}})
        session = starting_on(running, bad.url, "midstream")
        raw = b""
        async with http.post(base(running) + "/v1/chat/completions",
                             json={**CHAT, "stream": True},
                             headers={"x-session-id": session}) as r:
            assert r.status == 200
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for piece in r.content.iter_any():
                    raw += piece
        assert b'"content":"Hi"' in raw and b"upstream_broken_mid_stream" in raw, raw
        assert b"[DONE]" not in raw
        assert len(bad.requests) == 1 and good.requests == []
