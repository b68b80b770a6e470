"""The fleet monitor: one process probes the pods for the whole fleet and the sidecars follow
its pod view (real redis-server, real monitor and sidecar processes, fake-llm pods that count
their /health and /metrics hits); and the pure pod-view decisions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from rich.console import Console

from sidecar.config import load_settings
from sidecar.fleet.monitor import FleetMonitor
from sidecar.fleet.podload import GpuUsage, PodLoad
from sidecar.fleet.podview import (
    Action,
    EndpointView,
    Following,
    ViewError,
    ViewState,
    action_for,
    decode,
    encode,
    parse_notice,
    view_key,
)
from sidecar.fleet.pools import Endpoint, EndpointState, rendezvous_score
from sidecar.routing.store import connect_redis
from sidecar.tools.top import Snapshot, render
from tests.conftest import CHAT, Pod, PodFactory, SidecarFactory, SidecarProcess, pool
from tests.deploy.test_redis_acl import create_users, refusals
from tests.routing.test_redis_topologies import start_cluster
from tests.support.polling import until
from tests.support.redis_server import RedisServer, free_port

INTERVAL_S = 1.0  # stale after 3 s: a stall of the loaded test machine must not look like an outage
JITTER = 0.2  # health.JITTER: probes of one endpoint are at least 0.8 interval apart


# -- the pure part --------------------------------------------------------------------------

def test_view_round_trips_state_and_load_with_its_age() -> None:
    load = PodLoad(3.0, 1.0, 0.25, 100.0, "metrics", 40.0, 2.5)
    gpu = GpuUsage(0.875, 0.5, 2, 99.0)
    body = encode({"http://a": EndpointView(ViewState.READY, load, gpu=gpu),
                   "http://b": EndpointView(None, None)}, now=101.5)
    view = decode("small", b"7", b"2000.5", body.encode())
    assert view.version == 7 and view.at == 2000.5
    a = view.endpoints["http://a"]
    assert a.state is ViewState.READY
    assert a.load == PodLoad(3.0, 1.0, 0.25, 1.5, "metrics", 40.0, 2.5)  # at = age
    assert a.gpu == GpuUsage(0.875, 0.5, 2, 2.5)
    assert view.endpoints["http://b"] == EndpointView(None, None)
    notice = parse_notice(b"small\x007\x002000.5\x00" + body.encode())
    assert notice == view


@pytest.mark.parametrize("body", [b"[]", b"{", b'{"u":{"state":"lost"}}',
                                  b'{"u":{"state":"ready","load":[1,1,2,0,0,0]}}',
                                  b'{"u":{"state":"ready","gpu":[1.5,0,1,0]}}'])
def test_unreadable_views_are_refused(body: bytes) -> None:
    with pytest.raises(ViewError):
        decode("small", b"1", b"1.0", body)


def test_what_a_view_state_does_to_each_endpoint_state() -> None:
    assert action_for(ViewState.READY, "warming") is Action.HEALTHY   # a cold start ended
    assert action_for(ViewState.READY, "ejected") is Action.HEALTHY   # restored
    assert action_for(ViewState.READY, "ready") is Action.NONE
    assert action_for(ViewState.WARMING, "ready") is Action.LOADING
    assert action_for(ViewState.WARMING, "warming") is Action.NONE
    assert action_for(ViewState.FAILING, "ready") is Action.EJECT
    assert action_for(ViewState.FAILING, "ejected") is Action.NONE
    assert action_for(ViewState.READY, "draining") is Action.NONE
    assert action_for(None, "warming") is Action.NONE  # the monitor does not probe health


def test_a_view_is_followed_while_fresh_and_applied_once_per_version() -> None:
    following = Following()
    view = decode("small", 3, 100.0, "{}")
    assert following.offer(view)
    following.mark_applied(view)
    assert not following.offer(view)                          # the same write again
    assert not following.offer(decode("small", 2, 99.0, "{}"))  # an older one
    assert following.offer(decode("small", 1, 130.0, "{}"))   # the key expired: restarted
    intervals = {"small": 5.0, "large": 5.0}
    assert following.fresh_pools(intervals, 145.0) == {"small"}   # 15 s = 3 intervals
    assert following.fresh_pools(intervals, 145.1) == set()


def test_each_probe_round_of_an_endpoint_is_applied_once() -> None:
    following = Following()
    first = EndpointView(ViewState.READY, None, "r1:1")
    assert following.new_round("small", "http://a", first)
    assert not following.new_round("small", "http://a", first)   # read again: skipped
    assert following.new_round("small", "http://b", first)       # another endpoint
    assert following.new_round("small", "http://a", EndpointView(ViewState.READY, None,
                                                                 "r1:2"))
    assert following.new_round("small", "http://a", EndpointView(ViewState.READY, None,
                                                                 "r2:2"))  # a new reign


# -- real processes ------------------------------------------------------------------------

class MonitorProcess:
    """`python -m sidecar monitor` with its /stats on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> MonitorProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "monitor", "--stats-listen",
             f"127.0.0.1:{self.port}"], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        await until(lambda: self.stats_ok(), "the monitor answers")
        return self

    async def stats_ok(self) -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            await self.stats()
            return True
        return False

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{self.port}/stats") as response:
            result: dict[str, Any] = await response.json()
            return result

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def monitor_process() -> Iterator[Callable[[dict[str, str]], MonitorProcess]]:
    made: list[MonitorProcess] = []

    def make(env: dict[str, str]) -> MonitorProcess:
        made.append(MonitorProcess(env))
        return made[-1]

    yield make
    for process in made:
        process.kill()


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    made: list[SidecarProcess] = []
    yield made
    for process in made:
        with contextlib.suppress(Exception):
            process.stop()


