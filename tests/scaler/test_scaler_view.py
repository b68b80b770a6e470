"""The scaler's saturation signal from the fleet monitor's pod view: the worst ready pod, not
the pool's mean (pure policy), and views written into real Redis (standalone and Cluster)
driving the decision, with the sidecars' pod-load sums read only while a view is stale."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.fleet.loads import format_pod_load, pod_load_key
from sidecar.fleet.podload import GpuUsage, PodLoad
from sidecar.fleet.podview import STALE_INTERVALS, EndpointView, ViewState, encode, view_key
from sidecar.routing.store import connect_redis
from sidecar.scaler.nomad import NomadClient
from sidecar.scaler.policy import (
    GPU_IDLE,
    KV_FULL,
    SATURATION,
    Bounds,
    Observation,
    PodSample,
    PredictivePolicy,
    pressure,
)
from sidecar.scaler.service import Scaler
from sidecar.telemetry import Telemetry
from tests.routing.test_redis_topologies import start_cluster
from tests.scaler.test_scaler import POOLS, make_scaler, report_traffic, settings  # noqa: F401
from tests.support.redis_server import Monitor

JOB = ("llm-small", "server")


def mean_queue(pods: list[PodSample]) -> float:
    """Today's pool-level signal: the pods' sums, waiting ÷ running."""
    return sum(p.waiting for p in pods) / max(sum(p.running for p in pods), 1)


def decisions(queued: float, ticks: int = 4) -> list[int]:
    """A pool of 4 offered 3.5 replicas' worth of work, fed `queued` every tick."""
    policy = PredictivePolicy(Bounds(1, 20, 600), prior_floor=0, started_at=-3600)
    return [policy.decide(Observation(15.0 * i, 3.5, 3.5, 0.9, 4, 4, queued=queued)).count
            for i in range(ticks)]


# One pod holds a queue (sticky sessions landed there); nine run the same batch size idle
# of any queue. The mean dilutes the queue under the threshold; the worst pod does not.
ONE_HOT = [PodSample(8, 3, 0.6, 0.97)] + [PodSample(8, 0, 0.4, 0.9)] * 9


def test_one_pod_queueing_among_idle_ones_saturates_the_pool():
    signal = pressure(ONE_HOT)
    assert signal.queued == 0.375 and signal.stalled == 0
    assert mean_queue(ONE_HOT) < SATURATION, "the mean would have said: not saturated"
    assert decisions(signal.queued) == [4, 4, 5, 5], \
        "three intervals of the worst pod queueing raise the level (3.5) by its share"
    assert decisions(mean_queue(ONE_HOT)) == [4, 4, 4, 4]


def test_pods_evenly_loaded_below_the_threshold_do_not_saturate_the_pool():
    even = [PodSample(25, 1, 0.7, 0.95)] * 8  # 0.04 waiting per running at every pod
    assert pressure(even).queued == 0.04 < SATURATION
    assert decisions(pressure(even).queued) == [4, 4, 4, 4]


def test_a_full_kv_cache_counts_but_kv_usage_alone_is_not_the_signal():
    full = pressure([PodSample(8, 0, KV_FULL + 0.02, 0.9), PodSample(8, 0, 0.3, 0.9)])
    assert full.queued == SATURATION, "a full cache admits no new sequence: saturated"
    # Prefill-heavy: long contexts saturate compute with the cache half empty; only the
    # queue shows it.
    prefill = pressure([PodSample(4, 6, 0.45, 1.0), PodSample(4, 0, 0.3, 0.8)])
    assert prefill.queued == 1.5


def test_a_pod_queueing_with_idle_gpus_is_stuck_not_short_of_replicas():
    stuck = [PodSample(2, 6, 0.1, GPU_IDLE / 4)] + [PodSample(8, 0, 0.4, 0.9)] * 3
    signal = pressure(stuck)
    assert (signal.queued, signal.stalled) == (0.0, 1)
    assert decisions(signal.queued) == [4, 4, 4, 4], "more replicas would not drain it"
    # The same queue on a busy GPU is demand, and the pool's low mean GPU utilization (one
    # busy pod among idle ones) does not veto it: the pod's own reading decides.
    busy = [PodSample(2, 6, 0.1, 0.98)] + [PodSample(0, 0, 0.0, 0.0)] * 5
    signal = pressure(busy)
    assert signal.gpu_utilization is not None and signal.gpu_utilization < GPU_IDLE
    assert (signal.queued, signal.stalled) == (3.0, 0)
    # Without a GPU reading the queue counts as it is.
    assert pressure([PodSample(2, 6)]).queued == 3.0
    assert pressure([]).queued is None


# -- through real Redis ---------------------------------------------------------------------

