"""`llm-sidecar scaler` against a real Redis and a fake Nomad HTTP API (the documented
shapes of GET/POST /v1/job/:job_id/scale, the active-deployment refusal, ACL failures)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from sidecar.config import ConfigError
from sidecar.fleet.traffic import BUCKET_S, CLOCK_SCRIPT, RedisClock, Traffic
from sidecar.routing.store import LEVEL_KEY
from sidecar.scaler.config import load_scaler_settings
from sidecar.scaler.nomad import NomadClient
from sidecar.scaler.policy import Bounds, Observation, PredictivePolicy
from sidecar.scaler.service import Scaler
from sidecar.telemetry import Telemetry
from tests.conftest import chat, pool
from tests.support.fake_nomad import TOKEN
from tests.support.redis_server import Monitor

POOLS = {"small": {"job": "llm-small", "group": "server", "min": 1, "max": 10,
                   "replica_tokens_per_s": 1000, "cold_start_s": 600}}


def settings(redis_url: str, nomad_addr: str, **extra: str):
    return load_scaler_settings({
        "SIDECAR_REDIS_URL": redis_url, "SIDECAR_SCALER_POOLS": json.dumps(POOLS),
        "SIDECAR_SCALER_INTERVAL_S": "5", "NOMAD_ADDR": nomad_addr, "NOMAD_TOKEN": TOKEN,
        "NOMAD_NAMESPACE": "ml",
        # Off unless a test is about it: these tests decide from a young history, whose
        # default floor would ask for the pool's whole maximum.
        "SIDECAR_SCALER_PRIOR_FLOOR": "0", **extra})


@pytest.fixture
async def make_scaler(redis_server, nomad):
    made: list[tuple[Scaler, Any]] = []

    def make(instance: str = "scaler-a", now: float | None = None, **extra: str) -> Scaler:
        s = settings(redis_server.url, nomad.addr, **extra)
        client = aioredis.Redis(port=redis_server.port)
        scaler = Scaler(s, client, NomadClient(s), Telemetry({}), instance, now=now)
        made.append((scaler, client))
        return scaler

    yield make
    for scaler, client in made:
        await scaler.nomad.close()
        await client.aclose()


async def report_traffic(redis_server, now: float, tokens_per_s: float, pods: int = 1,
                         pool_name: str = "small") -> None:
    """Sidecars' flushes: `tokens_per_s` spread over `pods`, in the last complete bucket."""
    client = aioredis.Redis(port=redis_server.port)
    try:
        await client.script_load(CLOCK_SCRIPT)  # as a sidecar's store does at start
        for i in range(pods):
            clock = RedisClock()
            clock.offset = 0.0  # the test's clock is the server's (same machine)
            traffic = Traffic(pod_id=f"pod-{i}", clock=clock)
            traffic.count(pool_name, int(tokens_per_s * BUCKET_S / pods), 0)
            async with client.pipeline(transaction=False) as pipe:
                traffic.write(pipe, {pool_name: 1}, now - BUCKET_S)
                await pipe.execute()
    finally:
        await client.aclose()


async def test_scales_up_through_nomad_to_what_the_policy_decides(make_scaler, redis_server,
                                                                   nomad):
    now = time.time()
    scaler = make_scaler(now=now)
    await report_traffic(redis_server, now, tokens_per_s=5000)  # 5 replicas' worth
    report = await scaler.tick(now)
    expected = PredictivePolicy(Bounds(1, 10, 600), prior_floor=0, started_at=now).decide(
        Observation(now, 5.0, 5.0, 2.5, current=2, ready=2))
    assert expected.count == 5  # no burst history yet: the level it sees
    [call] = nomad.calls
    assert call["job"] == "llm-small" and call["Count"] == 5
    assert call["Target"] == {"Group": "server"}
    assert "2 → 5" in call["Message"]
    assert call["Meta"] == {"scaler": "scaler-a", "pool": "small"}
    assert all(q == {"namespace": "ml"} for q in nomad.queries)
    assert report.pools[0].action == "scaled"
    assert scaler.events.events_sent[-1]["title"] == "scaled pool small to 5"


