"""Faults on real pods: an app that hangs up stops the generation on the engine; a pod
SIGKILLed mid-stream is resumed on another pod into one coherent answer (or, without
resume, ends visibly broken); a pod killed under traffic and a pool whose pod is gone cost
no call."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import base
from tests.realengine.conftest import (
    MODEL,
    body,
    content_of,
    metrics,
    post,
    session_on,
    sse_events,
)
from tests.support.polling import until

pytestmark = pytest.mark.engine

# A prompt SmolLM2-135M answers at length and the same way every time at temperature 0.
COUNTING = "Count from 1 to 60, one number per line, and nothing else."


async def test_an_app_that_hangs_up_stops_the_generation_on_the_engine(llama, sidecar, http):
    pod, = llama(1)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [pod.url]}})
    data = body("Write a long story about a lighthouse.", max_tokens=3000, stream=True,
                ignore_eos=True)
    async with http.post(base(running) + "/v1/chat/completions", json=data,
                         headers={"x-session-id": "leaver"}) as response:
        assert response.status == 200
        received = b""
        while received.count(b'"content":"') < 5:
            received += await response.content.readany()
        response.close()  # the app hangs up mid-answer

    async def idle() -> bool:
        return (await metrics(pod))["requests_processing"] == 0

    await until(idle, "the engine to stop the abandoned generation", timeout=20)
    stopped_at = (await metrics(pod))["tokens_predicted_total"]
    await asyncio.sleep(1.0)
    assert (await metrics(pod))["tokens_predicted_total"] == stopped_at
    # Observed: 7 tokens (5 relayed, then the hang-up); the bound leaves room for a slow
    # machine and still fails if the answer went on for nobody.
    assert stopped_at < 1000, f"{stopped_at} tokens generated for nobody"
    endpoint = running.sidecar.pools.endpoint("small", pod.url)
    assert endpoint is not None
    await until(lambda: endpoint.inflight == 0, "the sidecar to let go of the call", timeout=10)


async def _stream_until_killed(http: aiohttp.ClientSession, url: str, data: dict,
                               session: str, victim, frames: int) -> tuple[bytes, bool]:
    """Stream `data` through the sidecar; SIGKILL `victim` after `frames` content frames.
    Returns the bytes the app received and whether the stream ended cleanly."""
    received = b""
    killed = False
    try:
        async with http.post(url + "/v1/chat/completions", json=data,
                             headers={"x-session-id": session},
                             timeout=aiohttp.ClientTimeout(total=90)) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                received += chunk
                if not killed and received.count(b'"content":"') >= frames:
                    victim.kill()
                    killed = True
        return received, True
    except aiohttp.ClientPayloadError:
        return received, False


async def test_a_pod_killed_mid_stream_is_resumed_into_one_answer(llama, sidecar, http):
    first, second = llama(2)
    running = await sidecar({"small": {"model": MODEL, "resume": True,
                                       "endpoints": [first.url, second.url]}})
    data = body(COUNTING, max_tokens=80, stream=True)
    _, _, direct = await post(http, second.url, data)
    whole = content_of(sse_events(direct))
    assert len(whole) > 60, whole

    session, = session_on(running, "small", first.url, "resumed")
    received, clean = await _stream_until_killed(http, base(running), data, session, first,
                                                 frames=12)

    assert clean, received[-300:]
    events = sse_events(received)
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and "error" in e for e in events)
    assert running.sidecar.proxy.counters.resumes == 1
    # One stream: one id, one role preamble, one finish.
    ids = {e["id"] for e in events if isinstance(e, dict)}
    assert len(ids) == 1
    roles = [e for e in events if isinstance(e, dict) and e["choices"]
             and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1
    finishes = [e for e in events if isinstance(e, dict) and e["choices"]
                and e["choices"][0]["finish_reason"]]
    assert len(finishes) == 1
    # Token for token the uninterrupted answer (temperature 0).
    assert content_of(events) == whole
    # The usage frame is the continuation's: its prompt holds the answer so far, its
    # completion the rest, so only the total matches the uninterrupted call's.
    usage = next(e["usage"] for e in events if isinstance(e, dict) and e.get("usage"))
    direct_usage = next(e["usage"] for e in sse_events(direct)
                        if isinstance(e, dict) and e.get("usage"))
    assert usage["total_tokens"] == direct_usage["total_tokens"]
    assert usage["completion_tokens"] < direct_usage["completion_tokens"]


async def test_without_resume_a_pod_killed_mid_stream_ends_visibly_broken(llama, sidecar,
                                                                          http):
    first, second = llama(2)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [first.url, second.url]}})
    session, = session_on(running, "small", first.url, "broken")
    received, clean = await _stream_until_killed(http, base(running),
                                                 body(COUNTING, max_tokens=80, stream=True),
                                                 session, first, frames=12)

    assert not clean, "a cut stream must not end like a whole one"
    events = sse_events(received)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "upstream_broken_mid_stream"
    assert running.sidecar.proxy.counters.broken_streams == 1


async def test_a_pod_killed_under_traffic_costs_no_call(llama, sidecar, http):
    first, second = llama(2)
    # Bounded-load placement off: six new sessions at once start on their first choices.
    running = await sidecar({"small": {"model": MODEL, "endpoints": [first.url, second.url]}},
                            SIDECAR_BOUNDED_LOAD_FACTOR="0")
    on_first = session_on(running, "small", first.url, "a", count=3)
    on_second = session_on(running, "small", second.url, "b", count=3)
    sessions = on_first + on_second

    async def turn(n: int, stream: bool = False) -> list[tuple[int, str, bytes]]:
        results = await asyncio.gather(*(
            post(http, base(running), body(f"Turn {n}: name a fruit.", max_tokens=24,
                                           stream=stream), **{"x-session-id": s})
            for s in sessions))
        return [(status, headers["x-sidecar-endpoint"], raw)
                for status, headers, raw in results]

    before = await turn(0)
    assert [url for _, url, _ in before] == [first.url] * 3 + [second.url] * 3
    # Non-streamed calls in flight on the pod when it dies: nothing reached the app yet,
    # so they are retried on the other pod.
    during = asyncio.create_task(turn(1))

    async def busy() -> bool:
        return (await metrics(first))["requests_processing"] >= 1

    await until(busy, "calls in flight on the first pod", timeout=20)
    first.kill()
    results = await during + await turn(2) + await turn(3, stream=True)

    assert all(status == 200 for status, _, _ in results), results
    after = await turn(4)
    assert [url for _, url, _ in after] == [second.url] * 6
    for _, _, raw in results[-6:]:
        assert sse_events(raw)[-1] == "[DONE]"


async def test_a_pool_whose_pod_is_gone_falls_back_with_no_failed_call(llama, sidecar, http):
    large, small = llama(2)
    running = await sidecar({
        "large": {"model": "smollm2-large", "fallback": "small", "endpoints": [large.url]},
        "small": {"model": MODEL, "endpoints": [small.url]},
    })
    status, headers, _ = await post(http, base(running), {**body("Hi."), "model":
                                                          "smollm2-large"},
                                    **{"x-session-id": "big"})
    assert status == 200 and headers["x-sidecar-pool"] == "large"
    large.kill()
    for turn in range(3):
        for stream in (False, True):
            status, headers, raw = await post(
                http, base(running), {**body(f"Turn {turn}.", stream=stream),
                                      "model": "smollm2-large"},
                **{"x-session-id": "big"})
            assert status == 200
            assert headers["x-sidecar-pool"] == "small"
            assert headers["x-sidecar-fallback"] == "large"
            assert headers["x-sidecar-model"] == MODEL
            events = sse_events(raw) if stream else []
            assert not stream or events[-1] == "[DONE]"
    # The small pod was asked for its own model: the body's model was rewritten.
    assert running.sidecar.proxy.counters.fallbacks >= 1
