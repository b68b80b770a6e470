"""Basic failover: next endpoint of the pool, then the fallback chain with `model`
rewritten, bounded by SIDECAR_MAX_ATTEMPTS; the new route sticks."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sidecar.fleet.pools import EndpointState
from tests.conftest import CHAT, admin, chat, dead_url, pool


async def test_refused_endpoint_fails_over_within_the_pool(pods, sidecar, http):
    [alive] = await pods(1)
    dead = dead_url()
    running = await sidecar({"small": {"model": "small-model", "endpoints": [dead, alive.url]}})
    # Find sessions whose rendezvous choice is the dead endpoint.
    moved = 0
    for i in range(20):
        status, headers, _ = await chat(http, running, f"refused-{i}")
        assert status == 200
        assert headers["x-sidecar-endpoint"] == alive.url
        if headers["x-sidecar-attempts"] == "2":
            moved += 1
    assert moved >= 1, "some session must have started on the dead endpoint"
    [endpoint] = [e for e in running.sidecar.pools.all_endpoints() if e.url == dead]
    assert endpoint.state is EndpointState.EJECTED


async def test_retryable_status_moves_the_session_and_the_route_sticks(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])})
    status, headers, _ = await chat(http, running, "s503")
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    first.fake.behaviour.update({"fail_next": 1, "fail_status": 503, "retry_after": "2"})
    status, headers, _ = await chat(http, running, "s503")
    assert status == 200
    assert headers["x-sidecar-endpoint"] == other.url
    assert headers["x-sidecar-attempts"] == "2"
    # Later calls go straight to the endpoint that served: one attempt, no retry.
    status, headers, _ = await chat(http, running, "s503")
    assert headers["x-sidecar-endpoint"] == other.url
    assert headers["x-sidecar-attempts"] == "1"


async def test_client_error_is_passed_through_untouched(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])})
    a.fake.behaviour.update({"fail_next": 1, "fail_status": 400})
    b.fake.behaviour.update({"fail_next": 1, "fail_status": 400})
    status, headers, body = await chat(http, running, "s400")
    assert status == 400
    assert body["error"]["code"] == "injected"
    assert headers["x-sidecar-attempts"] == "1"
    assert a.requests + b.requests == 1


async def test_whole_pool_down_falls_back_with_model_rewritten(pods, sidecar, http):
    [large] = await pods(1)
    [small] = await pods(1)
    running = await sidecar({
        "large": pool([large], "large-model", fallback="small"),
        "small": pool([small], "small-model"),
    })
    large.fake.behaviour.update({"fail_next": 100, "fail_status": 503})
    body = {"model": "large-model", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, data = await chat(http, running, "fb", body)
    assert status == 200
    assert headers["x-sidecar-pool"] == "small"
    assert headers["x-sidecar-fallback"] == "large"
    assert small.fake.last_request["model"] == "small-model"
    assert data["model"] == "small-model"
    # The fallback route sticks: the next call goes to small directly.
    before = large.requests
    status, headers, _ = await chat(http, running, "fb", body)
    assert headers["x-sidecar-pool"] == "small" and headers["x-sidecar-attempts"] == "1"
    assert large.requests == before
    async with http.get(admin(running) + "/sessions/fb") as r:
        view = await r.json()
    assert view["local"]["pool"] == "large" and view["local"]["fallback"] == "small"
    assert view["store"]["fallback"] == "small"


async def test_non_json_body_is_not_rewritten_on_fallback(pods, sidecar, http):
    [small] = await pods(1)
    running = await sidecar({"large": {"model": "large-model", "endpoints": [dead_url()],
                                       "fallback": "small"},
                             "small": pool([small], "small-model")})
    async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions",
                         data=b"not json {", headers={"x-session-id": "nj"}) as r:
        assert r.status == 400  # fake-llm's own answer to a body that is not JSON
        assert (await r.json())["error"]["code"] == "invalid_json"
        assert r.headers["x-sidecar-pool"] == "small"


async def test_attempts_are_bounded_by_max_attempts(pods, sidecar, http):
    pods_ = await pods(4, fail_next=100, fail_status=503)
    running = await sidecar({"small": pool(pods_)}, SIDECAR_MAX_ATTEMPTS="2")
    status, headers, _ = await chat(http, running, "bounded")
    # The last attempt's own answer reaches the app when attempts run out.
    assert status == 503
    assert headers["x-sidecar-attempts"] == "2"
    assert sum(p.requests for p in pods_) == 2


async def test_all_endpoints_down_gives_503_with_retry_after_and_what_was_tried(sidecar, http):
    dead = [dead_url(), dead_url()]
    running = await sidecar({"small": {"model": "m", "endpoints": dead}})
    status, headers, body = await chat(http, running, "down")
    assert status == 503
    assert headers["Retry-After"].isdigit()
    assert body["error"]["type"] == "sidecar_error"
    assert body["error"]["code"] == "no_ready_endpoint"
    assert sorted(t["endpoint"] for t in body["error"]["tried"]) == sorted(dead)
    assert {t["outcome"] for t in body["error"]["tried"]} == {"connect_error"}
    # Both are ejected now: the next call tries nothing and says so at once.
    status, headers, body = await chat(http, running, "down-2")
    assert status == 503 and body["error"]["tried"] == []


async def test_a_live_pod_past_the_deadline_gets_no_retry_and_the_app_a_504(pods, sidecar,
                                                                              http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_RESPONSE_TIMEOUT_S="0.3")
    _, headers, _ = await chat(http, running, "slow")
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    first.fake.behaviour.update({"hang": True})
    first.fake._released.clear()
    try:
        status, headers, body = await chat(http, running, "slow")
        assert status == 504 and body["error"]["code"] == "upstream_timeout"
        assert headers["x-sidecar-attempts"] == "1"
        assert other.requests == 0, "the work is not started over on another pod"
        [endpoint] = [e for e in running.sidecar.pools.all_endpoints() if e.url == first.url]
        assert endpoint.state is EndpointState.READY, "slow is not failed"
    finally:
        first.fake.behaviour.update({"hang": False})
        first.fake._released.set()


async def first_endpoint(http, running, session, pods_):
    _, headers, _ = await chat(http, running, session)
    first = next(p for p in pods_ if p.url == headers["x-sidecar-endpoint"])
    return first, [p for p in pods_ if p is not first]


async def test_retry_after_is_respected(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])})
    first, [other] = await first_endpoint(http, running, "ra", [a, b])
    first.fake.behaviour.update({"fail_next": 1, "fail_status": 429, "retry_after": "30"})
    status, headers, _ = await chat(http, running, "ra")
    assert status == 200 and headers["x-sidecar-endpoint"] == other.url
    # New sessions that would start on the held endpoint go elsewhere until it has passed.
    before = first.requests
    for i in range(20):
        status, headers, _ = await chat(http, running, f"ra-new-{i}")
        assert headers["x-sidecar-endpoint"] == other.url
    assert first.requests == before
    async with http.get(admin(running) + "/endpoints") as r:
        [view] = [e for e in (await r.json())["small"]["endpoints"] if e["url"] == first.url]
    assert 25 < view["held_for_s"] <= 30 and view["state"] == "ready"


async def test_stream_dropped_after_the_preamble_is_retried_transparently(pods, sidecar, http):
    a, b = await pods(2, max_tokens=8)
    running = await sidecar({"small": pool([a, b])})
    first, [other] = await first_endpoint(http, running, "prefill", [a, b])
    # The next stream from the session's pod dies right after its role-only first frame.
    first.fake.behaviour.update({"drop_after_chunks": 1, "drop_next": 1})
    body = {**CHAT, "stream": True}
    async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions", json=body,
                         headers={"x-session-id": "prefill"}) as r:
        raw = await r.read()
        assert r.headers["x-sidecar-endpoint"] == other.url
        assert r.headers["x-sidecar-attempts"] == "2"
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert sum(b'"role":"assistant"' in e for e in events) == 1, "one preamble, not two"
    assert first.fake.counters.dropped_streams == 1
    assert running.sidecar.proxy.counters.prefill_retries == 1


async def test_stream_dropped_after_content_ends_visibly_and_is_not_retried(pods, sidecar, http):
    a, b = await pods(2, max_tokens=20)
    running = await sidecar({"small": pool([a, b])})
    first, [other] = await first_endpoint(http, running, "late", [a, b])
    first.fake.behaviour.update({"drop_after_chunks": 11, "drop_next": 1})  # 10 content frames
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions",
                             json={**CHAT, "stream": True},
                             headers={"x-session-id": "late"}) as r:
            async for piece in r.content.iter_any():
                received += piece
    assert received.count(b'"content":"tok') == 10
    assert b"upstream_broken_mid_stream" in received and b"[DONE]" not in received
    assert other.requests == 0, "content reached the app: no silent retry"


async def test_retry_budget_exhaustion_gives_a_clear_503(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_RETRY_BUDGET_PERCENT="0",
                            SIDECAR_RETRY_BUDGET_MIN="2")
    for p in (a, b):
        p.fake.behaviour.update({"fail_next": 1000, "fail_status": 503})
    codes = []
    for i in range(6):
        status, _, body = await chat(http, running, f"budget-{i}")
        codes.append(body["error"]["code"] if status == 503 and "type" in body["error"]
                      and body["error"]["type"] == "sidecar_error" else status)
    # Two retries were in the budget; after that the app is told why, not retried.
    assert codes.count("retry_budget_exhausted") >= 1
    assert running.sidecar.proxy.counters.budget_refusals == codes.count("retry_budget_exhausted")
    assert running.sidecar.proxy.counters.retries == 2


async def test_fallback_holds_then_the_session_returns_to_its_primary(pods, sidecar, http):
    [large] = await pods(1)
    [small] = await pods(1)
    running = await sidecar({"large": pool([large], "large-model", fallback="small"),
                             "small": pool([small], "small-model")},
                            SIDECAR_FALLBACK_HOLD_S="0.5")
    large.fake.behaviour.update({"fail_next": 1, "fail_status": 503})
    _, headers, _ = await chat(http, running, "hold")
    assert headers["x-sidecar-pool"] == "small"
    _, headers, _ = await chat(http, running, "hold")
    assert headers["x-sidecar-pool"] == "small", "held on the fallback"
    await asyncio.sleep(0.6)
    _, headers, _ = await chat(http, running, "hold")
    assert headers["x-sidecar-pool"] == "large", "back on the primary once the hold expired"
    assert "x-sidecar-fallback" not in headers


async def test_a_warming_pool_gets_no_request_and_new_sessions_fall_back(pods, sidecar, http):
    [large] = await pods(1, cold_start_s=0.8)
    [small] = await pods(1)
    running = await sidecar({"large": pool([large], "large-model", fallback="small",
                                           health_path="/health", health_interval_s=0.1),
                             "small": pool([small], "small-model")})
    for i in range(5):
        status, headers, _ = await chat(http, running, f"cold-{i}")
        assert status == 200 and headers["x-sidecar-pool"] == "small"
        assert headers["x-sidecar-fallback"] == "large"
    assert large.requests == 0, "no request reached the warming pod"
    assert running.sidecar.router.counters.cold_start_fallbacks == 5
    async with http.get(admin(running) + "/sessions/cold-0") as r:
        assert "warming" in (await r.json())["local"]["reason"]
    for _ in range(40):
        if running.sidecar.prober.cold_starts:
            break
        await asyncio.sleep(0.05)
    [event] = running.sidecar.prober.cold_starts
    assert event.endpoint == large.url and 0.7 <= event.duration_s < 3
    async with http.get(admin(running) + "/stats") as r:
        assert (await r.json())["cold_starts"][0]["endpoint"] == large.url
    _, headers, _ = await chat(http, running, "after-warm")
    assert headers["x-sidecar-pool"] == "large"


async def test_nothing_ready_anywhere_is_a_retryable_503_never_404(pods, sidecar, http):
    [pod] = await pods(1, cold_start_s=30)
    running = await sidecar({"small": pool([pod], health_path="/health")})
    status, headers, body = await chat(http, running, "nothing")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "no_ready_endpoint"
    assert pod.requests == 0


async def test_bounded_load_spills_new_sessions_off_a_saturated_pod(pods, sidecar, http):
    a, b = await pods(2, ttft_ms=400)
    running = await sidecar({"small": pool([a, b])})
    sessions = [f"hot-{i}" for i in range(40)]
    # All of these sessions' rendezvous choice is pod a.
    on_a = [s for s in sessions
            if running.sidecar.pools.pools["small"].ranked(s.encode())[0].url == a.url][:6]
    results = await asyncio.gather(*(chat(http, running, s) for s in on_a))
    served = [headers["x-sidecar-endpoint"] for _, headers, _ in results]
    assert b.url in served, "a burst of new sessions must not all pile onto one pod"
    assert served.count(a.url) >= 2


async def test_without_bounded_load_they_would_pile_up(pods, sidecar, http):
    a, b = await pods(2, ttft_ms=400)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_BOUNDED_LOAD_FACTOR="0")
    sessions = [f"hot-{i}" for i in range(40)]
    on_a = [s for s in sessions
            if running.sidecar.pools.pools["small"].ranked(s.encode())[0].url == a.url][:6]
    results = await asyncio.gather(*(chat(http, running, s) for s in on_a))
    assert {headers["x-sidecar-endpoint"] for _, headers, _ in results} == {a.url}


async def test_retries_away_from_a_dead_pod_do_not_draw_on_the_budget(pods, sidecar, http):
    [alive] = await pods(1)
    dead = [dead_url() for _ in range(3)]
    running = await sidecar({"small": {"model": "m", "endpoints": [*dead, alive.url]}},
                            SIDECAR_RETRY_BUDGET_PERCENT="0", SIDECAR_RETRY_BUDGET_MIN="0",
                            SIDECAR_MAX_ATTEMPTS="4")
    results = await asyncio.gather(*(chat(http, running, f"dead-{i}") for i in range(20)))
    assert {status for status, _, _ in results} == {200}
    assert running.sidecar.proxy.counters.budget_refusals == 0
    assert running.sidecar.proxy.counters.retries >= 1
