"""The route store in each Redis topology (standalone, Sentinel, Cluster) on real servers:
a moved route is written and announced, DELETE /sessions forgets everywhere, a burst waits
for a pooled connection instead of tripping the breaker, a full cluster outage heals, and a
stopped (silent) Redis is noticed by the pub/sub listener."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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

from sidecar.server import Running
from sidecar.store import LEVEL_CHANNEL, StoreUnavailable, route_key
from sidecar.traffic import inflight_key
from tests.conftest import admin, chat, pool
from tests.redis_server import RedisServer
from tests.test_redis_topologies import Sentinel, start_cluster

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


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> float:
    """Wait for `condition` (a generous bound that only catches a hang); returns the wait."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        await asyncio.sleep(0.05)
    return time.monotonic() - started


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
        await changes_arrive(b, a, "steady", timeout=10)

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
        heard_again = await changes_arrive(b, a, "steady", timeout=30)
        assert (await chat(http, a, "after"))[0] == 200
        client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port, socket_timeout=2)
        assert client.exists(route_key("after")) == 1
        # The traffic flush resumes (the restarted nodes lost every key: no persistence).
        flushed = await until(lambda: client.exists(inflight_key("small")) == 1,
                              "the traffic flush never resumed", timeout=30)
        print(f"after the restart: store available in {store_back:.1f} s, route changes "
              f"heard again {heard_again:.1f} s later, traffic flushed {flushed:.1f} s later")
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