async def stats(process: SidecarProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(process.admin + "/stats") as r:
        result: dict[str, Any] = await r.json()
        return result


def fleet_env(redis: RedisServer, pods: list[Pod]) -> dict[str, str]:
    pools = {"small": pool(pods, health_path="/health", metrics_path="/metrics",
                           health_interval_s=INTERVAL_S)}
    return {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis.url,
            "SIDECAR_CONNECT_TIMEOUT_S": "0.5", "SIDECAR_DRAIN_TIMEOUT_S": "2",
            "SIDECAR_LOG_FORMAT": "text"}


def view_states(redis: RedisServer) -> dict[str, str | None]:
    body = redis.client().hget("llmsc:podview:{small}", "view")
    if body is None:
        return {}
    return {url: entry["state"] for url, entry in json.loads(body).items()}


def hits(pod: Pod) -> int:
    return pod.fake.paths.get("/health", 0) + pod.fake.paths.get("/metrics", 0)


async def sources(fleet: list[SidecarProcess]) -> set[str]:
    return {(await stats(s))["pod_view"]["pools"]["small"]["source"] for s in fleet}


async def test_pods_get_two_monitoring_requests_per_interval_whatever_the_fleet_size(
        redis_server: RedisServer, pods: PodFactory,
        monitor_process: Callable[[dict[str, str]], MonitorProcess],
        sidecars: list[SidecarProcess]) -> None:
    made = await pods(2)
    env = fleet_env(redis_server, made)
    monitor = await monitor_process(env).start()
    urls = {p.url for p in made}

    async def view_ready() -> bool:
        return view_states(redis_server) == dict.fromkeys(urls, "ready")
    await until(view_ready, "the monitor publishes both pods ready")
    for _ in range(3):
        sidecars.append(await SidecarProcess(env).start())

    # Every sidecar follows the view from its start: no probe, no scrape of its own.
    for process in sidecars:
        view = await stats(process)
        assert view["pod_view"]["pools"]["small"]["source"] == "monitor"
        assert view["health_probes"] == 0 and view["load_scrapes"]["scrapes"] == 0
        assert view["endpoint_states"]["ready"] == 2

    # A fixed window: each pod answers the monitor's health + metrics once per (jittered)
    # interval, and nobody else's.
    before_hits = {p.url: hits(p) for p in made}
    before = await monitor.stats()
    started = time.monotonic()
    await asyncio.sleep(8 * INTERVAL_S)
    window = time.monotonic() - started
    after = await monitor.stats()
    most = 2 * (math.floor(window / ((1 - JITTER) * INTERVAL_S)) + 2)
    for pod in made:
        got = hits(pod) - before_hits[pod.url]
        assert 2 <= got <= most, (pod.url, got, most)
    monitored = (after["health_probes"] - before["health_probes"]
                 + after["load_scrapes"] - before["load_scrapes"])
    sent = sum(hits(p) - before_hits[p.url] for p in made)
    # Every hit is the monitor's (at most one request per endpoint in flight at the edges).
    assert monitored - 2 * len(made) <= sent <= monitored + 2 * len(made)
    for process in sidecars:
        view = await stats(process)
        assert view["health_probes"] == 0 and view["load_scrapes"]["scrapes"] == 0

    # The monitor dies: within the bound every sidecar probes by itself, and says so.
    monitor.kill()

    async def all_probing() -> bool:
        return await sources(sidecars) == {"probing"}
    await until(all_probing, "every sidecar falls back to probing")
    for process in sidecars:
        await until(lambda p=process: _probed(p), "the sidecar probes the pods")
    assert "small probed here: the monitor's view is stale" in \
        shown_by_top(await stats(sidecars[0]))

    # It comes back: the sidecars follow it again and stop probing.
    await monitor_process(env).start()

    async def all_following() -> bool:
        return await sources(sidecars) == {"monitor"}
    await until(all_following, "every sidecar follows the new monitor")
    assert "small from the monitor" in shown_by_top(await stats(sidecars[0]))
    counts = [(await stats(p))["health_probes"] for p in sidecars]
    await asyncio.sleep(4 * INTERVAL_S)
    assert [(await stats(p))["health_probes"] for p in sidecars] == counts
    for process in sidecars:
        assert "probing its pods from this sidecar" in _log_of(process)
        assert "following the fleet monitor's pod view" in _log_of(process)


def shown_by_top(stats: dict[str, Any]) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(Snapshot(time.time(), stats, {}), None))
    console.file.close()
    return console.export_text()


