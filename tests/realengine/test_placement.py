"""Sticky sessions and load-aware placement on real pods: a conversation's calls land on one
llama-server and reuse its prompt cache (the engine's own counters say so), and with the
`llamacpp` engine mapping a pod whose slots are all busy with requests deferred is
saturated, so new sessions start elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import orjson
import pytest

from tests.conftest import base
from tests.realengine.conftest import MODEL, body, metrics, post, session_on
from tests.support.polling import until

pytestmark = pytest.mark.engine

SYSTEM = ("You are a helpful assistant for a shipping company. Answer in one short sentence. "
          "Crates are numbered; docks are lettered A to F; days are counted from Monday. " * 4)


async def test_a_conversation_stays_on_one_pod_and_hits_its_prompt_cache(llama, sidecar, http):
    pods = llama(2)
    running = await sidecar({"small": {"model": MODEL, "engine": "llamacpp",
                                       "endpoints": [p.url for p in pods]}})
    messages = [{"role": "system", "content": SYSTEM}]
    served: list[str] = []
    cached: list[int] = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"Where is crate {turn * 11}?"})
        data = {**body("", max_tokens=16), "messages": messages}
        status, headers, raw = await post(http, base(running), data,
                                          **{"x-session-id": "conversation"})
        assert status == 200
        answer = orjson.loads(raw)
        messages.append({"role": "assistant",
                         "content": answer["choices"][0]["message"]["content"]})
        served.append(headers["x-sidecar-endpoint"])
        cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert len(set(served)) == 1, served
    home = next(p for p in pods if p.url == served[0])
    other = next(p for p in pods if p is not home)
    # The first turn finds nothing cached; every later one reuses at least the system
    # prompt and the turns before it, more each turn.
    assert cached[0] == 0
    assert all(b > a for a, b in itertools.pairwise(cached)), cached
    home_metrics, other_metrics = await metrics(home), await metrics(other)
    assert home_metrics["prompt_tokens_cached_total"] >= sum(cached) > 0
    assert other_metrics["prompt_tokens_cached_total"] == 0
    assert other_metrics["prompt_tokens_total"] == 0, "the other pod saw no call at all"


async def test_a_pod_with_requests_deferred_is_saturated_and_new_sessions_go_elsewhere(
        llama, sidecar, http):
    busy, spare = llama(2, slots=2)
    # Bounded-load placement off: only saturation may divert a new session from its first
    # rendezvous choice, so the test tells the two rules apart.
    running = await sidecar({"small": {"model": MODEL, "engine": "llamacpp",
                                       "health_path": "/health", "health_interval_s": 0.1,
                                       "metrics_path": "/metrics",
                                       "endpoints": [busy.url, spare.url]}},
                            SIDECAR_BOUNDED_LOAD_FACTOR="0")
    endpoint = running.sidecar.pools.endpoint("small", busy.url)
    assert endpoint is not None
    await until(lambda: endpoint.load is not None, "a load reading of the busy pod", timeout=20)
    sessions = session_on(running, "small", busy.url, "new", count=5)
    long_call = body("Write a long story about a lighthouse.", max_tokens=4000,
                     ignore_eos=True)
    hogs: list[asyncio.Task[object]] = []
    try:
        # One slot of two busy: room left, so a new session still starts on its first choice.
        hogs.append(asyncio.create_task(post(http, busy.url, long_call)))
        await until(lambda: endpoint.load is not None and endpoint.load.running >= 1,
                    "the first long call running", timeout=20)
        _, headers, _ = await post(http, base(running), body("Hi.", max_tokens=4),
                                   **{"x-session-id": sessions[0]})
        assert headers["x-sidecar-endpoint"] == busy.url

        # Both slots busy and one request deferred: llama.cpp queues it, the sidecar reads
        # llamacpp:requests_deferred as waiting, and the pod is saturated.
        hogs += [asyncio.create_task(post(http, busy.url, long_call)) for _ in range(2)]
        await until(lambda: endpoint.saturated, "the busy pod saturated", timeout=20)
        assert endpoint.load is not None
        assert endpoint.load.running == 2 and endpoint.load.waiting >= 1
        assert endpoint.load.kv_usage == 0  # llama.cpp exports no KV gauge
        for session in sessions[1:]:
            status, headers, _ = await post(http, base(running), body("Hi.", max_tokens=4),
                                            **{"x-session-id": session})
            assert status == 200
            assert headers["x-sidecar-endpoint"] == spare.url, session
        assert running.sidecar.prober.parse_failures == 0
    finally:
        for hog in hogs:
            hog.cancel()
        for hog in hogs:
            with contextlib.suppress(BaseException):
                await hog
