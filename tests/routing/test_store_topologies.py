"""The route store in each Redis topology (standalone, Sentinel, Cluster) on real servers:
a moved route is written and announced, DELETE /sessions forgets everywhere, a burst waits
for a pooled connection instead of tripping the breaker, a full cluster outage heals, and a
stopped (silent) Redis is noticed by the pub/sub listener."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from redis.crc import key_slot

from sidecar.fleet.traffic import inflight_key
from sidecar.routing.store import LEVEL_CHANNEL, StoreUnavailable, route_key
from sidecar.server import Running
from tests.conftest import admin, chat, pool
from tests.routing.test_redis_topologies import Sentinel, start_cluster
from tests.support.polling import until
from tests.support.redis_server import RedisServer

MODES = ("standalone", "sentinel", "cluster")


@dataclass
class Topology:
    mode: str
    env: dict[str, str]
    nodes: list[RedisServer]
    stop: list[Callable[[], None]] = field(default_factory=list)

    def client(self) -> Any:
        """A synchronous client that reads any key of this topology."""
        if self.mode == "cluster":
            return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port,
                                      socket_timeout=2)
        return self.nodes[0].client()


@pytest.fixture(params=MODES)
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    mode = request.param
    if mode == "cluster":
        nodes = start_cluster()
        made = Topology(mode, {"SIDECAR_REDIS_URL": nodes[0].url,
                               "SIDECAR_REDIS_MODE": "cluster"}, nodes)
    else:
        nodes = [RedisServer().start()]
        made = Topology(mode, {"SIDECAR_REDIS_URL": nodes[0].url}, nodes)
        if mode == "sentinel":
            try:
                sentinel = Sentinel(nodes[0].port)
            except BaseException:
                nodes[0].cleanup()
                raise
            made.stop.append(sentinel.stop)
            made.env = {"SIDECAR_REDIS_URL": f"redis://127.0.0.1:{sentinel.port}/0",
                        "SIDECAR_REDIS_MODE": "sentinel",
                        "SIDECAR_REDIS_SENTINEL_MASTER": "primary"}
    try:
        yield made
    finally:
        for stop in made.stop:
            stop()
        for node in nodes:
            node.cleanup()


def stored(topology: Topology, session: str) -> dict[str, Any] | None:
    raw = topology.client().get(route_key(session))
    return None if raw is None else orjson.loads(raw)


async def test_a_route_moved_by_failover_is_written_and_announced(pods, sidecar, http,
                                                                  topology):
    first_pod, second_pod = await pods(2)
    small = {"small": pool([first_pod, second_pod])}
    a = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    _, headers, _ = await chat(http, a, "moved")
    assert (await chat(http, b, "moved"))[1]["x-sidecar-endpoint"] == \
        headers["x-sidecar-endpoint"]
    home = first_pod if headers["x-sidecar-endpoint"] == first_pod.url else second_pod
    other = second_pod if home is first_pod else first_pod
    home.fake.behaviour.update({"fail_next": 1, "fail_status": 503, "retry_after": "2"})
    status, headers, _ = await chat(http, a, "moved")  # a fails the session over
    assert status == 200 and headers["x-sidecar-endpoint"] == other.url
    await until(lambda: (stored(topology, "moved") or {}).get("endpoint") == other.url,
                "the moved route was never written to Redis")

    def b_follows() -> bool:
        route = b.sidecar.router.cache.peek("moved")
        return route is not None and route.endpoint is not None \
            and route.endpoint.url == other.url
    await until(b_follows, "the other sidecar never heard of the move")
    assert b.sidecar.router.counters.remote_changes == 1
    status, headers, _ = await chat(http, b, "moved")
    assert status == 200 and headers["x-sidecar-endpoint"] == other.url
    assert headers["x-sidecar-attempts"] == "1"
    for running in (a, b):
        counters = running.sidecar.store.counters
        assert counters.errors == counters.timeouts == 0 and running.sidecar.store.incidents == 0


async def test_a_route_change_older_than_the_stored_one_is_not_written(pods, sidecar, http,
                                                                      topology):
    """Of two pods' delayed writes of one session's route, the later change wins whatever
    order the writes arrive in: an older one leaves Redis as it is, announces nothing, and
    hands the later record back; a newer one is written and announced."""
    first_pod, second_pod = await pods(2)
    small = {"small": pool([first_pod, second_pod])}
    a = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    for running in (a, b):
        assert (await chat(http, running, "raced"))[0] == 200
    route = a.sidecar.router.cache.peek("raced")
    now = time.time()
    later = orjson.dumps({**orjson.loads(route.record()), "endpoint": second_pod.url,
                          "changed_at": now})
    older = orjson.dumps({**orjson.loads(route.record()), "endpoint": first_pod.url,
                          "changed_at": now - 5})
    assert await a.sidecar.store.update("raced", later, now) is None
    await until(lambda: b.sidecar.store.changes_received == 1, "the later move never arrived")
    assert await b.sidecar.store.update("raced", older, now - 5) == later
    assert (stored(topology, "raced") or {}).get("endpoint") == second_pod.url
    assert b.sidecar.store.counters.later_kept == 1
    newest = orjson.dumps({**orjson.loads(older), "changed_at": now + 5})
    assert await b.sidecar.store.update("raced", newest, now + 5) is None
    assert (stored(topology, "raced") or {}).get("endpoint") == first_pod.url
    await until(lambda: a.sidecar.store.changes_received >= 1, "the newest move never arrived")
    await asyncio.sleep(0.3)  # had the refused write been announced, it would be heard too
    assert a.sidecar.store.changes_received == 1
    # A change made just now (a live failover) is written as the latest, whatever the
    # clocks say: a pod whose clock runs ahead must not hold another's failover back.
    assert await a.sidecar.store.update("raced", later) is None
    assert (stored(topology, "raced") or {}).get("endpoint") == second_pod.url


async def test_delete_session_forgets_the_route_in_redis_and_on_every_pod(pods, sidecar, http,
                                                                          topology):
    small = {"small": pool(await pods(2))}
    a = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    b = await sidecar(small, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
    for running in (a, b):
        assert (await chat(http, running, "gone"))[0] == 200
    assert stored(topology, "gone") is not None
    async with http.delete(admin(a) + "/sessions/gone") as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["was_cached"] is True
    assert stored(topology, "gone") is None
    await until(lambda: b.sidecar.router.cache.peek("gone") is None,
                "the other sidecar kept the forgotten route")
    assert a.sidecar.store.incidents == 0


async def test_a_burst_of_first_touches_waits_for_a_connection(pods, sidecar, topology):
    running = await sidecar({"small": pool(await pods(2))}, **topology.env,
                            SIDECAR_REDIS_MAX_CONNECTIONS="8", SIDECAR_REDIS_TIMEOUT_MS="5000")
    # No client-side connection limit: all 200 first touches reach the sidecar at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(chat(http, running, f"burst-{i}")
                                         for i in range(200)))
    assert {status for status, _, _ in results} == {200}
    store = running.sidecar.store
    assert store.counters.created == 200, store.counters.view()
    assert store.incidents == 0, store.counters.view()
    assert running.sidecar.router.counters.resolved_without_store == 0
    client = topology.client()
    assert sum(client.exists(route_key(f"burst-{i}")) for i in range(200)) == 200
    # The batched TTL refresh and the traffic flush are pipelines across slots (Cluster).
    for i in range(200):
        client.expire(route_key(f"burst-{i}"), 100)
    await store.refresh([f"burst-{i}" for i in range(200)])
    assert all(client.ttl(route_key(f"burst-{i}")) > 100 for i in range(200))
    await running.sidecar.flush_traffic()
    assert client.hgetall(inflight_key("small"))
    assert store.counters.errors == store.counters.bugs == store.counters.timeouts == 0


def task_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()  # "Task exception was never retrieved" is logged when the task is freed
    return [r.getMessage() for r in caplog.records
            if "never retrieved" in r.getMessage() or "Task was destroyed" in r.getMessage()]


async def changes_arrive(sender: Running, receiver: Running, session: str,
                         timeout: float) -> float:
    """Announce `session`'s route from `sender` until `receiver` hears it; returns the wait."""
    started = time.monotonic()
    before = receiver.sidecar.store.changes_received
    record = sender.sidecar.router.cache.peek(session).record()
    while receiver.sidecar.store.changes_received == before:
        assert time.monotonic() - started < timeout, "route changes never arrived again"
        with contextlib.suppress(StoreUnavailable):
            await sender.sidecar.store.update(session, record)
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def levels_arrive(nodes: list[RedisServer], receiver: Running, level: str,
                        timeout: float) -> float:
    """Publish `level` until `receiver` hears it; returns the wait."""
    started = time.monotonic()
    while receiver.sidecar.router.level != level:
        assert time.monotonic() - started < timeout, "load levels never arrived again"
        with contextlib.suppress(redis.RedisError):
            nodes[0].client().publish(LEVEL_CHANNEL, level)
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_a_full_cluster_outage_heals_by_itself(pods, sidecar, http, caplog):
    caplog.set_level(logging.INFO)
    nodes = start_cluster()
    try:
        small = {"small": pool(await pods(2))}
        env = {"SIDECAR_REDIS_URL": nodes[0].url, "SIDECAR_REDIS_MODE": "cluster",
               "SIDECAR_REDIS_TIMEOUT_MS": "500"}
        a = await sidecar(small, **env)
        b = await sidecar(small, **env)
        for running in (a, b):
            assert (await chat(http, running, "steady"))[0] == 200
        await levels_arrive(nodes, a, "medium", timeout=10)

        for node in nodes:  # every node at once
            node.stop()
        for i in range(5):  # requests keep being served, routed without the store
            assert (await chat(http, a, f"outage-{i}"))[0] == 200
        await until(lambda: not a.sidecar.store.available, "the outage went unnoticed")
        await asyncio.sleep(3.0)  # long enough for every task to meet the outage

        for node in nodes:  # same ports, same nodes.conf: the cluster forms again
            node.start()
        store_back = await until(lambda: a.sidecar.store.available
                                 and b.sidecar.store.available,
                                 "the store never came back", timeout=30)
        level_again = await levels_arrive(nodes, a, "high", timeout=30)
        heard_again = await changes_arrive(b, a, "steady", timeout=30)
        assert (await chat(http, a, "after"))[0] == 200
        client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port, socket_timeout=2)
        assert client.exists(route_key("after")) == 1
        # The traffic flush resumes (the restarted nodes lost every key: no persistence).
        flushed = await until(lambda: client.exists(inflight_key("small")) == 1,
                              "the traffic flush never resumed", timeout=30)
        print(f"after the restart: store available in {store_back:.1f} s, a level heard "
              f"again {level_again:.1f} s later, a route change {heard_again:.1f} s after "
              f"that, traffic flushed {flushed:.1f} s later")
        await until(lambda: min(a.sidecar.store.subscriptions,
                                b.sidecar.store.subscriptions) >= 2,
                    "a listener never subscribed again", timeout=30)
        for running in (a, b):  # every task met the outage and lives on
            supervisor = running.sidecar.supervisor
            assert supervisor.restarts.get("redis pub/sub listener", 0) >= 1
            assert supervisor.restarts.get("redis reconnect", 0) >= 1
            assert {"redis pub/sub listener", "traffic flush", "route TTL refresh",
                    "route cache sweep", "telemetry flush"} <= set(supervisor.running())
        assert task_errors(caplog) == []
    finally:
        for node in nodes:
            node.cleanup()


