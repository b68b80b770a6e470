"""Load-aware routing against real processes: the pods' vLLM metrics scraped in the
background, the fleet's per-endpoint heartbeats in Redis, and a saturated pod's session
moving once (recorded locally and in Redis) with no extra Redis call on the request path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.config import ConfigError, load_settings
from sidecar.fleet import traffic
from sidecar.fleet.loads import read_pod_load
from sidecar.fleet.pools import prefix_key
from tests.conftest import admin, chat, pool
from tests.support.polling import until


async def held(http, url: str, body: dict, headers: dict | None = None) -> None:
    """A call left open until the test ends (its pod's shutdown ends it)."""
    with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()


async def endpoint_loads(http, running) -> dict[str, dict]:
    async with http.get(admin(running) + "/endpoints") as r:
        data = await r.json()
    return {e["url"]: e["load"] for p in data.values() for e in p["endpoints"]}


@pytest.fixture
def fast_flush(monkeypatch):
    monkeypatch.setattr(traffic, "FLUSH_INTERVAL_S", 0.2)


def test_metrics_path_must_be_a_path_and_the_error_names_the_variable():
    env = {"SIDECAR_POOLS": json.dumps({"p": {"model": "m", "endpoints": [],
                                              "metrics_path": "metrics"}})}
    with pytest.raises(ConfigError) as refused:
        load_settings(env)
    [problem] = refused.value.problems
    assert "SIDECAR_POOLS" in problem and '"metrics_path"' in problem and "/metrics" in problem


async def test_each_pods_load_is_scraped_shown_and_written_for_the_scaler(
        pods, sidecar, http, redis_server, fast_flush):
    busy, idle = await pods(2, model="m", max_num_seqs=1, tokens_per_s=20, max_tokens=200)
    running = await sidecar({"p": pool([busy, idle], model="m", metrics_path="/metrics",
                                       health_interval_s=0.1)},
                            SIDECAR_REDIS_URL=redis_server.url)
    calls = [asyncio.create_task(held(http, busy.url, {
        "model": "m", "stream": True, "messages": [{"role": "user", "content": f"x{i}"}]}))
        for i in range(3)]  # straight to the pod: one runs, two wait

    async def seen() -> bool:
        load = (await endpoint_loads(http, running))[busy.url]
        return load is not None and load["waiting"] == 2 and load["saturated"]
    await until(seen)
    loads = await endpoint_loads(http, running)
    assert loads[busy.url]["running"] == 1 and loads[busy.url]["source"] == "metrics"
    assert loads[idle.url]["waiting"] == 0 and not loads[idle.url]["saturated"]
    top = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "top", "--once", "--admin", admin(running),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"})
    out = (await top.communicate())[0].decode()
    assert top.returncode == 0, out
    row = next(line for line in out.splitlines() if busy.url in line)
    assert "waiting" in out and row.split()[-3:-1] == ["1", "2"], out
    async with http.get(admin(running) + "/metrics") as r:
        prom = await r.text()
    assert f'llm_sidecar_endpoint_waiting{{pool="p",endpoint="{busy.url}"}} 2' in prom
    client = aioredis.from_url(redis_server.url)
    try:
        async def written() -> bool:
            value = await client.hget("llmsc:podload:{p}", busy.url)
            return value is not None and value.split(b":")[:2] == [b"1", b"2"]
        await until(written)
        value = (await client.hget("llmsc:podload:{p}", busy.url)).decode()
        _, _, kv, stamp = value.split(":")
        assert 0 <= float(kv) <= 1 and abs(float(stamp) - time.time()) < 60
        # What the scaler reads: both pods report, and the busy one's queue is there.
        view = (await read_pod_load(client, ["p"], time.time()))["p"]
        assert view.pods == 2 and view.waiting == 2
    finally:
        await client.aclose()
        for call in calls:
            call.cancel()


async def test_a_page_that_is_not_vllm_metrics_is_counted_and_not_used(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"p": pool([pod], metrics_path="/v1/models",
                                       health_interval_s=0.05)})
    prober = running.sidecar.prober

    async def counted() -> bool:
        return prober.parse_failures >= 2
    await until(counted)
    assert prober.scrape_failures >= prober.parse_failures
    assert (await endpoint_loads(http, running))[pod.url] is None
    assert running.sidecar.telemetry.counter_total("load_scrape_failures") >= 2
    status, _, _ = await chat(http, running, body={"model": "small-model", "messages": []})
    assert status == 200


