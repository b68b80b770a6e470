"""The route store against a real Redis server: exact round trips per session, pods agreeing
on a new session (also when racing), routes surviving a restart, Redis failing and coming
back."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import orjson

from sidecar.routing.sessions import selector_for
from sidecar.routing.store import route_key
from tests.conftest import chat, pool
from tests.deploy.test_redis_acl import create_users
from tests.support.polling import until
from tests.support.redis_server import Monitor, RedisServer


def sent(monitor: Monitor) -> list[str]:
    """What the sidecar sent, without its pub/sub listener's health-check PINGs."""
    return [c for c in monitor.commands() if not c.endswith('"PING"')]

ROUTES_LOW_ONLY_SMALL = json.dumps({"low": {"small": 16}, "medium": {"small": 16},
                                    "high": {"small": 16}})
ROUTES_HIGH_HALF_LARGE = json.dumps({"low": {"small": 8, "large": 8},
                                     "medium": {"small": 8, "large": 8},
                                     "high": {"small": 8, "large": 8}})


async def test_first_call_is_one_round_trip_and_the_next_20_make_none(
        pods, sidecar, http, redis_server, monitor):
    small = await pods(2)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url)
    monitor.reset()
    status, headers, _ = await chat(http, running, "counted")
    assert status == 200
    commands = sent(monitor)
    assert len(commands) == 1, commands
    assert '"EVALSHA"' in commands[0].upper()
    monitor.reset()
    for _ in range(20):
        status, _, _ = await chat(http, running, "counted")
        assert status == 200
    assert sent(monitor) == []
    stored = orjson.loads(redis_server.client().get(route_key("counted")))
    assert stored["endpoint"] == headers["x-sidecar-endpoint"]
    assert 0 < redis_server.client().ttl(route_key("counted")) <= 86400


async def test_two_sidecar_processes_agree_on_a_session_moved_by_failover(
        pods, sidecar_process, redis_server):
    small = await pods(3)
    env = {"SIDECAR_POOLS": json.dumps({"small": pool(small)}),
           "SIDECAR_REDIS_URL": redis_server.url}
    a = await sidecar_process(env).start()
    b = await sidecar_process(env).start()
    async with aiohttp.ClientSession() as http:
        headers = {"x-session-id": "moved"}
        async with http.post(a.base + "/v1/chat/completions", json={"model": "m"},
                             headers=headers) as r:
            first = r.headers["x-sidecar-endpoint"]
        # Make the session's pod fail once: pod A moves the session and writes the new route.
        [pod] = [p for p in small if p.url == first]
        pod.fake.behaviour.update({"fail_next": 1})
        async with http.post(a.base + "/v1/chat/completions", json={"model": "m"},
                             headers=headers) as r:
            moved_to = r.headers["x-sidecar-endpoint"]
        assert moved_to != first
        for _ in range(50):  # the write is behind the response
            if orjson.loads(redis_server.client().get(route_key("moved")))["endpoint"] == moved_to:
                break
            await asyncio.sleep(0.02)
        # Pod B has never seen the session: it reads the route, not its own rendezvous pick.
        async with http.post(b.base + "/v1/chat/completions", json={"model": "m"},
                             headers=headers) as r:
            assert r.headers["x-sidecar-endpoint"] == moved_to
            assert r.headers["x-sidecar-attempts"] == "1"


async def test_two_sidecars_racing_on_new_sessions_route_them_identically(
        pods, sidecar_process, redis_server, monitor):
    small, large = await pods(2), await pods(2)
    pools = json.dumps({"small": pool(small), "large": pool(large, "large-model")})
    common = {"SIDECAR_POOLS": pools, "SIDECAR_REDIS_URL": redis_server.url,
              "SIDECAR_REDIS_TIMEOUT_MS": "5000"}
    # Different tables, as during a load level change: for selectors 8-15 pod A proposes
    # large and pod B small, so a non-atomic creation would split those sessions.
    a = await sidecar_process({**common, "SIDECAR_ROUTES": ROUTES_HIGH_HALF_LARGE}).start()
    b = await sidecar_process({**common, "SIDECAR_ROUTES": ROUTES_LOW_ONLY_SMALL}).start()
    sessions = [f"race-{i}" for i in range(40)]
    assert sum(selector_for(s) >= 8 for s in sessions) >= 10

    async def call(base: str, session: str, http: aiohttp.ClientSession) -> str:
        async with http.post(base + "/v1/chat/completions", json={"model": "m"},
                             headers={"x-session-id": session}) as r:
            assert r.status == 200
            return r.headers["x-sidecar-endpoint"]

    monitor.reset()
    # Hold Redis while both pods send their first touch: they are in flight at the same moment.
    redis_server.client().execute_command("CLIENT", "PAUSE", "500", "ALL")
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(asyncio.gather(call(a.base, s, http),
                                                        call(b.base, s, http))
                                         for s in sessions))
    disagreements = [(s, x, y) for s, (x, y) in zip(sessions, results, strict=True) if x != y]
    assert disagreements == []
    evalshas = [c for c in sent(monitor) if '"EVALSHA"' in c.upper()]
    for session in sessions:
        assert sum(f"{{{session}}}" in c for c in evalshas) == 2, "both pods raced"
        record = orjson.loads(redis_server.client().get(route_key(session)))
        assert record["endpoint"] in results[sessions.index(session)]