async def test_during_a_cluster_outage_two_sidecars_place_a_new_session_alike(
        pods, sidecar, http):
    """Without Redis there is no shared route to agree on, so a new session starts on the pod
    every sidecar computes alike (rendezvous over the ready pods), never on one weighed by
    what only one sidecar sees: here its own call held on the session's first choice."""
    nodes = start_cluster()
    fleet = await pods(3)
    busy = fleet[0]
    try:
        env = {"SIDECAR_REDIS_URL": nodes[0].url, "SIDECAR_REDIS_MODE": "cluster",
               "SIDECAR_REDIS_TIMEOUT_MS": "200"}
        a = await sidecar({"small": pool(fleet)}, **env)
        b = await sidecar({"small": pool(fleet)}, **env)
        ranked = a.sidecar.pools.pools["small"].ranked
        held, *fresh = itertools.islice(
            (s for s in (f"outage-{i}" for i in itertools.count())
             if ranked(s.encode())[0].url == busy.url), 4)
        for node in nodes:
            node.stop()
        for running in (a, b):  # each meets the outage once, then routes without the store
            assert (await chat(http, running, "noticing"))[0] == 200
            await until(lambda r=running: not r.sidecar.store.available,
                        "the outage went unnoticed")
        async with http.post(busy.url + "/_control", json={"hang": True}):
            pass
        calls = [asyncio.ensure_future(chat(http, a, held))]
        [endpoint] = [e for e in a.sidecar.pools.all_endpoints() if e.url == busy.url]
        await until(lambda: endpoint.inflight == 1, "the held call never reached its pod")
        placed: dict[str, tuple[str | None, str | None]] = {}
        routes = [running.sidecar.router.cache for running in (a, b)]
        for session in fresh:
            calls += [asyncio.ensure_future(chat(http, running, session)) for running in (a, b)]
            await until(lambda s=session: all(c.peek(s) for c in routes),
                        "a new session was never routed")
            ends = [c.peek(session).endpoint for c in routes]
            placed[session] = (ends[0] and ends[0].url, ends[1] and ends[1].url)
        async with http.post(busy.url + "/_control", json={"hang": False}):
            pass
        answers = await asyncio.gather(*calls)
        assert [status for status, _, _ in answers] == [200] * len(calls)
        assert placed == {s: (busy.url, busy.url) for s in fresh}, placed
        assert a.sidecar.router.counters.resolved_without_store >= len(fresh) + 1
    finally:
        with contextlib.suppress(Exception):  # never leave a call hanging on the pod
            async with http.post(busy.url + "/_control", json={"hang": False}):
                pass
        for node in nodes:
            node.cleanup()