async def test_without_metrics_the_fleets_in_flight_heartbeats_are_each_pods_load(
        pods, sidecar, http, redis_server, fast_flush):
    [pod] = await pods(1, hang=True)
    pools = {"small": pool([pod])}
    one = await sidecar(pools, SIDECAR_REDIS_URL=redis_server.url)
    other = await sidecar(pools, SIDECAR_REDIS_URL=redis_server.url)
    calls = [asyncio.create_task(chat(http, one, session=f"s{i}")) for i in range(3)]

    async def seen_by_the_other() -> bool:
        load = (await endpoint_loads(http, other))[pod.url]
        return load is not None and load["running"] == 3
    await until(seen_by_the_other)
    assert (await endpoint_loads(http, other))[pod.url]["source"] == "heartbeat"
    assert all(e.inflight == 0 for e in other.sidecar.pools.all_endpoints())
    async with http.post(pod.url + "/_control", json={"hang": False}) as r:
        assert r.status == 200
    await asyncio.gather(*calls)


async def test_a_saturated_pods_session_moves_once_and_its_route_records_it(
        pods, sidecar, http, redis_server, monitor):
    a, b = await pods(2, model="small-model", max_num_seqs=1, max_tokens=2)
    running = await sidecar({"small": pool([a, b], metrics_path="/metrics",
                                           health_interval_s=0.1)},
                            SIDECAR_REDIS_URL=redis_server.url)
    status, _, _ = await chat(http, running, session="agent")
    assert status == 200
    home = a if a.requests == 1 else b
    away = b if home is a else a
    async with http.post(home.url + "/_control", json={"tokens_per_s": 2}) as r:
        assert r.status == 200
    hold = [asyncio.create_task(held(http, home.url, {
        "model": "m", "stream": True, "max_tokens": 60,
        "messages": [{"role": "user", "content": f"hold{i}"}]})) for i in range(3)]
    endpoint = running.sidecar.pools.endpoint("small", home.url)

    async def saturated() -> bool:
        return endpoint is not None and endpoint.saturated
    await until(saturated)
    monitor.reset()
    away_before = away.requests
    status, _, _ = await chat(http, running, session="agent")
    assert status == 200 and away.requests == away_before + 1
    route = running.sidecar.router.cache.peek("agent")
    assert route is not None and route.endpoint.url == away.url
    assert route.reason is not None and route.reason.startswith("moved from " + home.url)
    assert running.sidecar.router.counters.session_moves == 1

    async def written() -> bool:
        return any('"EVALSHA"' in c and '"llmsc:{agent}"' in c for c in monitor.commands())
    await until(written)
    # The move cost no Redis read: the request path only queued the route's write-behind
    # (one script: SET and PUBLISH), besides the pub/sub listener's health-check PINGs.
    assert all('"EVALSHA"' in c or c.endswith('"PING"') for c in monitor.commands())
    async with http.get(admin(running) + "/sessions/agent") as r:
        assert (await r.json())["store"]["endpoint"] == away.url
    # Stays on the new pod (once): the next calls go there while the old pod still queues.
    for _ in range(2):
        status, _, _ = await chat(http, running, session="agent")
        assert status == 200
    assert away.requests == away_before + 3
    assert running.sidecar.router.counters.session_moves == 1
    for call in hold:
        call.cancel()