async def _probed(process: SidecarProcess) -> bool:
    return bool((await stats(process))["health_probes"] > 0)


def _log_of(process: SidecarProcess) -> str:
    process.stop()  # the log is read once the process has exited
    return process.output()


async def test_a_cold_start_reaches_the_sidecars_by_the_monitors_notice(
        redis_server: RedisServer, pods: PodFactory,
        monitor_process: Callable[[dict[str, str]], MonitorProcess],
        sidecars: list[SidecarProcess]) -> None:
    warm, cold = await pods(1) + await pods(1, cold_start_s=600.0)
    env = fleet_env(redis_server, [warm, cold])
    monitor = await monitor_process(env).start()

    async def one_ready() -> bool:
        return view_states(redis_server) == {warm.url: "ready", cold.url: "warming"}
    await until(one_ready, "the monitor publishes one pod ready, one warming")
    sidecar = await SidecarProcess(env).start()
    sidecars.append(sidecar)

    cold.fake.behaviour.cold_start_s = 0.0  # its model is loaded: /health answers 200

    async def ready_here() -> bool:
        view = await stats(sidecar)
        return {e["url"]: e["state"] for e in view["endpoints"]}[cold.url] == "ready"
    await until(ready_here, "the sidecar routes to the pod whose cold start ended")
    view = await stats(sidecar)
    assert view["pod_view"]["notices"] >= 1          # a pushed view carried it ...
    assert view["health_probes"] == 0                # ... not a probe of this sidecar
    assert [c["endpoint"] for c in view["cold_starts"]] == [warm.url, cold.url]
    assert (await monitor.stats())["notices"] >= 2   # the first view, then the cold start

    # A new session whose rendezvous choice is the pod that just came up lands there.
    session = next(f"s{i}" for i in range(1000)
                   if _first_choice(f"s{i}", [warm.url, cold.url]) == cold.url)
    async with aiohttp.ClientSession() as http, http.post(
            sidecar.base + "/v1/chat/completions", json=CHAT,
            headers={"X-Session-Id": session}) as response:
        assert response.status == 200
    assert cold.fake.counters.requests == 1