async def test_a_restarted_sidecar_reads_routes_back_from_redis(
        pods, sidecar_process, redis_server):
    small, large = await pods(1), await pods(1)
    pools = json.dumps({"small": pool(small), "large": pool(large, "large-model")})
    first = await sidecar_process({"SIDECAR_POOLS": pools, "SIDECAR_REDIS_URL": redis_server.url,
                                   "SIDECAR_ROUTES": ROUTES_HIGH_HALF_LARGE}).start()
    before: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for i in range(16):
            async with http.post(first.base + "/v1/chat/completions", json={"model": "m"},
                                 headers={"x-session-id": f"restart-{i}"}) as r:
                before[f"restart-{i}"] = r.headers["x-sidecar-pool"]
        assert set(before.values()) == {"small", "large"}
        first.stop()  # SIGKILL: nothing flushed on the way out
        # The new process would send every new session to small; existing ones keep theirs.
        second = await sidecar_process({"SIDECAR_POOLS": pools,
                                        "SIDECAR_REDIS_URL": redis_server.url,
                                        "SIDECAR_ROUTES": ROUTES_LOW_ONLY_SMALL}).start()
        for session, pool_name in before.items():
            async with http.post(second.base + "/v1/chat/completions", json={"model": "m"},
                                 headers={"x-session-id": session}) as r:
                assert r.headers["x-sidecar-pool"] == pool_name
        async with http.post(second.base + "/v1/chat/completions", json={"model": "m"},
                             headers={"x-session-id": "brand-new"}) as r:
            assert r.headers["x-sidecar-pool"] == "small"


async def test_redis_killed_mid_run_calls_keep_succeeding_and_redis_is_used_again(
        pods, sidecar, http, redis_server):
    small = await pods(2)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url)
    store = running.sidecar.store
    for i in range(5):
        assert (await chat(http, running, f"before-{i}"))[0] == 200
    redis_server.stop()
    for i in range(10):
        assert (await chat(http, running, f"before-{i % 5}"))[0] == 200
        status, headers, _ = await chat(http, running, f"during-{i}")
        assert status == 200
        # Deterministic routing: the same answer any pod computes without Redis.
        assert headers["x-sidecar-endpoint"] == running.sidecar.router.propose(
            f"during-{i}", None, alike=True).endpoint.url
    assert not store.available
    assert store.incidents == 1
    assert running.sidecar.router.counters.resolved_without_store >= 1

    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 10
    while not store.available and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert store.available, "the store reconnects by itself"
    assert (await chat(http, running, "after"))[0] == 200
    assert redis_server.client().exists(route_key("after")) == 1
    # Sessions routed while Redis was down are written once it is back.
    assert (await chat(http, running, "during-0"))[0] == 200
    assert redis_server.client().exists(route_key("during-0")) == 1


async def test_redis_down_at_start_routes_without_it(pods, sidecar, http, redis_server):
    [pod] = await pods(1)
    redis_server.stop()
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url)
    status, _, _ = await chat(http, running, "no-redis")
    assert status == 200
    assert not running.sidecar.store.available


async def test_slow_redis_is_not_waited_for_past_the_budget(pods, sidecar, http, redis_server):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_REDIS_TIMEOUT_MS="50")
    redis_server.client().execute_command("CLIENT", "PAUSE", "1500", "ALL")
    status, _, _ = await chat(http, running, "slow-redis")
    assert status == 200
    counters = running.sidecar.store.counters
    assert counters.timeouts == 1
    assert running.sidecar.router.cache.peek("slow-redis").synced is False


async def test_ttl_is_refreshed_at_most_once_per_tenth_of_the_ttl(
        pods, sidecar, http, redis_server, monitor):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_SESSION_TTL_S="10")
    await chat(http, running, "ttl")
    monitor.reset()
    deadline = time.monotonic() + 2.6
    calls = 0
    while time.monotonic() < deadline:
        assert (await chat(http, running, "ttl"))[0] == 200
        calls += 1
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.1)  # let the batched refresh flush
    commands = sent(monitor)
    expires = [c for c in commands if '"EXPIRE"' in c.upper()]
    assert calls > 50
    # 2.6 s at one refresh per 1 s (10 % of 10 s): two or three, never one per request.
    assert 2 <= len(expires) <= 3, commands
    assert len(commands) == len(expires)
    assert redis_server.client().ttl(route_key("ttl")) >= 8