async def test_a_stopped_redis_is_noticed_and_resubscribed_after_it_resumes(
        pods, sidecar, redis_server):
    running = await sidecar({"small": pool(await pods(1))},
                            SIDECAR_REDIS_URL=redis_server.url, SIDECAR_LOAD_LEVEL="low",
                            SIDECAR_REDIS_TIMEOUT_MS="200")
    publisher = redis_server.client()
    publisher.publish(LEVEL_CHANNEL, "medium")
    await until(lambda: running.sidecar.router.level == "medium", "the listener is not up")
    store = running.sidecar.store
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # alive to TCP, silent to every command: no reset, no FIN
    try:
        noticed = await until(
            lambda: running.sidecar.supervisor.restarts.get("redis pub/sub listener", 0) >= 1,
            "the listener never noticed a silent Redis", timeout=20)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()

    def level_arrives() -> bool:
        publisher.publish(LEVEL_CHANNEL, "high")
        return running.sidecar.router.level == "high"
    await until(level_arrives, "no level arrived after Redis resumed", timeout=30)
    print(f"silence noticed after {noticed:.1f} s; a level arrived "
          f"{time.monotonic() - resumed_at:.1f} s after SIGCONT")
    assert store.subscriptions >= 2
    await until(lambda: store.available, "the store never came back")