def _first_choice(session: str, urls: list[str]) -> str:
    endpoints = [Endpoint(url, "small", EndpointState.READY) for url in urls]
    return max(endpoints, key=lambda e: rendezvous_score(session.encode(), e)).url


async def test_without_redis_the_sidecar_is_its_own_monitor(pods: PodFactory,
                                                            sidecar: SidecarFactory) -> None:
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod], health_path="/health",
                                           health_interval_s=INTERVAL_S)})

    async def probed() -> bool:
        return pod.fake.paths.get("/health", 0) >= 2
    await until(probed, "the sidecar probes its pod")
    view = running.sidecar.stats()
    assert view["pod_view"]["pools"]["small"]["source"] == "probing"
    assert view["health_probes"] >= 2 and view["endpoint_states"]["ready"] == 1


async def test_the_documented_monitor_user_publishes_and_a_sidecar_user_follows(
        redis_server: RedisServer, pods: PodFactory, sidecar: SidecarFactory) -> None:
    """docs/operations.md's `llm-monitor` and `llm-sidecar` ACL users: the monitor leads, writes the
    view and its notice; a sidecar reads the view and hears the notice; nothing refused."""
    users = create_users(redis_server)
    assert "llm-monitor" in users
    warm, cold = await pods(1) + await pods(1, cold_start_s=600.0)
    pools = {"small": pool([warm, cold], health_path="/health", metrics_path="/metrics",
                           health_interval_s=INTERVAL_S)}
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": users["llm-monitor"][1]}
    client = connect_redis(users["llm-monitor"][1], timeout_s=2.0)
    monitor = FleetMonitor(load_settings(env), client, instance="acl")
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    try:
        async def published() -> bool:
            return view_states(redis_server) == {warm.url: "ready", cold.url: "warming"}
        await until(published, "the monitor publishes as llm-monitor")
        running = await sidecar(pools, SIDECAR_REDIS_URL=users["llm-sidecar"][1])
        assert running.sidecar.stats()["pod_view"]["pools"]["small"]["source"] == "monitor"
        cold.fake.behaviour.cold_start_s = 0.0

        async def heard() -> bool:
            return running.sidecar.stats()["pod_view"]["notices"] >= 1 and \
                running.sidecar.pools.endpoint("small", cold.url).state is EndpointState.READY
        await until(heard, "the sidecar hears the cold start's notice as llm-sidecar")
        assert running.sidecar.prober.probes == 0
    finally:
        stop.set()
        await task
        await client.aclose()
    assert redis_server.client().exists("llmsc:monitor:leader") == 0  # released on stop
    assert refusals(redis_server) == [], "a documented user was refused something it needs"


async def test_an_endpoint_the_view_does_not_carry_is_probed_by_the_sidecar(
        redis_server: RedisServer, pods: PodFactory, sidecar: SidecarFactory) -> None:
    """The monitor's pools file lags the sidecar's (a pod just added): the sidecar follows
    the view for the pod it carries and probes the other itself."""
    known, added = await pods(2)
    health = {"health_path": "/health", "health_interval_s": INTERVAL_S}
    monitor_env = {"SIDECAR_POOLS": json.dumps({"small": pool([known], **health)}),
                   "SIDECAR_REDIS_URL": redis_server.url}
    client = connect_redis(redis_server.url, timeout_s=2.0)
    monitor = FleetMonitor(load_settings(monitor_env), client, instance="lagging")
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    try:
        async def published() -> bool:
            return view_states(redis_server) == {known.url: "ready"}
        await until(published, "the monitor publishes its one pod")
        running = await sidecar({"small": pool([known, added], **health)},
                                SIDECAR_REDIS_URL=redis_server.url)
        prober = running.sidecar.prober
        assert prober.covered == {("small", known.url)} and prober.probing == 1

        async def both_ready() -> bool:
            return running.sidecar.stats()["endpoint_states"]["ready"] == 2
        await until(both_ready, "the sidecar's own probe makes the added pod ready")
        health_hits = known.fake.paths.get("/health", 0)
        assert health_hits == monitor.stats()["health_probes"] or \
            health_hits == monitor.stats()["health_probes"] - 1  # one may be in flight
    finally:
        stop.set()
        await task
        await client.aclose()


