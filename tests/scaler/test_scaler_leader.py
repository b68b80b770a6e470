"""One scaler at a time, on every topology: fencing before each Nomad call, the state a
takeover needs kept in Redis, traffic buckets on Redis's clock, the level published on
Cluster, and a loop that outlives any Redis exception (real Redis, fake Nomad)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from sidecar.fleet.traffic import BUCKET_S, CLOCK_KEY, RedisClock
from sidecar.routing.store import LEVEL_CHANNEL, LEVEL_KEY, connect_redis
from sidecar.scaler.nomad import NomadClient
from sidecar.scaler.policy import Bounds, LoadLevelPolicy, Observation, PredictivePolicy
from sidecar.scaler.service import LEADER_KEY, STATE_KEY, Scaler
from sidecar.supervise import SUPERVISOR
from sidecar.telemetry import Telemetry
from tests.conftest import chat, pool
from tests.routing.test_redis_topologies import Sentinel, start_cluster
from tests.scaler.test_scaler import report_traffic, settings
from tests.support.redis_server import RedisServer

JOB = ("llm-small", "server")


@pytest.fixture
async def scalers(redis_server, nomad) -> AsyncIterator[Callable[..., Scaler]]:
    made: list[Scaler] = []

    def make(instance: str, now: float | None = None, client: Any = None, **extra: str
             ) -> Scaler:
        s = settings(redis_server.url, nomad.addr, **extra)
        scaler = Scaler(s, client or aioredis.Redis(port=redis_server.port), NomadClient(s),
                        Telemetry({}), instance, now=now)
        made.append(scaler)
        return scaler

    yield make
    for scaler in made:
        await scaler.nomad.close()
        await scaler.redis.aclose()


def calls_by_scaler(nomad) -> dict[str, int]:
    return dict(collections.Counter(c["Meta"]["scaler"] for c in nomad.calls))


async def test_a_tick_that_outlives_its_lock_makes_no_nomad_call_once_the_lock_moved(
        scalers, redis_server, nomad):
    now = time.time()
    a = scalers("scaler-a", now=now, SIDECAR_SCALER_INTERVAL_S="0.2")  # the lock lives 0.6 s
    b = scalers("scaler-b", now=now, SIDECAR_SCALER_INTERVAL_S="0.2")
    await report_traffic(redis_server, now, tokens_per_s=5000)  # 5 replicas' worth: scale up
    nomad.status_delays = [2.0]  # a's read of Nomad outlives a's lock
    a_tick = asyncio.create_task(a.tick(now))
    deadline = time.monotonic() + 10
    while not (redis_server.client().get(LEADER_KEY) or b"").startswith(b"scaler-a:"):
        assert time.monotonic() < deadline, "a never took the lock"
        await asyncio.sleep(0.01)
    while not (await b.tick(now)).leader:  # b takes the lock once a's has expired
        assert time.monotonic() < deadline, "b never took the expired lock"
        await asyncio.sleep(0.05)
    assert not a_tick.done(), "a is still waiting for Nomad when b leads"
    report = await a_tick
    # b scaled; a, back from Nomad with a decision made under a lock it lost, did not.
    assert calls_by_scaler(nomad) == {"scaler-b": 1}
    assert not report.leader and report.pools[0].action == "not-leader"


async def test_a_takeover_keeps_the_scale_down_cooldown(scalers, redis_server, nomad):
    now = time.time()
    a = scalers("scaler-a", now=now - 3600)  # both long past their first cold start
    b = scalers("scaler-b", now=now - 3600)
    nomad.desired[JOB] = 8
    await report_traffic(redis_server, now, tokens_per_s=2000)  # 2 replicas' worth
    assert (await a.tick(now)).pools[0].action == "scaled"
    assert calls_by_scaler(nomad) == {"scaler-a": 1} and nomad.desired[JOB] == 2
    nomad.desired[JOB] = 8  # an operator scales back up
    redis_server.client().delete(LEADER_KEY)  # a dies; its lock expires
    await report_traffic(redis_server, now + 60, tokens_per_s=2000)
    report = await b.tick(now + 60)
    assert report.leader and report.pools[0].decision == 2
    assert "cooldown" in report.pools[0].reason, "a's scale-down a minute ago still counts"
    assert calls_by_scaler(nomad) == {"scaler-a": 1}
    await report_traffic(redis_server, now + 400, tokens_per_s=2000)  # cooldown (300 s) over
    assert (await b.tick(now + 400)).pools[0].action == "scaled"
    assert calls_by_scaler(nomad) == {"scaler-a": 1, "scaler-b": 1}


async def test_a_takeover_continues_the_policy_history(scalers, redis_server, nomad):
    now = time.time()
    a = scalers("scaler-a", now=now - 3600)
    b = scalers("scaler-b", now=now - 3600)
    await report_traffic(redis_server, now, tokens_per_s=5000)
    assert (await a.tick(now)).pools[0].decision == 5
    assert nomad.desired[JOB] == 5
    redis_server.client().delete(LEADER_KEY)
    await report_traffic(redis_server, now + 60, tokens_per_s=2000)  # demand falls
    report = await b.tick(now + 60)
    # A replica is kept until a cold start (600 s) passed without a target needing it: a
    # new leader that forgot a's targets would give back three replicas at once.
    assert report.leader and report.pools[0].decision == 5
    assert calls_by_scaler(nomad) == {"scaler-a": 1}
    state = redis_server.client().hgetall(STATE_KEY)
    assert json.loads(state[b"policy:small"])["targets"][0] == [now, 5]


async def test_a_deposed_leader_cannot_overwrite_the_state(scalers, redis_server, nomad):
    now = time.time()
    a = scalers("scaler-a", now=now)
    b = scalers("scaler-b", now=now)
    await report_traffic(redis_server, now, tokens_per_s=1000)
    assert (await a.tick(now)).leader
    redis_server.client().delete(LEADER_KEY)
    assert (await b.tick(now + 5)).leader
    saved = redis_server.client().hget(STATE_KEY, "policy:small")
    a.policies["small"]._means.append((now + 6, 99.0))
    assert not await a._save()
    assert redis_server.client().hget(STATE_KEY, "policy:small") == saved


async def test_a_sidecar_whose_clock_is_behind_lands_its_traffic_where_the_scaler_reads(
        scalers, redis_server, nomad, pods, sidecar, http):
    [pod] = await pods(1, max_tokens=7)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url)
    running.sidecar.traffic.clock = RedisClock(local=lambda: time.time() - 30)  # 30 s behind
    scaler = scalers("scaler-a", now=time.time(), SIDECAR_SCALER_INTERVAL_S="10")  # 2 buckets
    for i in range(5):
        assert (await chat(http, running, f"skew-{i}"))[0] == 200
    await running.sidecar.flush_traffic()
    assert running.sidecar.traffic.clock.offset == pytest.approx(30, abs=1)
    server = redis_server.client()
    seconds, micros = server.time()
    flushed_in = int((seconds + micros / 1e6) // BUCKET_S)
    deadline = time.monotonic() + 3 * BUCKET_S
    while server.time()[0] < (flushed_in + 1) * BUCKET_S:  # that bucket closes (Redis's clock)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    report = await scaler.tick()  # Redis's clock too
    [item] = report.pools
    counted = running.sidecar.traffic.totals["small"]
    assert counted.requests == 5
    tokens = counted.prompt_tokens + counted.completion_tokens
    assert item.demand_mean is not None, "the sidecar's heartbeat was judged stale"
    # Two 5-second buckets' mean, in replicas of 1000 tokens/s.
    assert math.isclose(item.demand_mean * 2 * BUCKET_S * 1000, tokens)


class FailingRedis:
    """A real client whose next script calls raise the given exceptions first."""

    def __init__(self, client: Any, faults: list[BaseException]) -> None:
        self.client = client
        self.faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def register_script(self, script: str) -> AsyncScript:
        return AsyncScript(self, script)

    async def evalsha(self, *args: Any) -> Any:
        if self.faults:
            raise self.faults.pop(0)
        return await self.client.evalsha(*args)


async def test_a_redis_exception_of_each_tree_restarts_the_loop_and_is_logged_once(
        scalers, redis_server, nomad, caplog):
    faults: list[BaseException] = [RedisClusterException("Redis Cluster cannot be connected"),
                                   RedisConnectionError("Connection refused"),
                                   OSError("Network is unreachable")]
    client = FailingRedis(aioredis.Redis(port=redis_server.port), faults)
    scaler = scalers("scaler-a", client=client, SIDECAR_SCALER_INTERVAL_S="0.2")
    restarts = SUPERVISOR.restarts.get("scaler", 0)
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="sidecar")
    running = asyncio.create_task(scaler.run(stop))
    try:
        deadline = time.monotonic() + 20
        while scaler.ticks < 6 or faults:
            assert time.monotonic() < deadline, "the scaler loop did not come back"
            assert not running.done(), "the scaler loop died"
            await asyncio.sleep(0.05)
        assert redis_server.client().get(LEADER_KEY).startswith(b"scaler-a:")
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    assert SUPERVISOR.restarts.get("scaler", 0) - restarts == 3
    complaints = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(complaints) == 1, [r.getMessage() for r in complaints]


async def test_the_level_reaches_redis_cluster_and_every_node_hears_it(nomad):
    nodes = start_cluster()
    listeners = []
    try:
        for node in nodes:  # a sidecar may be subscribed on any node
            listener = redis.Redis(port=node.port).pubsub()
            listener.subscribe(LEVEL_CHANNEL)
            assert listener.get_message(timeout=5)["type"] == "subscribe"
            listeners.append(listener)
        s = settings(nodes[0].url, nomad.addr, SIDECAR_REDIS_MODE="cluster")
        client = connect_redis(nodes[0].url, "cluster", timeout_s=2.0)
        scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-cluster")
        try:
            report = await scaler.tick()
            assert report.leader and report.level == "low"
            await scaler._publish_level("high")
            assert await client.get(LEVEL_KEY) == b"high"
            # The lock and the state share a slot: the fenced save worked.
            assert b"levels" in await client.hgetall(STATE_KEY)
            # The sidecars' clock stream too: one node's clock for the fleet and the scaler.
            slot = nodes[0].client().execute_command("CLUSTER", "KEYSLOT", LEADER_KEY)
            assert nodes[0].client().execute_command("CLUSTER", "KEYSLOT", CLOCK_KEY) == slot
        finally:
            await scaler.nomad.close()
            await client.aclose()
        for listener in listeners:
            heard = []
            for _ in range(2):
                message = listener.get_message(timeout=5)
                assert message is not None, "a node never heard the level"
                heard.append(message["data"])
            assert heard == [b"low", b"high"]
    finally:
        for listener in listeners:
            listener.close()
        for node in nodes:
            node.cleanup()


async def test_the_scaler_leads_and_publishes_through_sentinel(nomad):
    primary = RedisServer().start()
    sentinel = Sentinel(primary.port)
    try:
        url = f"redis://127.0.0.1:{sentinel.port}/0"
        s = settings(url, nomad.addr, SIDECAR_REDIS_MODE="sentinel",
                     SIDECAR_REDIS_SENTINEL_MASTER="primary")
        client = connect_redis(url, "sentinel", 2.0, 4, "primary")
        scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-sentinel")
        try:
            report = await scaler.tick()
        finally:
            await scaler.nomad.close()
            await client.aclose()
        assert report.leader and report.level == "low"
        assert primary.client().get(LEVEL_KEY) == b"low"
        assert primary.client().get(LEADER_KEY).startswith(b"scaler-sentinel:")
        assert primary.client().hexists(STATE_KEY, "levels")
    finally:
        sentinel.stop()
        primary.cleanup()


def test_a_policy_restored_from_its_state_decides_as_the_original():
    bounds = Bounds(1, 20, 600)
    original = PredictivePolicy(bounds, started_at=0.0)
    for step in range(200):  # a day's shape, compressed
        demand = 4 + 3 * math.sin(step / 15) + (6 if step % 37 == 0 else 0)
        original.decide(Observation(step * 15.0, demand * 1.2, demand, None, 5, 5, 0.1))
    copy = PredictivePolicy(bounds, started_at=99.0)
    copy.restore(json.loads(json.dumps(original.state())))
    for step in range(200, 260):
        demand = 2 + (step % 7)
        obs = Observation(step * 15.0, demand * 1.5, demand, None, 5, 5, 0.2 * (step % 3))
        assert copy.decide(obs) == original.decide(obs)
    levels = LoadLevelPolicy()
    levels.decide(0.7)
    again = LoadLevelPolicy()
    again.restore(json.loads(json.dumps(levels.state())))
    assert again.decide(0.7) == levels.decide(0.7) == "medium"


def test_the_redis_clock_is_the_local_clock_plus_the_learned_offset():
    clock = RedisClock(local=lambda: 1000.0)
    assert not clock.synced and clock.now() == 1000.0
    clock.observe([b"1030", b"500000"], sent_at=999.9, received_at=1000.1)  # 30.5 s ahead
    assert clock.synced and clock.now() == pytest.approx(1030.5)
    clock.observe(b"not a TIME reply", 0.0, 0.0)
    assert clock.now() == pytest.approx(1030.5)
