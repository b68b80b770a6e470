"""What the scaler reads besides tokens (the pods' own load: running, waiting, KV usage,
through real Redis) and what it publishes (its forecast, for the stock Nomad Autoscaler's
target-value strategy, on /metrics and DogStatsD)."""

from __future__ import annotations

import socket
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.fleet.loads import format_pod_load, parse_pod_load, pod_load_key, read_pod_load
from sidecar.fleet.traffic import STALE_AFTER_S
from sidecar.scaler.service import serve_metrics
from sidecar.telemetry import Telemetry
from tests.scaler.test_scaler import make_scaler, report_traffic  # noqa: F401 (fixtures)


async def write_pod_load(redis_server, pool: str, values: dict[str, str]) -> None:
    client = aioredis.Redis(port=redis_server.port)
    try:
        await client.hset(pod_load_key(pool), mapping=values)
    finally:
        await client.aclose()


async def test_pod_load_reader_sums_fresh_reports_and_prunes_stale_ones(redis_server):
    now = time.time()
    await write_pod_load(redis_server, "small", {
        "http://10.0.0.1:8000": format_pod_load(8, 3, 0.91, now - 1),
        "http://10.0.0.2:8000": format_pod_load(6, 0, 0.40, now - 5),
        "http://10.0.0.3:8000": format_pod_load(7, 9, 0.99, now - STALE_AFTER_S - 1),
        "http://10.0.0.4:8000": "not-a-load"})
    client = aioredis.Redis(port=redis_server.port)
    try:
        view = await read_pod_load(client, ["small", "large"], now)
        left = sorted(await client.hkeys(pod_load_key("small")))
    finally:
        await client.aclose()
    small = view["small"]
    assert (small.pods, small.running, small.waiting) == (2, 14, 3)
    assert small.kv_usage == pytest.approx(0.91)
    assert small.queued == pytest.approx(3 / 14)
    assert view["large"].pods == 0 and view["large"].queued is None, "no report: unknown"
    assert left == [b"http://10.0.0.1:8000", b"http://10.0.0.2:8000"]


def test_pod_load_values_round_trip_and_bad_ones_are_refused():
    assert pod_load_key("small") == "llmsc:podload:{small}"
    value = format_pod_load(5, 2, 0.5, 1700000000.25)
    assert value == "5:2:0.5000:1700000000.250"
    assert parse_pod_load(value.encode()) == (5, 2, 0.5, 1700000000.25)
    for bad in ("5:2:1.5:1", "-1:0:0:1", "5:2:0.5", "a:b:c:d"):
        assert parse_pod_load(bad) is None
    with pytest.raises(ValueError, match="kv_usage"):
        format_pod_load(1, 0, 2.0, 0)


async def test_a_pool_whose_pods_queue_scales_out_though_its_token_rate_is_flat(
        make_scaler, redis_server, nomad):  # noqa: F811
    now = time.time()
    scaler = make_scaler(now=now)
    nomad.desired[("llm-small", "server")] = 4
    nomad.healthy[("llm-small", "server")] = 4
    decisions, levels = [], []

    async def tick(step: int, waiting: int) -> None:
        at = now + step * 5
        await report_traffic(redis_server, at, tokens_per_s=3000)  # 3 of 4 replicas' worth
        await write_pod_load(redis_server, "small", {
            f"http://10.0.0.{i}:8000": format_pod_load(8, waiting, 0.95, at) for i in range(4)})
        report = await scaler.tick(at)
        decisions.append(report.pools[0].decision)
        levels.append(report.level)

    for step in range(3):
        await tick(step, waiting=0)
    assert decisions == [4, 4, 4] and levels[-1] == "medium"
    for step in range(3, 6):
        await tick(step, waiting=4)  # half as many waiting as running, on every pod
    assert decisions[3:5] == [4, 4], "one or two intervals of queueing are noise"
    assert decisions[5] == 5, "sustained: the level (3) rises by the queued share (× 1.5)"
    assert levels[-1] == "high", "sustained saturation raises the load level"
    assert [c["Count"] for c in nomad.calls] == [5]


async def test_the_forecast_is_published_for_the_nomad_autoscaler(
        make_scaler, redis_server, nomad):  # noqa: F811
    agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    agent.bind(("127.0.0.1", 0))
    agent.settimeout(5)
    now = time.time()
    leader = make_scaler("scaler-a", now=now, SIDECAR_SCALER_DRY_RUN="1")
    leader.events = Telemetry({"DD_DOGSTATSD_URL": f"udp://127.0.0.1:{agent.getsockname()[1]}"})
    follower = make_scaler("scaler-b", now=now)
    runner = await serve_metrics(leader.events, "127.0.0.1", 0)
    try:
        await report_traffic(redis_server, now, tokens_per_s=5000)
        report = await leader.tick(now)
        assert report.pools[0].action == "dry-run" and report.pools[0].decision == 5
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
        # 5 wanted, Nomad has 2: the target-value strategy (target 1) asks for 2 × 2.5 = 5
        assert 'llm_sidecar_scaler_forecast_ratio{pool="small"} 2.5' in text
        assert 'llm_sidecar_scaler_forecast_replicas{pool="small"} 5' in text
        assert 'llm_sidecar_scaler_demand{pool="small"} 5' in text
        assert leader.events.flush() > 0
        datagram = agent.recv(65536).decode()
        assert "llm_sidecar.scaler.forecast_ratio:2.5|g|#pool:small" in datagram
        assert not (await follower.tick(now)).leader
        assert "llm_sidecar_scaler_forecast_ratio{" not in follower.events.prometheus(), \
            "only the leader publishes a forecast"
    finally:
        await runner.cleanup()
        leader.events.close()
        agent.close()