async def test_redis_away_the_sidecar_probes_and_follows_again_when_it_is_back(
        redis_server: RedisServer, pods: PodFactory, sidecar: SidecarFactory) -> None:
    [pod] = await pods(1)
    pools = {"small": pool([pod], health_path="/health", health_interval_s=INTERVAL_S)}
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis_server.url}
    client = connect_redis(redis_server.url, timeout_s=2.0)
    monitor = FleetMonitor(load_settings(env), client, instance="outage")
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    try:
        async def published() -> bool:
            return view_states(redis_server) == {pod.url: "ready"}
        await until(published, "the monitor publishes")
        running = await sidecar(pools, SIDECAR_REDIS_URL=redis_server.url,
                                SIDECAR_REDIS_TIMEOUT_MS="200")
        side = running.sidecar

        def source() -> str:
            return str(side.stats()["pod_view"]["pools"]["small"]["source"])
        assert source() == "monitor" and side.prober.probes == 0

        redis_server.stop()

        async def probing() -> bool:
            return source() == "probing" and side.prober.probes > 0
        await until(probing, "the sidecar probes by itself while Redis is away")
        assert side.stats()["endpoint_states"]["ready"] == 1

        redis_server.start()

        async def following() -> bool:
            return source() == "monitor"
        await until(following, "the sidecar follows the monitor again once Redis is back")
        probes = side.prober.probes
        await asyncio.sleep(2 * INTERVAL_S)
        assert side.prober.probes == probes
    finally:
        stop.set()
        await task
        await client.aclose()


async def test_on_redis_cluster_a_sidecar_reads_the_views_and_hears_the_notices(
        pods: PodFactory, sidecar: SidecarFactory) -> None:
    """Two pools' views in two slots, read in one flush; the cold start's notice is a
    PUBLISH from a script on the pool key's node, heard by a sidecar subscribed elsewhere."""
    nodes = start_cluster()
    try:
        warm, cold = await pods(1) + await pods(1, cold_start_s=600.0)
        [other] = await pods(1)
        health = {"health_path": "/health", "health_interval_s": INTERVAL_S}
        pools = {"small": pool([warm, cold], **health),
                 "large": pool([other], model="large-model", **health)}
        env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": nodes[0].url,
               "SIDECAR_REDIS_MODE": "cluster"}
        client = connect_redis(nodes[0].url, "cluster", timeout_s=2.0)
        monitor = FleetMonitor(load_settings(env), client, instance="cluster")
        stop = asyncio.Event()
        task = asyncio.ensure_future(monitor.run(stop))
        try:
            async def published() -> bool:
                return all([await client.exists(view_key("small")),
                            await client.exists(view_key("large"))])
            await until(published, "the monitor writes both pools' views")
            running = await sidecar(pools, SIDECAR_REDIS_URL=nodes[0].url,
                                    SIDECAR_REDIS_MODE="cluster",
                                    SIDECAR_REDIS_TIMEOUT_MS="1000")
            side = running.sidecar
            view = side.stats()["pod_view"]["pools"]
            assert view["small"]["source"] == view["large"]["source"] == "monitor"
            assert side.prober.probes == 0
            cold.fake.behaviour.cold_start_s = 0.0

            async def ready() -> bool:
                return side.pools.endpoint("small", cold.url).state is EndpointState.READY
            await until(ready, "the cold start reaches the sidecar")
            assert side.stats()["pod_view"]["notices"] >= 1 and side.prober.probes == 0
        finally:
            stop.set()
            await task
            await client.aclose()
    finally:
        for node in nodes:
            node.cleanup()