def view_fields(pods: dict[str, PodSample], at: float,
                states: dict[str, ViewState] | None = None) -> dict[str, str]:
    """A pool's view hash as the monitor writes it, its `at` on Redis's clock."""
    endpoints = {url: EndpointView((states or {}).get(url, ViewState.READY),
                                   PodLoad(p.running, p.waiting, p.kv_usage, at - 1, "metrics"),
                                   "1",
                                   None if p.gpu_utilization is None else
                                   GpuUsage(p.gpu_utilization, 0.8, 1, at - 2))
                 for url, p in pods.items()}
    return {"version": "1", "at": f"{at:.6f}", "view": encode(endpoints, at)}


async def write_view(client: Any, pool: str, pods: dict[str, PodSample], at: float,
                     interval_s: float = 5.0, **extra: Any) -> None:
    key = view_key(pool)
    await client.hset(key, mapping=view_fields(pods, at, **extra))
    await client.pexpire(key, int(STALE_INTERVALS * interval_s * 1000) + 60_000)


async def write_reports(client: Any, pool: str, pods: dict[str, PodSample], at: float) -> None:
    """The sidecars' pod-load reports of the same pods (what the fallback reads)."""
    await client.hset(pod_load_key(pool), mapping={
        url: format_pod_load(int(p.running), int(p.waiting), p.kv_usage, at)
        for url, p in pods.items()})


# Four ready pods: one queueing hard on busy GPUs, three with big batches and no queue —
# the pool's sums say 3 waiting per 92 running (under the threshold), its worst pod 1.5.
FLEET = {"http://10.0.0.1:8000": PodSample(2, 3, 0.5, 0.96),
         **{f"http://10.0.0.{i}:8000": PodSample(30, 0, 0.6, 0.9) for i in (2, 3, 4)}}


async def test_a_written_view_drives_the_scale_out_the_pod_load_sums_would_miss(
        make_scaler, redis_server, nomad):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now)
    nomad.desired[JOB] = nomad.healthy[JOB] = 4
    client = aioredis.Redis(port=redis_server.port)
    try:
        reports = []
        for step in range(4):
            at = now + step * 5
            await report_traffic(redis_server, at, tokens_per_s=3000)  # 3 replicas' worth
            await write_reports(client, "small", FLEET, at)
            await write_view(client, "small", FLEET, at)
            reports.append((await scaler.tick(at)).pools[0])
    finally:
        await client.aclose()
    assert [r.source for r in reports] == ["view"] * 4
    assert reports[0].queued == 1.5
    assert reports[0].gpu_utilization == pytest.approx((0.96 + 2.7) / 4)
    assert [r.decision for r in reports] == [4, 4, 6, 6], \
        "three intervals of the worst pod's queue double the level (3)"
    assert [c["Count"] for c in nomad.calls] == [6]
    gauges = scaler.events.gauges
    assert gauges[("scaler_queued", ("small",))] == 1.5
    assert gauges[("scaler_gpu_utilization", ("small",))] == round((0.96 + 2.7) / 4, 4)
    assert scaler.fallbacks == {}


async def test_a_stale_view_falls_back_to_the_pod_load_reports_and_says_so_once(
        make_scaler, redis_server, nomad, caplog):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now)
    nomad.desired[JOB] = nomad.healthy[JOB] = 4
    caplog.set_level(logging.INFO, logger="sidecar.scaler")
    client = aioredis.Redis(port=redis_server.port)
    try:
        reports = []
        for step in range(4):
            at = now + step * 5
            await report_traffic(redis_server, at, tokens_per_s=3000)
            await write_reports(client, "small", FLEET, at)
            # The monitor stopped: its last view is older than STALE_INTERVALS intervals.
            await write_view(client, "small", FLEET, now - STALE_INTERVALS * 5 - 1)
            reports.append((await scaler.tick(at)).pools[0])
        assert [r.source for r in reports] == ["pod-load"] * 4
        assert reports[0].queued == 3 / 92, "the pool's sums: a mean"
        assert reports[0].gpu_utilization is None
        assert [r.decision for r in reports] == [4, 4, 4, 4], "the mean misses the queue"
        assert scaler.fallbacks == {"small": 4}
        assert scaler.events.counters[("scaler_view_fallbacks", ("small",))] == 4
        assert ("scaler_gpu_utilization", ("small",)) not in scaler.events.gauges
        said = [r.getMessage() for r in caplog.records if "pod-load reports" in r.getMessage()]
        assert len(said) == 1 and "stale" in said[0], said
        # The monitor is back: the view is read again, and that is said too.
        at = now + 20
        await report_traffic(redis_server, at, tokens_per_s=3000)
        await write_view(client, "small", FLEET, at)
        report = (await scaler.tick(at)).pools[0]
        assert report.source == "view" and report.queued == 1.5
        assert any("pod view again" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()


async def test_only_ready_pods_with_fresh_loads_count(make_scaler, redis_server, nomad):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now)
    client = aioredis.Redis(port=redis_server.port)
    try:
        # The queueing pod is warming (loading its model): its queue is not saturation.
        await write_view(client, "small", FLEET, now,
                         states={"http://10.0.0.1:8000": ViewState.WARMING})
        await report_traffic(redis_server, now, tokens_per_s=3000)
        report = (await scaler.tick(now)).pools[0]
        assert report.source == "view" and report.queued == 0.0
        # An unreadable view is a fault: fall back (and warn).
        await client.hset(view_key("small"), "view", "{not json")
        await client.hset(pod_load_key("small"), "http://10.0.0.9:8000",
                          format_pod_load(4, 1, 0.2, now))
        report = (await scaler.tick(now + 5)).pools[0]
        assert report.source == "pod-load" and report.queued == 0.25
    finally:
        await client.aclose()


