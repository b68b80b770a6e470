"""Cold starts on a real engine: a llama-server that is starting (nothing listening yet, then
503 "Loading model" while it reads its weights) is `warming` and gets no call; it turns
ready by itself on its first healthy probe, and new sessions reach it. Restarted in place,
it is warming again while it loads, not a failed pod."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.fleet.pools import EndpointState
from tests.conftest import base
from tests.realengine.conftest import MODEL, body, post, session_on
from tests.support.polling import until

pytestmark = pytest.mark.engine


async def test_a_starting_pod_is_warming_gets_no_call_and_turns_ready_by_itself(
        llama, sidecar, http):
    ready, = llama(1)
    late, = llama(1, start=False)  # starts below, while the sidecar runs
    running = await sidecar({"small": {"model": MODEL, "health_path": "/health",
                                       "health_interval_s": 0.05,
                                       "endpoints": [ready.url, late.url]}})
    sidecar_ = running.sidecar
    endpoint = sidecar_.pools.endpoint("small", late.url)
    assert endpoint is not None
    await until(lambda: sidecar_.pools.endpoint("small", ready.url).state
                is EndpointState.READY, "the first pod ready", timeout=20)
    assert endpoint.state is EndpointState.WARMING

    # New sessions whose first choice is the starting pod: each call is a first touch.
    sessions = session_on(running, "small", late.url, "late", count=200)
    # (warming throughout: before the call was sent and after it was answered, so its
    # routing saw the pod warming), status, who served
    calls: list[tuple[bool, int, str]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        for session in sessions[4:]:
            if stop.is_set():
                return
            before = endpoint.state
            status, headers, _ = await post(http, base(running), body("Hi.", max_tokens=2),
                                            **{"x-session-id": session})
            throughout = before is endpoint.state is EndpointState.WARMING
            calls.append((throughout, status, headers.get("x-sidecar-endpoint", "")))

    calling = asyncio.create_task(traffic())
    await asyncio.sleep(0.3)
    late.start()
    await until(lambda: endpoint.state is EndpointState.READY, "the pod ready", timeout=30)
    stop.set()
    await calling

    # llama.cpp answered 503 "Loading model" while it read its weights (~0.3 s here).
    assert sidecar_.prober.loading_probes >= 1, "no probe saw 503 Loading model"
    warming = [c for c in calls if c[0]]
    assert warming, "no call was made while the pod was warming"
    assert all(status == 200 for _, status, _ in calls)
    assert all(served == ready.url for _, _, served in warming)
    # A call sent to the loading pod would have had its 503 and been retried.
    assert sidecar_.proxy.counters.retries == 0, "a call was sent to the warming pod"
    assert any(c.endpoint == late.url for c in sidecar_.prober.cold_starts)

    # Ready: new sessions whose first choice it is land there.
    for session in sessions[:4]:
        status, headers, _ = await post(http, base(running), body("Hi.", max_tokens=2),
                                        **{"x-session-id": session})
        assert status == 200 and headers["x-sidecar-endpoint"] == late.url


async def test_a_pod_restarted_in_place_is_warming_while_it_loads(llama, sidecar):
    pod, other = llama(2)
    running = await sidecar({"small": {"model": MODEL, "health_path": "/health",
                                       "health_interval_s": 0.05,
                                       "endpoints": [pod.url, other.url]}})
    prober = running.sidecar.prober
    endpoint = running.sidecar.pools.endpoint("small", pod.url)
    assert endpoint is not None
    await until(lambda: endpoint.state is EndpointState.READY, "the pod ready", timeout=20)
    pod.stop()
    await until(lambda: endpoint.state is EndpointState.EJECTED, "the pod ejected", timeout=20)
    loading_before = prober.loading_probes
    states: list[EndpointState] = []

    async def watch() -> None:
        while endpoint.state is not EndpointState.READY:
            if not states or states[-1] is not endpoint.state:
                states.append(endpoint.state)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    pod.start()
    await until(lambda: endpoint.state is EndpointState.READY, "the pod ready again", timeout=30)
    await watcher

    assert prober.loading_probes > loading_before, "no probe saw 503 Loading model"
    # Ejected (gone) → warming (loading its model) → ready: a cold start, not a restore.
    assert states == [EndpointState.EJECTED, EndpointState.WARMING], states
    assert sum(c.endpoint == pod.url for c in prober.cold_starts) == 2