async def test_a_failing_pod_is_ejected_by_the_notice_and_restored_by_the_next(
        redis_server: RedisServer, pods: PodFactory, sidecar: SidecarFactory) -> None:
    steady, flaky = await pods(2)
    pools = {"small": pool([steady, flaky], health_path="/health",
                           health_interval_s=INTERVAL_S)}
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis_server.url}
    client = connect_redis(redis_server.url, timeout_s=2.0)
    monitor = FleetMonitor(load_settings(env), client, instance="failing")
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    try:
        async def published() -> bool:
            return view_states(redis_server) == {steady.url: "ready", flaky.url: "ready"}
        await until(published, "the monitor publishes both pods ready")
        running = await sidecar(pools, SIDECAR_REDIS_URL=redis_server.url)
        side = running.sidecar
        endpoint = side.pools.endpoint("small", flaky.url)
        assert endpoint is not None and endpoint.state is EndpointState.READY

        flaky.fake.behaviour.cold_start_s = 600.0  # /health answers 503 from now on
        flaky.fake.started = time.monotonic()

        async def ejected() -> bool:
            return endpoint.state is EndpointState.EJECTED
        await until(ejected, "the monitor's ejection reaches the sidecar")
        assert view_states(redis_server)[flaky.url] == "failing"
        assert endpoint.outlier.retry_at == float("inf")  # no half-open try: only "ready" restores

        flaky.fake.behaviour.cold_start_s = 0.0

        async def restored() -> bool:
            return endpoint.state is EndpointState.READY
        await until(restored, "the pod's recovery reaches the sidecar")
        assert side.stats()["pod_view"]["notices"] >= 2 and side.prober.probes == 0
    finally:
        stop.set()
        await task
        await client.aclose()


def test_the_monitor_refuses_to_start_without_redis_and_says_why() -> None:
    env = {**os.environ, "SIDECAR_POOLS": json.dumps({"small": {
        "model": "m", "endpoints": ["http://127.0.0.1:1"], "health_path": "/health"}})}
    env.pop("SIDECAR_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "sidecar", "monitor"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "SIDECAR_REDIS_URL is not set" in done.stderr and "Traceback" not in done.stderr


async def test_the_monitor_rereads_its_pools_file_and_publishes_the_new_pod(
        tmp_path: Any, redis_server: RedisServer, pods: PodFactory) -> None:
    first, added = await pods(2)
    health = {"health_path": "/health", "health_interval_s": INTERVAL_S}
    pools_file = tmp_path / "pools.json"
    pools_file.write_text(json.dumps({"small": pool([first], **health)}))
    env = {"SIDECAR_POOLS_FILE": str(pools_file), "SIDECAR_REDIS_URL": redis_server.url}
    client = connect_redis(redis_server.url, timeout_s=2.0)
    monitor = FleetMonitor(load_settings(env), client, instance="reload")
    stop = asyncio.Event()
    task = asyncio.ensure_future(monitor.run(stop))
    try:
        async def one() -> bool:
            return view_states(redis_server) == {first.url: "ready"}
        await until(one, "the monitor publishes its one pod")
        pools_file.write_text(json.dumps({"small": pool([added], **health)}))
        assert monitor.reload()

        async def swapped() -> bool:
            return view_states(redis_server) == {added.url: "ready"}
        await until(swapped, "the view follows the re-read pools file")
        probes = first.fake.paths.get("/health", 0)
        await asyncio.sleep(2 * INTERVAL_S)
        assert first.fake.paths.get("/health", 0) == probes  # the removed pod: no probe
    finally:
        stop.set()
        await task
        await client.aclose()