async def test_an_active_deployment_is_tried_again_next_tick(make_scaler, redis_server, nomad):
    now = time.time()
    scaler = make_scaler(now=now)
    await report_traffic(redis_server, now, tokens_per_s=5000)
    nomad.active_deployment = True
    report = await scaler.tick(now)
    assert report.pools[0].action == "blocked" and nomad.calls == []
    nomad.active_deployment = False
    report = await scaler.tick(now + 1)
    assert report.pools[0].action == "scaled"
    assert [c["Count"] for c in nomad.calls] == [5]


async def test_acl_failure_holds_and_says_why(make_scaler, redis_server, nomad):
    now = time.time()
    scaler = make_scaler(now=now, NOMAD_TOKEN="wrong-token")
    await report_traffic(redis_server, now, tokens_per_s=5000)
    report = await scaler.tick(now)
    assert nomad.calls == []
    assert report.pools[0].action == "hold"
    assert "403" in report.pools[0].reason and "Permission denied" in report.pools[0].reason


async def test_dry_run_only_logs(make_scaler, redis_server, nomad):
    now = time.time()
    scaler = make_scaler(now=now, SIDECAR_SCALER_DRY_RUN="1")
    await report_traffic(redis_server, now, tokens_per_s=5000)
    report = await scaler.tick(now)
    assert report.pools[0].action == "dry-run" and report.pools[0].decision == 5
    assert nomad.calls == []


async def test_missing_metrics_hold_capacity(make_scaler, nomad):
    now = time.time()
    scaler = make_scaler(now=now - 3600)  # long past its first cold-start window
    nomad.desired[("llm-small", "server")] = 8
    for step in range(5):
        report = await scaler.tick(now + step * 5)
        assert report.pools[0].demand_mean is None
        assert report.pools[0].decision == 8
    assert nomad.calls == []


async def test_two_scalers_one_leader_and_a_takeover(make_scaler, redis_server, nomad):
    now = time.time()
    a = make_scaler("scaler-a", now=now, SIDECAR_SCALER_INTERVAL_S="0.2")
    b = make_scaler("scaler-b", now=now, SIDECAR_SCALER_INTERVAL_S="0.2")
    await report_traffic(redis_server, now, tokens_per_s=5000)
    assert (await a.tick(now)).leader
    assert not (await b.tick(now)).leader
    assert [c["Meta"]["scaler"] for c in nomad.calls] == ["scaler-a"]
    assert (await a.tick(now)).leader, "the leader keeps its lock"
    await asyncio.sleep(0.7)  # a stops ticking: its lock (3 intervals) expires
    assert (await b.tick(time.time())).leader
    assert not (await a.tick(time.time())).leader


@pytest.mark.parametrize("pods", [1, 50])
async def test_commands_per_tick_do_not_grow_with_sidecars(make_scaler, redis_server, pods):
    now = time.time()
    scaler = make_scaler(now=now)
    await report_traffic(redis_server, now, tokens_per_s=1000, pods=pods)
    await scaler.tick(now)  # the first tick also publishes the load level
    monitor = Monitor(redis_server)
    try:
        await scaler.tick(now)
        commands = monitor.commands(background=True)
    finally:
        monitor.close()
    names = [c.split('"')[1].upper() for c in commands]
    # the lock (and Redis's clock), then per pool one bucket read and one heartbeat read,
    # then its pod view (none here) and so its pod loads, then the state saved for a
    # successor: whatever the number of pods
    assert names == ["EVALSHA", "HGETALL", "HGETALL", "HMGET", "HGETALL", "EVALSHA"], names


async def test_a_pool_without_ready_capacity_is_reported_once(make_scaler, redis_server,
                                                               nomad):
    now = time.time()
    scaler = make_scaler(now=now)
    nomad.healthy[("llm-small", "server")] = 0
    for step in range(3):
        await scaler.tick(now + step)
    titles = [e["title"] for e in scaler.events.events_sent]
    assert titles.count("pool small has no ready capacity") == 1


