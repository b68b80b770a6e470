"""Basic failover: next endpoint of the pool, then the fallback chain with `model`
rewritten, bounded by SIDECAR_MAX_ATTEMPTS; the new route sticks."""

from __future__ import annotations

from sidecar.pools import EndpointState
from tests.conftest import admin, chat, dead_url, pool


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
    large.fake.behaviour.update({"fail_next": 100, "fail_status": 502})
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


async def test_first_byte_timeout_fails_over(pods, sidecar, http):
    a, b = await pods(2)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_FIRST_BYTE_TIMEOUT_S="0.3")
    _, headers, _ = await chat(http, running, "slow")
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    first.fake.behaviour.update({"hang": True})
    first.fake._released.clear()
    try:
        status, headers, _ = await chat(http, running, "slow")
        assert status == 200
        assert headers["x-sidecar-endpoint"] == other.url
    finally:
        first.fake.behaviour.update({"hang": False})
        first.fake._released.set()
