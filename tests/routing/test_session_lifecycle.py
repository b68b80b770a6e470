"""A session's life beyond first touch, on real servers: a subagent's session starts on its
parent's pod (unless that pod has no room: then on the parent's next choice),
`x-session-final` ends a session here, in Redis and on the other sidecars, and a route with
a call in flight outlives idle expiry. Redis in each topology (standalone, Sentinel,
Cluster) where the behaviour touches it."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.fleet.loads import take_reading
from sidecar.fleet.podload import PodLoad
from sidecar.routing.sessions import Route, RouteCache
from sidecar.server import Running
from tests.conftest import CHAT, admin, chat, pool
from tests.routing.test_store_topologies import (  # noqa: F401  (`topology`: a fixture)
    Topology,
    stored,
    topology,
    until,
)
from tests.support.redis_server import Monitor

# A pod's reading when all its slots run and two calls queue: a call sent there may wait a
# whole request (1 s assumed before a completion rate is known), longer than prefilling a
# short prompt anywhere and shorter than prefilling LONG_PROMPT's 12 000 tokens.
QUEUEING = PodLoad(running=8, waiting=2, kv_usage=0.5, at=0.0, source="metrics")
LONG_QUEUE = PodLoad(running=8, waiting=20, kv_usage=0.5, at=0.0, source="metrics")
LONG_PROMPT = {"model": "auto", "messages": [{"role": "user", "content": "x" * 48_000}]}


def endpoint_of(running: Running, url: str):
    [endpoint] = [e for p in running.sidecar.pools.pools.values() for e in p.endpoints
                  if e.url == url]
    return endpoint


def child_elsewhere(running: Running, avoid: str | tuple[str, ...],
                    prefix: str = "child") -> str:
    """A session id whose own placement (no parent) is none of the pods in `avoid` (the
    parent's, and any others)."""
    urls = (avoid,) if isinstance(avoid, str) else avoid
    for i in range(200):
        candidate = f"{prefix}-{i}"
        endpoint = running.sidecar.router.propose(candidate, None).endpoint
        if endpoint is not None and endpoint.url not in urls:
            return candidate
    raise AssertionError("every candidate lands on a pod to avoid")


async def stores_up(*sidecars: Running) -> None:
    """Each sidecar's store answers (a Sentinel topology may still be electing its master
    when a sidecar starts; it reconnects in the background)."""
    await until(lambda: all(s.sidecar.router.store.available for s in sidecars),
                "a sidecar's store never came up")


async def parent_and_child_sidecars(pods, sidecar, http, redis: Topology
                                    ) -> tuple[Running, Running, str]:
    """Two sidecars over four pods sharing `redis`, both stores answering; the parent
    session "lead" placed through the first. Returns them and the parent's pod."""
    small = {"small": pool(await pods(4))}
    a = await sidecar(small, **redis.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, **redis.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    await stores_up(a, b)
    status, headers, _ = await chat(http, a, "lead")
    assert status == 200
    return a, b, headers["x-sidecar-endpoint"]


async def claude_parent(http, running: Running) -> str:
    """A Claude Code session "conv" placed through `running`: its pod."""
    status, headers, _ = await chat(http, running, None, CHAT,
                                    **{"x-claude-code-session-id": "conv"})
    assert status == 200
    return headers["x-sidecar-endpoint"]


async def sessions_on(http, running: Running) -> dict[str, int]:
    async with http.get(admin(running) + "/endpoints") as response:
        assert response.status == 200
        view = await response.json()
    return {e["url"]: e["sessions"] for p in view.values() for e in p["endpoints"]}


async def test_a_child_session_starts_on_its_parents_pod_in_every_topology(
        pods, sidecar, http, topology):  # noqa: F811
    a, b, home = await parent_and_child_sidecars(pods, sidecar, http, topology)
    child = child_elsewhere(b, home)
    # b has never seen the parent: it learns its route from Redis on the child's first touch.
    status, headers, _ = await chat(http, b, child, **{"x-parent-session-id": "lead"})
    assert status == 200 and headers["x-sidecar-endpoint"] == home
    assert (stored(topology, child) or {}).get("endpoint") == home
    assert b.sidecar.router.counters.seeded_from_parent == 1
    # The child's route is its own from now on: a sidecar without it reads it from Redis.
    status, headers, _ = await chat(http, a, child)
    assert status == 200 and headers["x-sidecar-endpoint"] == home
    assert a.sidecar.router.counters.seeded_from_parent == 0


async def test_a_child_does_not_follow_a_parent_whose_pod_is_ejected(
        pods, sidecar, http, topology):  # noqa: F811
    _, b, home = await parent_and_child_sidecars(pods, sidecar, http, topology)
    child = child_elsewhere(b, home)
    endpoint_of(b, home).outlier.eject(retry_at=float("inf"))
    status, headers, _ = await chat(http, b, child, **{"x-parent-session-id": "lead"})
    assert status == 200 and headers["x-sidecar-endpoint"] != home
    assert (stored(topology, child) or {}).get("endpoint") == headers["x-sidecar-endpoint"]
    # Where the sidecar reads the parent's route itself (Cluster: not inside the script),
    # the child starts on the parent session's next choice instead.
    beside = not b.sidecar.router.store.reads_parent_in_script
    assert b.sidecar.router.counters.seeded_from_parent == (1 if beside else 0)


async def test_a_child_weighs_its_parents_full_pod_in_every_topology(
        pods, sidecar, http, topology):  # noqa: F811
    """b has never seen the parent, whose pod b reads as queueing (up to 1 s of wait). A
    child with a prompt that would prefill longer than that elsewhere starts on the parent's
    pod all the same, within its first touch's one script where the topology reads the
    parent there; a child with a short prompt does not."""
    _, b, home = await parent_and_child_sidecars(pods, sidecar, http, topology)
    take_reading(endpoint_of(b, home), QUEUEING)
    child = child_elsewhere(b, home, "long")
    status, headers, _ = await chat(http, b, child, LONG_PROMPT,
                                    **{"x-parent-session-id": "lead"})
    assert status == 200 and headers["x-sidecar-endpoint"] == home
    assert (stored(topology, child) or {}).get("endpoint") == home
    assert b.sidecar.router.counters.seeded_from_parent == 1
    child = child_elsewhere(b, home, "short")
    status, headers, _ = await chat(http, b, child, **{"x-parent-session-id": "lead"})
    assert status == 200 and headers["x-sidecar-endpoint"] != home


async def test_siblings_that_start_on_their_own_pick_share_the_first_ones(pods, sidecar, http):
    """The parent's pod and its next choice queue far longer than the prompt's prefill: the
    first child starts cold on a pick of its own, and its sibling, whose own pick is
    another pod, follows it there, where the parent's prompt is now cached."""
    running = await sidecar({"small": pool(await pods(4))})
    home = await claude_parent(http, running)
    [pool_] = running.sidecar.pools.pools.values()
    beside = next(e for e in pool_.ranked(b"conv") if e.url != home)
    for endpoint in (endpoint_of(running, home), beside):
        take_reading(endpoint, LONG_QUEUE)
    taken = [home, beside.url]
    for name in ("first", "second"):
        child = child_elsewhere(running, tuple(taken), name)
        status, headers, _ = await chat(http, running, None, LONG_PROMPT, **{
            "x-claude-code-session-id": "conv", "x-claude-code-agent-id": child})
        assert status == 200 and headers["x-sidecar-endpoint"] not in (home, beside.url)
        taken.append(headers["x-sidecar-endpoint"])
    assert taken[2] == taken[3]
    assert running.sidecar.router.counters.seeded_from_parent == 1  # the second only


async def test_a_child_starts_on_its_parents_next_choice_while_the_parents_pod_is_full(
        pods, sidecar, http):
    """The parent's pod saturated: the child starts on the parent session's next rendezvous
    choice (where its siblings that overflow go too, sharing the parent's prompt there);
    that one saturated as well, on a pick of its own."""
    running = await sidecar({"small": pool(await pods(3))})
    home = await claude_parent(http, running)
    first = child_elsewhere(running, home, "agent-a")
    claude_child = {"x-claude-code-session-id": "conv", "x-claude-code-agent-id": first}
    status, headers, _ = await chat(http, running, None, CHAT, **claude_child)
    assert status == 200 and headers["x-sidecar-endpoint"] == home
    assert headers["x-sidecar-session"] == first
    take_reading(endpoint_of(running, home), QUEUEING)
    [pool_] = running.sidecar.pools.pools.values()
    beside = next(e for e in pool_.ranked(b"conv") if e.url != home)
    second = child_elsewhere(running, beside.url, "agent-b")
    status, headers, _ = await chat(http, running, None, CHAT, **{
        "x-claude-code-session-id": "conv", "x-claude-code-agent-id": second})
    assert status == 200 and headers["x-sidecar-endpoint"] == beside.url
    assert running.sidecar.router.counters.seeded_from_parent == 2
    take_reading(beside, QUEUEING)
    third = child_elsewhere(running, (home, beside.url), "agent-c")
    status, headers, _ = await chat(http, running, None, CHAT, **{
        "x-claude-code-session-id": "conv", "x-claude-code-agent-id": third})
    assert status == 200 and headers["x-sidecar-endpoint"] not in (home, beside.url)
    assert running.sidecar.router.counters.seeded_from_parent == 2


async def test_a_child_with_a_long_prompt_waits_at_its_parents_full_pod(pods, sidecar, http):
    """The parent's pod queues: a call there may wait a whole request (1 s). A child whose
    prompt would prefill in 1.2 s elsewhere starts there anyway, where the prompt is
    cached; a short one starts on the parent's next choice."""
    running = await sidecar({"small": pool(await pods(3))})
    home = await claude_parent(http, running)
    take_reading(endpoint_of(running, home), QUEUEING)
    for body, child, where in ((LONG_PROMPT, "agent-long", "home"), (CHAT, "agent-short",
                                                                      "beside")):
        status, headers, _ = await chat(http, running, None, body, **{
            "x-claude-code-session-id": "conv",
            "x-claude-code-agent-id": child_elsewhere(running, home, child)})
        assert status == 200
        assert (headers["x-sidecar-endpoint"] == home) == (where == "home"), where
    assert running.sidecar.router.counters.seeded_from_parent == 2


async def test_a_childs_first_touch_is_one_redis_round_trip(pods, sidecar, http, redis_server):
    small = {"small": pool(await pods(4))}
    a = await sidecar(small, SIDECAR_REDIS_URL=redis_server.url)
    b = await sidecar(small, SIDECAR_REDIS_URL=redis_server.url)
    _, headers, _ = await chat(http, a, "lead")
    home = headers["x-sidecar-endpoint"]
    monitor = Monitor(redis_server)
    try:
        for running, child in ((a, child_elsewhere(a, home, "near")),
                               (b, child_elsewhere(b, home, "far"))):
            monitor.reset()
            for _ in range(3):
                _, headers, _ = await chat(http, running, child,
                                           **{"x-parent-session-id": "lead"})
                assert headers["x-sidecar-endpoint"] == home
            commands = [c for c in monitor.commands() if not c.endswith('"PING"')]
            # a holds the parent (read from memory), b does not (read inside the script):
            # one EVALSHA either way, naming the parent's key only when it is read there.
            assert len(commands) == 1 and '"EVALSHA"' in commands[0], commands
            assert ('"llmsc:{lead}"' in commands[0]) is (running is b), commands
    finally:
        monitor.close()


async def test_the_final_call_ends_the_session_here_in_redis_and_on_every_sidecar(
        pods, sidecar, http, topology):  # noqa: F811
    small = {"small": pool(await pods(2))}
    a = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    for running in (a, b):
        _, headers, _ = await chat(http, running, "task")
    pod = headers["x-sidecar-endpoint"]
    before = await sessions_on(http, a)
    assert before[pod] == 1 and stored(topology, "task") is not None
    status, headers, _ = await chat(http, a, "task", **{"x-session-final": "true"})
    assert status == 200 and headers["x-sidecar-endpoint"] == pod
    await until(lambda: a.sidecar.router.cache.peek("task") is None,
                "the final call left its route in memory")
    assert (await sessions_on(http, a))[pod] == before[pod] - 1
    assert stored(topology, "task") is None
    await until(lambda: b.sidecar.router.cache.peek("task") is None,
                "the other sidecar kept the ended session's route")
    assert a.sidecar.router.counters.sessions_ended == 1
    assert a.sidecar.store.incidents == 0


async def test_a_final_header_other_than_true_ends_nothing(pods, sidecar, http):
    running = await sidecar({"small": pool(await pods(1))})
    status, _, _ = await chat(http, running, "kept", **{"x-session-final": "false"})
    assert status == 200
    assert running.sidecar.router.cache.peek("kept") is not None
    assert running.sidecar.router.counters.sessions_ended == 0


@pytest.mark.parametrize("idle_s", ["0.2"])
async def test_a_route_with_a_call_in_flight_outlives_idle_expiry(pods, sidecar, http, idle_s):
    slow, quick = await pods(1, ttft_ms=2000.0), await pods(1)
    running = await sidecar({"slow": pool(slow, model="slow-model"),
                             "quick": pool(quick, model="quick-model")},
                            SIDECAR_SESSION_IDLE_S=idle_s)
    cache = running.sidecar.router.cache
    call = asyncio.create_task(chat(http, running, "long", {**CHAT, "model": "slow-model"}))
    await until(lambda: cache.peek("long") is not None, "the slow call never started")
    assert (await chat(http, running, "short", {**CHAT, "model": "quick-model"}))[0] == 200
    # The idle sweep runs: the finished session's route goes, the one in flight stays.
    await until(lambda: cache.peek("short") is None, "the idle route never expired")
    route = cache.peek("long")
    assert route is not None and route.inflight == 1 and not call.done()
    status, _, _ = await call
    assert status == 200 and route.inflight == 0
    await until(lambda: cache.peek("long") is None, "the route never expired once idle")


def test_idle_expiry_passes_over_routes_in_flight_and_ends_when_all_are():
    cache = RouteCache(max_size=10, idle_s=1.0)
    routes = [Route(f"s{i}", 0, "small", None, 0.0) for i in range(4)]
    for route in routes:
        cache.put(route, 0.0)
    routes[0].inflight = routes[2].inflight = 1
    assert cache.expire_idle(10.0) == 2
    assert [r.session for r in cache] == ["s0", "s2"]  # kept, and now the newest
    assert cache.expire_idle(20.0) == 0  # every route left is busy: the sweep still ends
    routes[0].inflight = 0
    assert cache.expire_idle(40.0) == 1 and [r.session for r in cache] == ["s2"]