async def test_a_tick_with_fresh_views_reads_them_in_one_command_and_no_pod_load(
        make_scaler, redis_server):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now)
    client = aioredis.Redis(port=redis_server.port)
    try:
        await report_traffic(redis_server, now, tokens_per_s=1000)
        # No queue: the load level stays put, so the tick publishes nothing.
        await write_view(client, "small", {url: PodSample(4, 0) for url in FLEET}, now)
        await scaler.tick(now)
        monitor = Monitor(redis_server)
        try:
            await scaler.tick(now)
            commands = monitor.commands(background=True)
        finally:
            monitor.close()
    finally:
        await client.aclose()
    names = [c.split('"')[1].upper() for c in commands]
    assert names == ["EVALSHA", "HGETALL", "HGETALL", "HMGET", "EVALSHA"], names


async def test_views_of_two_pools_in_distinct_cluster_slots_drive_each_pool(nomad):
    pools = {**POOLS, "large": {**POOLS["small"], "job": "llm-large"}}
    nomad.desired[("llm-large", "server")] = nomad.healthy[("llm-large", "server")] = 4
    nomad.desired[JOB] = nomad.healthy[JOB] = 4
    nodes = start_cluster()
    try:
        s = settings(nodes[0].url, nomad.addr, SIDECAR_REDIS_MODE="cluster",
                     SIDECAR_SCALER_POOLS=json.dumps(pools))
        client = connect_redis(nodes[0].url, "cluster", timeout_s=2.0)
        now = time.time()
        scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-cluster",
                        now=now - 3600)
        try:
            slots = {nodes[0].client().execute_command("CLUSTER", "KEYSLOT", view_key(p))
                     for p in pools}
            assert len(slots) == 2, "each pool's view in its own slot"
            quiet = {url: PodSample(30, 0, 0.6, 0.9) for url in FLEET}
            for step in range(4):
                at = now + step * 5
                await write_view(client, "small", FLEET, at)
                await write_view(client, "large", quiet, at)
                report = await scaler.tick(at)
            by_pool = {item.pool: item for item in report.pools}
            assert by_pool["small"].source == by_pool["large"].source == "view"
            assert (by_pool["small"].queued, by_pool["large"].queued) == (1.5, 0.0)
            assert report.level == "high", "the worst pool's worst pod raises the level"
        finally:
            await scaler.nomad.close()
            await client.aclose()
    finally:
        for node in nodes:
            node.cleanup()


def test_a_pools_health_interval_is_read_and_a_bad_one_named():
    from sidecar.config import ConfigError

    pools = {"small": {**POOLS["small"], "health_interval_s": 2}}
    s = settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1",
                 SIDECAR_SCALER_POOLS=json.dumps(pools), SIDECAR_SCALER_PRIOR_FLOOR="4")
    assert s.pools["small"].health_interval_s == 2.0 and s.prior_floor == 4.0
    assert settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1").pools[
        "small"].health_interval_s == 5.0, "the sidecar's default"
    pools["small"]["health_interval_s"] = 0
    with pytest.raises(ConfigError) as bad:
        settings("redis://127.0.0.1:1/0", "http://127.0.0.1:1",
                 SIDECAR_SCALER_POOLS=json.dumps(pools))
    assert "SIDECAR_SCALER_POOLS: pool 'small': \"health_interval_s\" must be a number > 0" \
        in str(bad.value)


async def test_a_fresh_scaler_asks_for_the_young_pools_floor_by_default(
        make_scaler, redis_server, nomad):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now, SIDECAR_SCALER_PRIOR_FLOOR="")  # "": the default
    assert scaler.settings.prior_floor == 9.0
    await report_traffic(redis_server, now, tokens_per_s=500)  # half a replica's worth
    report = (await scaler.tick(now)).pools[0]
    assert report.decision == 9 and "young pool's floor" in report.reason
    assert [c["Count"] for c in nomad.calls] == [9]