async def test_admin_session_view_and_delete(pods, sidecar, http, redis_server):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url)
    await chat(http, running, "user/42")
    admin = f"http://127.0.0.1:{running.admin_port}"
    async with http.get(admin + "/sessions/user/42") as r:
        view = await r.json()
    assert view["local"]["endpoint"] == pod.url
    assert view["store"]["endpoint"] == pod.url
    async with http.delete(admin + "/sessions/user/42") as r:
        assert (await r.json())["was_cached"] is True
    assert redis_server.client().exists(route_key("user/42")) == 0
    async with http.get(admin + "/sessions/user/42") as r:
        assert r.status == 404


async def test_a_failover_on_one_pod_reaches_the_others_within_a_second(
        pods, sidecar_process, redis_server):
    [large] = await pods(1)
    [small] = await pods(1)
    env = {"SIDECAR_POOLS": json.dumps({"large": pool([large], "large-model", fallback="small"),
                                        "small": pool([small], "small-model")}),
           "SIDECAR_REDIS_URL": redis_server.url}
    a = await sidecar_process(env).start()
    b = await sidecar_process(env).start()
    body = {"model": "large-model", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        for base in (a.base, b.base):  # both pods now hold the session's route in memory
            async with http.post(base + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": "shared"}) as r:
                assert r.headers["x-sidecar-pool"] == "large"
        large.fake.behaviour.update({"fail_next": 1, "fail_status": 503})
        async with http.post(a.base + "/v1/chat/completions", json=body,
                             headers={"x-session-id": "shared"}) as r:
            assert r.headers["x-sidecar-pool"] == "small"
        moved_at = time.monotonic()
        # Pod B follows without failing first: its next call goes straight to small.
        while True:
            async with http.get(b.admin + "/sessions/shared") as r:
                local = (await r.json())["local"]
            if local["fallback"] == "small" or time.monotonic() - moved_at > 1.0:
                break
            await asyncio.sleep(0.02)
        assert local["fallback"] == "small", "pod B did not learn within one second"
        assert local["reason"].startswith("retryable_status from " + large.url)
        large_requests = large.requests
        async with http.post(b.base + "/v1/chat/completions", json=body,
                             headers={"x-session-id": "shared"}) as r:
            assert r.headers["x-sidecar-pool"] == "small"
            assert r.headers["x-sidecar-attempts"] == "1"
            assert r.headers["x-sidecar-fallback"] == "large"
        assert large.requests == large_requests
        assert small.fake.last_request["model"] == "small-model"


async def test_first_touches_on_new_connections_are_still_one_command_each(
        pods, sidecar, http, redis_server, monitor):
    small = await pods(2)
    # A generous budget: this counts commands; on a loaded machine 24 connections opening
    # at once can pass 50 ms, and the store would (rightly) route the rest without Redis.
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_REDIS_TIMEOUT_MS="3000")
    monitor.reset()
    # Concurrent first touches open new pooled connections: no handshake commands.
    results = await asyncio.gather(*(chat(http, running, f"burst-{i}") for i in range(24)))
    assert {status for status, _, _ in results} == {200}
    commands = sent(monitor)
    assert running.sidecar.router.counters.resolved_without_store == 0
    assert len(commands) == 24, commands[:5]
    assert all('"EVALSHA"' in c.upper() for c in commands)


async def test_a_route_moved_while_redis_was_away_is_written_once_it_is_back(
        pods, sidecar, http, redis_server):
    """A failover during an outage moves the session on this pod only; the move is kept and
    written (with its announcement) when Redis answers again, not lost or read back over."""
    small = await pods(2)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url)
    router, store = running.sidecar.router, running.sidecar.store
    _, headers, _ = await chat(http, running, "moving")
    first = headers["x-sidecar-endpoint"]
    redis_server.stop()
    [home] = [p for p in small if p.url == first]
    home.fake.behaviour.fail_next = 1  # its next answer is a 503: the session moves
    status, headers, _ = await chat(http, running, "moving")
    assert status == 200 and headers["x-sidecar-endpoint"] != first
    moved_to = headers["x-sidecar-endpoint"]
    deadline = time.monotonic() + 10
    while router.unwritten_moves == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the write-behind meets the outage
    assert router.unwritten_moves == 1

    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 15
    while redis_server.client().get(route_key("moving")) is None and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    stored = redis_server.client().get(route_key("moving"))
    assert stored is not None, "the move was never written"
    assert orjson.loads(stored)["endpoint"] == moved_to
    assert router.unwritten_moves == 0 and store.available
    # and the session stays where it moved
    assert (await chat(http, running, "moving"))[1]["x-sidecar-endpoint"] == moved_to