async def test_sidecars_pick_up_the_load_level_within_a_second(
        make_scaler, redis_server, pods, sidecar, http):
    small, large = await pods(1), await pods(1)
    routes = json.dumps({"low": {"small": 16}, "medium": {"small": 8, "large": 8},
                         "high": {"large": 16}})
    running = await sidecar({"small": pool(small), "large": pool(large, "large-model")},
                            SIDECAR_REDIS_URL=redis_server.url, SIDECAR_ROUTES=routes)
    _, headers, _ = await chat(http, running, "before-the-change")
    assert headers["x-sidecar-pool"] == "small"
    scaler = make_scaler()
    published = time.monotonic()
    await scaler._publish_level("high")
    while running.sidecar.router.level != "high" and time.monotonic() - published < 1.0:
        await asyncio.sleep(0.01)
    assert running.sidecar.router.level == "high"
    assert redis_server.client().get(LEVEL_KEY) == b"high"
    _, headers, _ = await chat(http, running, "after-the-change")
    assert headers["x-sidecar-pool"] == "large", "new sessions use the new level's table"
    _, headers, _ = await chat(http, running, "before-the-change")
    assert headers["x-sidecar-pool"] == "small", "existing sessions keep their pool"


async def test_a_busy_fleet_raises_the_level_with_hysteresis(make_scaler, redis_server, nomad):
    now = time.time()
    scaler = make_scaler(now=now)
    nomad.desired[("llm-small", "server")] = 10
    nomad.healthy[("llm-small", "server")] = 2
    levels = []
    for step in range(3):
        await report_traffic(redis_server, now + step * 5, tokens_per_s=1900)  # 95 % of 2
        levels.append((await scaler.tick(now + step * 5)).level)
    assert levels == ["low", "medium", "medium"]


async def test_sidecar_traffic_reaches_the_scalers_view(pods, sidecar, http, redis_server):
    from sidecar.fleet.traffic import read_traffic

    [pod] = await pods(1, max_tokens=7)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=redis_server.url)
    for i in range(5):
        await chat(http, running, f"t-{i}")
    async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions",
                         json={"model": "m", "stream": True, "messages": [
                             {"role": "user", "content": "hello"}]}) as r:
        await r.read()
    assert running.sidecar.traffic.counts["small"].requests == 6
    assert running.sidecar.traffic.counts["small"].completion_tokens == 6 * 7
    await running.sidecar.flush_traffic()
    client = aioredis.Redis(port=redis_server.port)
    try:
        view = await read_traffic(client, ["small"], time.time() + BUCKET_S, buckets=2)
    finally:
        await client.aclose()
    assert view["small"].reporting_pods == 1
    assert view["small"].requests == 6
    assert math.isclose(sum(view["small"].tokens_per_s) * BUCKET_S,
                        6 * 7 + pod.fake.counters.prompt_tokens)


def test_scaler_configuration_errors_name_the_variable():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "NOMAD_"))}
    done = subprocess.run([sys.executable, "-m", "sidecar", "scaler", "--check"],
                          env={**clean, "SIDECAR_SCALER_POOLS": '{"small": {"job": "x"}}',
                               "NOMAD_ADDR": "nomad:4646"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    for expected in ("SIDECAR_REDIS_URL is not set", "\"group\" must be a non-empty string",
                     "\"replica_tokens_per_s\" must be a number > 0",
                     "NOMAD_ADDR='nomad:4646'"):
        assert expected in done.stderr


def test_the_scalers_redis_ca_file_must_be_a_readable_file(tmp_path):
    with pytest.raises(ConfigError) as refused:
        settings("rediss://127.0.0.1:1/0", "http://127.0.0.1:4646",
                 SIDECAR_REDIS_CA_FILE=str(tmp_path / "missing.pem"))
    assert any("SIDECAR_REDIS_CA_FILE" in p and "PEM" in p for p in refused.value.problems)
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    assert settings("rediss://127.0.0.1:1/0", "http://127.0.0.1:4646",
                    SIDECAR_REDIS_CA_FILE=str(ca)).redis_ca_file == str(ca)


async def test_a_nomad_that_drops_the_connection_holds_the_pool(redis_server):
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = settings(redis_server.url, f"http://127.0.0.1:{port}")
    client = aioredis.Redis(port=redis_server.port)
    scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-a")
    try:
        report = await scaler.tick()
    finally:
        await scaler.nomad.close()
        await client.aclose()
        server.close()
        await server.wait_closed()
    # aiohttp's own error (not an OSError) is Nomad's failure: the tick holds and goes on.
    assert report.leader and report.pools[0].action == "hold"
    assert "cannot read Nomad" in report.pools[0].reason