async def test_a_sentinel_switchover_sends_writes_to_the_new_primary(pods, sidecar, http):
    """The old primary stays up as a replica: connections to it must not keep failing."""
    primary = RedisServer().start()
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    sentinel = Sentinel(primary.port)
    try:
        running = await sidecar({"small": pool(await pods(1))},
                                SIDECAR_REDIS_URL=f"redis://127.0.0.1:{sentinel.port}/0",
                                SIDECAR_REDIS_MODE="sentinel",
                                SIDECAR_REDIS_SENTINEL_MASTER="primary",
                                SIDECAR_REDIS_TIMEOUT_MS="500")
        assert (await chat(http, running, "before"))[0] == 200
        assert primary.client().exists(route_key("before")) == 1
        watcher = redis.Redis(port=sentinel.port, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:  # the sentinel must have seen the replica before it can promote it
            try:
                watcher.execute_command("SENTINEL", "FAILOVER", "primary")
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline, "the sentinel never found the replica"
                await asyncio.sleep(0.2)
        await until(lambda: sentinel.master() == replica.port, "no switchover", timeout=30)
        await until(lambda: primary.client().info("replication")["role"] == "slave",
                    "the old primary did not follow", timeout=30)
        for i in range(100):  # new sessions reach the new primary again
            assert (await chat(http, running, f"after-{i}"))[0] == 200
            if replica.client().exists(route_key(f"after-{i}")):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("routes never reached the new primary")
        assert running.sidecar.store.counters.bugs == 0
    finally:
        sentinel.stop()
        replica.cleanup()
        primary.cleanup()


def migrate_slots(source: RedisServer, target: RedisServer, slots: list[int],
                  nodes: list[RedisServer]) -> None:
    """Move `slots` from `source` to `target` the way redis-cli --cluster reshard does:
    importing/migrating, MIGRATE key by key (clients meet ASK), then the new owner (MOVED)."""
    src, dst = source.client(), target.client()
    src_id = src.execute_command("CLUSTER", "MYID")
    dst_id = dst.execute_command("CLUSTER", "MYID")
    for slot in slots:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10):
            for key in keys:
                src.execute_command("MIGRATE", "127.0.0.1", target.port, key, 0, 5000)
            time.sleep(0.01)  # let the sidecars' commands meet ASK
        for node in nodes:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