async def test_parallel_calls_spill_past_a_queued_pod_and_the_route_stays(
        pods, sidecar, http, redis_server, monitor):
    """A session with a call in flight on its queued pod: its next parallel calls go to its
    next rendezvous choices (each pod's own counter shows them), for those calls only (the
    route, its record in Redis and the Redis traffic stay as they were); a lone call of the
    session, on the same queued pod, is never spilled."""
    pods_ = await pods(3, model="small-model", max_num_seqs=4, max_tokens=2)
    running = await sidecar({"small": pool(pods_, metrics_path="/metrics",
                                           health_interval_s=0.1)},
                            SIDECAR_REDIS_URL=redis_server.url)
    router = running.sidecar.router
    # ~10 000 prompt tokens: moving the session would cost more re-prefill than the queue's
    # wait, so the queue alone does not move the session, and a spill to a pod that lacks
    # the prompt would not pay either: the session's other pods have it from an earlier
    # spill (as after a previous turn), so only spills help its calls.
    long = {"model": "auto", "max_tokens": 2,
            "messages": [{"role": "user", "content": "x " * 20_000}]}
    status, _, _ = await chat(http, running, session="agent", body=long)
    assert status == 200
    [home] = [p for p in pods_ if p.requests == 1]
    others = [p for p in pods_ if p is not home]
    async with http.post(home.url + "/_control", json={"tokens_per_s": 2}) as r:
        assert r.status == 200
    hold = [asyncio.create_task(held(http, running_url(running), {
        "model": "auto", "stream": True, "max_tokens": 60,
        "messages": [{"role": "user", "content": "the session's own call"}]},
        {"x-session-id": "agent"}))]

    async def arrived(pod, count: int):
        async def check() -> bool:
            return pod.requests >= count
        return check
    await until(await arrived(home, 2))
    hold += [asyncio.create_task(held(http, home.url, {
        "model": "m", "stream": True, "max_tokens": 60,
        "messages": [{"role": "user", "content": f"hold{i}"}]})) for i in range(5)]
    endpoint = running.sidecar.pools.endpoint("small", home.url)

    async def saturated() -> bool:
        return endpoint is not None and endpoint.saturated
    await until(saturated)
    route = router.cache.peek("agent")
    assert route is not None and route.endpoint is endpoint and route.inflight == 1
    for pod in others:
        other = running.sidecar.pools.endpoint("small", pod.url)
        assert other is not None
        other.sent_prefix(prefix_key(json.dumps(long).encode()))
    record = route.record()
    stored = await redis_record(redis_server, "agent")
    assert stored is not None and f'"endpoint":"{home.url}"'.encode() in stored
    monitor.reset()
    before = [p.requests for p in others]
    results = await asyncio.gather(*(chat(http, running, session="agent", body=long)
                                     for _ in range(4)))
    assert [status for status, _, _ in results] == [200] * 4
    assert sum(p.requests for p in others) - sum(before) == 4
    assert {headers["x-sidecar-endpoint"] for _, headers, _ in results} <= {
        p.url for p in others}
    assert router.counters.spills == 4 and router.counters.session_moves == 0
    assert router.cache.peek("agent") is route and route.record() == record
    assert route.endpoint is endpoint and route.inflight == 1
    assert not [c for c in monitor.commands() if "agent" in c], "a spill costs no Redis call"
    assert await redis_record(redis_server, "agent") == stored
    async with http.get(admin(running) + "/stats") as r:
        assert (await r.json())["routes"]["spills"] == 4
    async with http.get(admin(running) + "/metrics") as r:
        spilled = [line for line in (await r.text()).splitlines()
                   if line.startswith("llm_sidecar_spills_total{")]
    assert len(spilled) == 1 and 'pool="small"' in spilled[0], spilled
    assert float(spilled[0].rsplit(" ", 1)[1]) == 4, spilled

    hold[0].cancel()  # the session's call in flight ends: its next call is a lone one

    async def alone() -> bool:
        return route.inflight == 0
    await until(alone)
    home_before = home.requests
    lone = asyncio.create_task(chat(http, running, session="agent", body=long))
    await until(await arrived(home, home_before + 1))  # queued at home, not spilled
    assert router.counters.spills == 4 and sum(p.requests for p in others) == sum(before) + 4
    lone.cancel()
    for call in hold:
        call.cancel()
    await asyncio.gather(lone, *hold, return_exceptions=True)


def running_url(running) -> str:
    return f"http://127.0.0.1:{running.port}"


async def redis_record(server, session: str) -> bytes | None:
    client = aioredis.from_url(server.url)
    try:
        return await client.get(f"llmsc:{{{session}}}")
    finally:
        await client.aclose()