async def test_a_server_that_refuses_writes_keeps_the_store_down_instead_of_flapping(
        pods, sidecar, http, redis_server):
    """A standalone URL that points at a replica answers reads and refuses writes: the
    reconnect probe writes too, so the store stays down (one incident) rather than coming
    "back" every half second and tripping again on the next write."""
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(redis_server.port))).start()
    try:
        small = await pods(2)
        running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=replica.url)
        store = running.sidecar.store
        for i in range(3):
            assert (await chat(http, running, f"refused-{i}"))[0] == 200
        await asyncio.sleep(2.0)  # four reconnect probes' worth
        for i in range(3):
            assert (await chat(http, running, f"refused-more-{i}"))[0] == 200
        assert not store.available
        assert store.incidents == 1
    finally:
        replica.cleanup()


async def test_a_command_redis_refuses_as_wrong_is_not_asked_again_on_every_request(
        pods, sidecar, http, redis_server, monitor):
    """A route key of the wrong type (WRONGTYPE: a bug, not an outage) fails the first touch
    once; the session is then served without asking Redis on each request."""
    small = await pods(2)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url)
    redis_server.client().hset(route_key("wrong-type"), "x", "1")
    monitor.reset()
    assert (await chat(http, running, "wrong-type"))[0] == 200
    assert len(sent(monitor)) == 1
    monitor.reset()
    for _ in range(20):
        assert (await chat(http, running, "wrong-type"))[0] == 200
    assert sent(monitor) == []
    assert running.sidecar.store.available and running.sidecar.store.counters.bugs == 1


async def test_a_move_made_while_locked_out_does_not_undo_a_later_one(
        pods, sidecar, http, redis_server):
    """Pod A moves a session while Redis refuses it (its ACL user revoked); pod B, still
    served, moves the same session later and writes it. When A is let back in, its older
    move is not written over B's: Redis keeps B's route, and A takes it."""
    home, first, later = await pods(3)
    users = create_users(redis_server)
    passwords = {name: password for name, (password, _) in users.items()}
    small = {"small": pool([home, first, later])}
    a = await sidecar(small, SIDECAR_REDIS_URL=users["llm-sidecar"][1],
                      SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, SIDECAR_REDIS_URL=redis_server.url,
                      SIDECAR_REDIS_TIMEOUT_MS="1000")
    # A session whose rendezvous order is home, first, later: each failover takes the next.
    order = [home.url, first.url, later.url]
    ranked = a.sidecar.pools.pools["small"].ranked
    session = next(f"late-{i}" for i in range(500)
                   if [e.url for e in ranked(f"late-{i}".encode())] == order)
    for running in (a, b):
        assert (await chat(http, running, session))[1]["x-sidecar-endpoint"] == home.url

    redis_server.client().execute_command("ACL", "SETUSER", "llm-sidecar", "-@all",
                                          "resetchannels")
    home.fake.behaviour.update({"fail_next": 1, "fail_status": 503})
    status, headers, _ = await chat(http, a, session)
    assert status == 200 and headers["x-sidecar-endpoint"] == first.url
    await until(lambda: a.sidecar.router.unwritten_moves == 1, "A's move was never noted")

    await asyncio.sleep(0.3)  # B's move is later than A's by more than a stamp's resolution
    home.fake.behaviour.update({"fail_next": 1, "fail_status": 503})
    first.fake.behaviour.update({"fail_next": 1, "fail_status": 503})
    status, headers, _ = await chat(http, b, session)
    assert status == 200 and headers["x-sidecar-endpoint"] == later.url
    await until(lambda: orjson.loads(redis_server.client().get(route_key(session)))
                ["endpoint"] == later.url, "B's move was never written")

    create_users(redis_server, passwords=passwords)  # A is let back in

    def a_follows() -> bool:
        route = a.sidecar.router.cache.peek(session)
        return route is not None and route.endpoint is not None \
            and route.endpoint.url == later.url and a.sidecar.router.unwritten_moves == 0
    await until(a_follows, "A kept its older move")
    assert a.sidecar.store.counters.later_kept == 1
    assert orjson.loads(redis_server.client().get(route_key(session)))["endpoint"] == later.url
    assert (await chat(http, a, session))[1]["x-sidecar-endpoint"] == later.url
    assert (await chat(http, b, session))[1]["x-sidecar-endpoint"] == later.url