async def test_slots_migrating_under_load_cost_no_route(pods, sidecar, http):
    # No node fails here: a node timeout above the shared machine's stalls keeps the cluster
    # from declaring itself down (CLUSTERDOWN) while it moves slots under load.
    nodes = start_cluster(args=("--cluster-node-timeout", "5000"))
    try:
        small = {"small": pool(await pods(2))}
        env = {"SIDECAR_REDIS_URL": nodes[0].url, "SIDECAR_REDIS_MODE": "cluster",
               "SIDECAR_REDIS_TIMEOUT_MS": "2000"}
        a = await sidecar(small, **env)

        def slot(session: str) -> int:
            return int(key_slot(route_key(session).encode()))
        old = [f"mig-{i}" for i in range(600) if slot(f"mig-{i}") < 16384 // 3][:40]
        for session in old:
            assert (await chat(http, a, session))[0] == 200
        slots = sorted({slot(s) for s in old})
        # New sessions on the same slots: each a first touch while its slot moves.
        new = [f"new-{i}" for i in range(200_000) if slot(f"new-{i}") in slots][:400]
        moving = asyncio.create_task(asyncio.to_thread(migrate_slots, nodes[0], nodes[1],
                                                       slots, nodes))
        statuses, i = [], 0
        while not moving.done() and i < len(new):
            statuses.append((await chat(http, a, new[i]))[0])
            route = a.sidecar.router.cache.peek(old[i % len(old)])
            await a.sidecar.store.update(route.session, route.record())  # a moved route
            i += 1
        await moving
        assert i > 0 and set(statuses) == {200}
        target = nodes[1].client()
        assert all(target.exists(route_key(s)) for s in old + new[:i]), "a route was lost"
        counters = a.sidecar.store.counters
        assert counters.bugs == 0 and a.sidecar.router.counters.resolved_without_store == 0, \
            counters.view()
        print(f"{len(slots)} slots moved under {i} first touches and {i} route writes: "
              f"{a.sidecar.store.incidents} incidents, {counters.view()}")
    finally:
        for node in nodes:
            node.cleanup()


async def test_a_route_moved_while_the_listener_was_away_is_reread_on_next_use(
        pods, sidecar, http, redis_server):
    first_pod, second_pod = await pods(2)
    small = {"small": pool([first_pod, second_pod])}
    env = {"SIDECAR_REDIS_URL": redis_server.url, "SIDECAR_REDIS_TIMEOUT_MS": "1000"}
    a = await sidecar(small, **env)
    b = await sidecar(small, **env)
    _, headers, _ = await chat(http, a, "missed")
    await chat(http, b, "missed")
    home = first_pod if headers["x-sidecar-endpoint"] == first_pod.url else second_pod
    other = second_pod if home is first_pod else first_pod
    # a's listener is cut off and cannot subscribe again until b has moved the session.
    subscribe = a.sidecar.store.client.pubsub
    away = asyncio.Event()

    def refused() -> Any:
        pubsub = subscribe()

        async def refuse(*channels: str) -> None:
            away.set()
            raise redis.exceptions.ConnectionError("Connection refused (test)")
        pubsub.subscribe = refuse
        return pubsub
    a.sidecar.store.client.pubsub = refused
    redis_server.client().client_kill_filter(_type="pubsub")
    await asyncio.wait_for(away.wait(), 10)
    home.fake.behaviour.update({"fail_next": 1, "fail_status": 503, "retry_after": "1"})
    _, headers, _ = await chat(http, b, "missed")  # b fails the session over
    assert headers["x-sidecar-endpoint"] == other.url
    await until(lambda: (orjson.loads(redis_server.client().get(route_key("missed")))
                         ["endpoint"] == other.url), "b never wrote the move")
    changes = a.sidecar.store.changes_received
    subscribed = a.sidecar.store.subscriptions
    a.sidecar.store.client.pubsub = subscribe
    # a's own count, not Redis's: Redis counts the subscription before a has read its
    # confirmation, and only then does a mark its cached routes for a re-read.
    await until(lambda: a.sidecar.store.subscriptions > subscribed, "a never subscribed again")
    assert a.sidecar.store.changes_received == changes, "a heard nothing while it was away"
    status, headers, _ = await chat(http, a, "missed")
    assert status == 200 and headers["x-sidecar-endpoint"] == other.url, \
        "a kept the route it held before the move"
    assert headers["x-sidecar-attempts"] == "1"


async def test_delete_session_says_when_redis_could_not_forget_it(pods, sidecar, http,
                                                                  redis_server):
    running = await sidecar({"small": pool(await pods(1))}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_REDIS_TIMEOUT_MS="500")
    assert (await chat(http, running, "kept"))[0] == 200
    redis_server.stop()
    async with http.delete(admin(running) + "/sessions/kept") as response:
        assert response.status == 503
        body = await response.json()
    assert body["forgotten"] is False and body["was_cached"] is True and body["store_error"]
    assert running.sidecar.router.cache.peek("kept") is None
