"""The fleet monitor's GPU readings from Nomad, against real parts: fake-llm pods, the fake
Nomad on loopback (service registrations and allocation statistics in Nomad's shapes, token
required), real Redis in standalone, Sentinel and Cluster, a sidecar that follows the view,
and `llm-sidecar monitor` as a process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import load_settings
from sidecar.fleet.gpureader import READ_TIMEOUT_S
from sidecar.fleet.monitor import FleetMonitor
from sidecar.fleet.podview import STALE_INTERVALS, view_key
from sidecar.routing.store import connect_redis
from sidecar.scaler.config import NomadAccess, load_nomad_access
from sidecar.supervise import Supervisor
from tests.conftest import Pod, PodFactory, SidecarFactory, pool
from tests.routing.test_store_topologies import Topology, topology  # noqa: F401 (the fixture)
from tests.support.fake_nomad import TOKEN, FakeNomad, alloc_stats, nvidia_device
from tests.support.polling import until
from tests.support.redis_server import RedisServer, free_port

INTERVAL_S = 1.0
SERVICE = "llm-small"


class NomadServer:
    """The fake Nomad behind a real listener that a test can stop (Nomad down)."""

    def __init__(self) -> None:
        self.fake = FakeNomad()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> NomadServer:
        self.runner = web.AppRunner(self.fake.app(), shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


@pytest.fixture
async def nomad_server() -> AsyncIterator[NomadServer]:
    server = await NomadServer().start()
    try:
        yield server
    finally:
        server.fake.delay_s = 0.0
        await server.stop()


def gpu_pool(pods: list[Pod], **extra: Any) -> dict[str, Any]:
    return {"small": pool(pods, health_path="/health", metrics_path="/metrics",
                          health_interval_s=INTERVAL_S, nomad_service=SERVICE, **extra)}


def access(server: NomadServer, token: str | None = TOKEN) -> NomadAccess:
    return NomadAccess(server.addr, token)


def read_view(client: Any) -> dict[str, Any]:
    body = client.hget(view_key("small"), "view")
    return {} if body is None else dict(json.loads(body))


class Running:
    """An in-process monitor, stopped (lock released) by `stop`."""

    def __init__(self, monitor: FleetMonitor, client: Any) -> None:
        self.monitor, self.client = monitor, client
        self.stop_event = asyncio.Event()
        self.task = asyncio.ensure_future(monitor.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await self.task
        await self.client.aclose()


@contextlib.asynccontextmanager
async def running_monitor(env: dict[str, str], nomad: NomadAccess | None,
                          mode: str = "standalone") -> AsyncIterator[FleetMonitor]:
    client = connect_redis(env["SIDECAR_REDIS_URL"], mode, timeout_s=2.0,
                           sentinel_master=env.get("SIDECAR_REDIS_SENTINEL_MASTER"))
    monitor = FleetMonitor(load_settings(env), client, instance="gpu", nomad=nomad,
                           supervisor=Supervisor(backoff_scale=0.1))
    run = Running(monitor, client)
    try:
        yield monitor
    finally:
        await run.stop()


async def test_the_view_carries_each_endpoints_gpu_reading_and_a_sidecar_keeps_it(
        topology: Topology, pods: PodFactory, sidecar: SidecarFactory,  # noqa: F811
        nomad_server: NomadServer) -> None:
    """Standalone, Sentinel and Cluster: each endpoint's reading (one pod with two H100s,
    one with one) is in the view the monitor writes, on the monitor's and the following
    sidecar's endpoints and /stats, and in the monitor's gauges; a new reading follows."""
    two, one = await pods(2)
    fake = nomad_server.fake
    alloc_two = fake.register(SERVICE, two.url, alloc_stats({
        "GPU-0": nvidia_device(90, 60_000, 80_000), "GPU-1": nvidia_device(70, 20_000, 80_000)}))
    alloc_one = fake.register(SERVICE, one.url, alloc_stats({
        "GPU-2": nvidia_device(25, 8_000, 80_000)}))
    fake.register("another-service", "http://127.0.0.1:1")   # not ours: never read
    pools = gpu_pool([two, one])
    env = {"SIDECAR_POOLS": json.dumps(pools), **topology.env}
    reader = topology.client()

    def gpu_in_view() -> dict[str, Any]:
        return {url: entry["gpu"] for url, entry in read_view(reader).items()}

    async with running_monitor(env, access(nomad_server), topology.mode) as monitor:
        await until(lambda: all(g is not None for g in gpu_in_view().values())
                    and len(gpu_in_view()) == 2, "the view carries both pods' GPUs")
        view = gpu_in_view()
        assert view[two.url][:3] == [0.8, 0.5, 2]        # mean of 90 % and 70 %; of 75/25 %
        assert view[one.url][:3] == [0.25, 0.1, 1]
        states = {url: e["state"] for url, e in read_view(reader).items()}
        assert states == {two.url: "ready", one.url: "ready"}  # health and load as before
        assert all(e["load"] is not None for e in read_view(reader).values())

        shown = {e["url"]: e["gpu"] for e in monitor.stats()["endpoints"]}
        assert shown[two.url]["utilization"] == 0.8 and shown[one.url]["devices"] == 1
        monitor.telemetry.collect()
        gauges = monitor.telemetry.gauges
        assert gauges[("endpoint_gpu_utilization", ("small", two.url))] == pytest.approx(0.8)
        assert gauges[("endpoint_gpu_memory", ("small", one.url))] == pytest.approx(0.1)

        running = await sidecar(pools, **topology.env, SIDECAR_REDIS_TIMEOUT_MS="1000")
        side = running.sidecar

        def followed() -> bool:
            e = side.pools.endpoint("small", two.url)
            return e is not None and e.gpu is not None
        await until(followed, "the sidecar keeps the monitor's reading on its endpoint")
        endpoint = side.pools.endpoint("small", two.url)
        assert endpoint is not None and endpoint.gpu is not None
        assert (endpoint.gpu.utilization, endpoint.gpu.memory, endpoint.gpu.devices) == \
            (0.8, 0.5, 2)
        assert abs(time.time() - endpoint.gpu.at) < 15  # its age, on this host's clock
        seen = {e["url"]: e["gpu"] for e in side.stats()["endpoints"]}
        assert seen[one.url]["utilization"] == 0.25
        [row] = [line for line in top_text(side.stats()).splitlines() if two.url in line]
        assert row.rstrip().endswith("80% · 50% mem (2)")  # `llm-sidecar top`'s gpu column
        assert side.prober.probes == 0  # it follows the view: no probe of its own

        fake.allocations[alloc_one] = alloc_stats({"GPU-2": nvidia_device(100, 80_000,
                                                                          80_000)})

        def updated() -> bool:
            e = side.pools.endpoint("small", one.url)
            return e is not None and e.gpu is not None and e.gpu.utilization == 1.0
        await until(updated, "a new reading reaches the sidecar")

        # At most one stats read per allocation per interval, registrations less often.
        before = dict(fake.stats_reads), fake.service_reads
        started = time.monotonic()
        await asyncio.sleep(4 * INTERVAL_S)
        window = time.monotonic() - started
        for alloc in (alloc_two, alloc_one):
            assert fake.stats_reads[alloc] - before[0][alloc] <= window / INTERVAL_S + 1
        assert fake.service_reads - before[1] <= 1
        assert len(fake.stats_reads) == 2   # only the allocations of this pool's endpoints


@pytest.mark.parametrize("fault", ["down", "slow", "forbidden"])
async def test_a_nomad_down_slow_or_refusing_leaves_health_and_load_intact(
        fault: str, redis_server: RedisServer, pods: PodFactory,
        nomad_server: NomadServer, caplog: pytest.LogCaptureFixture) -> None:
    """The probes go on (the view is written with every endpoint's state and load); the
    last GPU reading stays until it is STALE_INTERVALS old, then the view says None; the
    failure is logged once, the recovery once; the token is in no log line or /stats."""
    caplog.set_level(logging.INFO)
    [pod] = await pods(1)
    fake = nomad_server.fake
    alloc = fake.register(SERVICE, pod.url, alloc_stats({"GPU-0": nvidia_device(50, 1, 2)}))
    env = {"SIDECAR_POOLS": json.dumps(gpu_pool([pod])), "SIDECAR_REDIS_URL": redis_server.url}
    client = redis_server.client()

    def entry() -> dict[str, Any]:
        return dict(read_view(client).get(pod.url) or {})

    async with running_monitor(env, access(nomad_server)) as monitor:
        await until(lambda: entry().get("gpu") is not None, "a first reading")
        version = int(client.hget(view_key("small"), "version"))
        probes = monitor.stats()["health_probes"]
        if fault == "down":
            await nomad_server.stop()
        elif fault == "slow":
            fake.delay_s = READ_TIMEOUT_S + 1.0
        else:
            fake.deny_everything = True
        failed_at = time.monotonic()

        await until(lambda: "gpu" in entry() and entry()["gpu"] is None,
                    "the reading is dropped once stale", timeout=30)
        # Not before it was STALE_INTERVALS old (the last value is kept until then).
        assert time.monotonic() - failed_at >= (STALE_INTERVALS - 1) * INTERVAL_S
        assert entry()["state"] == "ready" and entry()["load"] is not None
        # The probes and the view's writes go on while Nomad is away (a loaded machine can
        # stretch a jittered interval: the count is awaited, still during the outage).
        assert int(client.hget(view_key("small"), "version")) > version + 1
        await until(lambda: monitor.stats()["health_probes"] > probes + 1,
                    "the probes go on while Nomad is away")
        assert monitor.stats()["gpu"]["failing"] is True
        await asyncio.sleep(2 * INTERVAL_S)  # more failing rounds: still one warning
        warnings = [r for r in caplog.records if "GPU readings from Nomad failed" in r.message]
        assert len(warnings) == 1, [r.message for r in warnings]
        if fault == "forbidden":
            assert "read-job" in warnings[0].message

        if fault == "down":
            await nomad_server.start()
        fake.delay_s = 0.0
        fake.deny_everything = False
        await until(lambda: entry().get("gpu") is not None, "readings again")
        assert [r.message for r in caplog.records].count("GPU readings from Nomad work again") \
            == 1
        assert fake.stats_reads[alloc] >= 2
        stats_text = json.dumps(monitor.stats())
    assert TOKEN not in caplog.text and TOKEN not in stats_text
    assert '"NOMAD_TOKEN": "<redacted>"' in stats_text


@pytest.mark.parametrize("token", ["not-the-token", None])
async def test_the_token_is_sent_and_a_wrong_or_missing_one_reads_nothing(
        token: str | None, redis_server: RedisServer, pods: PodFactory,
        nomad_server: NomadServer) -> None:
    [pod] = await pods(1)
    fake = nomad_server.fake
    fake.register(SERVICE, pod.url, alloc_stats({"GPU-0": nvidia_device(50, 1, 2)}))
    env = {"SIDECAR_POOLS": json.dumps(gpu_pool([pod])), "SIDECAR_REDIS_URL": redis_server.url}
    async with running_monitor(env, access(nomad_server, token=token)) as monitor:
        await until(lambda: fake.denied >= 1, "Nomad refuses the request")
        await until(lambda: monitor.stats()["gpu"]["last_error"] is not None, "the refusal")
        await until(lambda: pod.url in read_view(redis_server.client()), "the view")
        assert read_view(redis_server.client())[pod.url]["gpu"] is None
        assert fake.service_reads == 0 and fake.stats_reads == {}
        error = str(monitor.stats()["gpu"]["last_error"])
        assert "403" in error
        assert ("NOMAD_TOKEN is not set" in error) is (token is None)


async def test_without_a_nomad_service_nomad_is_never_called(
        redis_server: RedisServer, pods: PodFactory, nomad_server: NomadServer) -> None:
    [pod] = await pods(1)
    pools = {"small": pool([pod], health_path="/health", health_interval_s=INTERVAL_S)}
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis_server.url}
    async with running_monitor(env, access(nomad_server)) as monitor:
        await until(lambda: pod.url in read_view(redis_server.client()), "the view")
        await asyncio.sleep(3 * INTERVAL_S)
        assert nomad_server.fake.queries == []
        assert read_view(redis_server.client())[pod.url]["gpu"] is None
        assert monitor.stats()["gpu"]["service_reads"] == 0


async def test_an_endpoint_nomad_does_not_register_has_no_reading(
        redis_server: RedisServer, pods: PodFactory, nomad_server: NomadServer) -> None:
    known, unknown = await pods(2)
    fake = nomad_server.fake
    fake.register(SERVICE, known.url, alloc_stats({"GPU-0": nvidia_device(10, 1, 10)}))
    env = {"SIDECAR_POOLS": json.dumps(gpu_pool([known, unknown])),
           "SIDECAR_REDIS_URL": redis_server.url}
    async with running_monitor(env, access(nomad_server)):
        def view() -> dict[str, Any]:
            return read_view(redis_server.client())
        await until(lambda: (view().get(known.url) or {}).get("gpu") is not None, "reading")
        assert view()[unknown.url]["gpu"] is None
        assert view()[unknown.url]["state"] == "ready"
        # An endpoint without a registration does not make every round ask again.
        reads = fake.service_reads
        await asyncio.sleep(3 * INTERVAL_S)
        assert fake.service_reads - reads <= 1


def test_nomad_access_is_read_from_the_scalers_variables() -> None:
    got = load_nomad_access({"NOMAD_ADDR": "https://nomad.service:4646/",
                             "NOMAD_TOKEN": "s3cret", "NOMAD_NAMESPACE": "llm",
                             "NOMAD_REGION": "eu"})
    assert got.nomad_addr == "https://nomad.service:4646"
    assert got.nomad_namespace == "llm" and got.nomad_region == "eu"
    assert "s3cret" not in repr(got) and "s3cret" not in json.dumps(got.redacted())
    assert load_nomad_access({}).nomad_addr == "http://127.0.0.1:4646"


def test_the_monitor_refuses_a_bad_nomad_addr_only_when_a_pool_reads_gpus() -> None:
    pools = {"small": {"model": "m", "endpoints": ["http://127.0.0.1:1"],
                       "health_path": "/health", "nomad_service": SERVICE}}
    env = {**os.environ, "SIDECAR_POOLS": json.dumps(pools),
           "SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0", "NOMAD_ADDR": "nomad:4646"}
    done = subprocess.run([sys.executable, "-m", "sidecar", "monitor"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "NOMAD_ADDR='nomad:4646'" in done.stderr and "nomad_service" in done.stderr
    assert "Traceback" not in done.stderr


async def test_the_monitor_process_logs_a_refusal_once_and_never_its_token(
        redis_server: RedisServer, pods: PodFactory, nomad_server: NomadServer,
        tmp_path: Any) -> None:
    """`llm-sidecar monitor` with NOMAD_TOKEN from the environment, against a Nomad that
    refuses it: one warning in its log, the view written, the token in no output."""
    [pod] = await pods(1)
    secret = "this-token-must-never-be-printed"
    nomad_server.fake.register(SERVICE, pod.url)
    port = free_port()
    env = {**os.environ, "SIDECAR_POOLS": json.dumps(gpu_pool([pod])),
           "SIDECAR_REDIS_URL": redis_server.url, "SIDECAR_LOG_FORMAT": "text",
           "NOMAD_ADDR": nomad_server.addr, "NOMAD_TOKEN": secret}
    log_file = tmp_path / "monitor.log"
    with log_file.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "sidecar", "monitor",
                                    "--stats-listen", f"127.0.0.1:{port}"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        async def stats() -> dict[str, Any] | None:
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as http, \
                        http.get(f"http://127.0.0.1:{port}/stats") as response:
                    result: dict[str, Any] = await response.json()
                    return result
            return None

        async def refused_a_few_times() -> bool:
            got = await stats()
            return bool(got and got["gpu"] and got["gpu"]["rounds"] >= 3)
        await until(refused_a_few_times, "the monitor reads (and is refused) a few rounds")
        shown = await stats()
        assert shown is not None and shown["gpu"]["failing"] is True
        assert shown["gpu"]["NOMAD_TOKEN"] == "<redacted>"
        assert secret not in json.dumps(shown)
        assert nomad_server.fake.denied >= 2  # asked again, each time refused
        assert pod.url in read_view(redis_server.client())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    output = log_file.read_text()
    assert secret not in output
    assert output.count("GPU readings from Nomad failed") == 1, output
    assert "read-job" in output


def test_the_monitor_job_reads_the_gpus_of_the_pool_jobs_services() -> None:
    """nomad/monitor.hcl: every pool's nomad_service is a service a pool job registers, and
    the task gets what the reads need: NOMAD_ADDR with the CA that signed it, the namespace
    the pool jobs run in, and a token rendered from Nomad Variables into its secrets."""
    from tests.deploy.test_deploy import JOB_FILES, ROOT, groups, load_job, pools_template, tasks

    _, data = pools_template("monitor.hcl", "monitor")
    named = set(re.findall(r'"nomad_service": "([^"]+)"', data))
    registered = {}
    for path in JOB_FILES:
        _, pool_job = load_job(path)
        for group in groups(pool_job).values():
            for service in group.get("service", []):
                registered[service["name"]] = pool_job.get("namespace", "default")
    assert named == {"llm-small", "llm-large"} and named <= set(registered)

    job_name, job = load_job(ROOT / "nomad" / "monitor.hcl")
    [group] = groups(job).values()
    task = tasks(group)["monitor"]
    [env] = task["env"]
    assert {registered[n] for n in named} == {env.get("NOMAD_NAMESPACE", "default")}
    destinations = {t["destination"] for t in task["template"]}
    if env["NOMAD_ADDR"].startswith("https://"):
        assert env["NOMAD_CACERT"] in destinations
    [token] = [t for t in task["template"] if "NOMAD_TOKEN=" in t["data"]]
    assert token["env"] is True and token["destination"].startswith("${NOMAD_SECRETS_DIR}/")
    assert f'nomadVar "nomad/jobs/{job_name}"' in token["data"]
    assert "NOMAD_TOKEN" not in env   # never in the job file itself


async def test_a_large_stats_answer_is_read_whole(nomad_server: NomadServer) -> None:
    """An allocation answer of a few hundred KB (many devices, long descriptions) arrives in
    several chunks: the reader reads to its end, not the first chunk."""
    from sidecar.fleet.gpureader import GpuReader

    devices = {f"GPU-{i:03d}": nvidia_device(40 + i % 2 * 20, 10, 100) for i in range(64)}
    for device in devices.values():
        device["Stats"]["Attributes"]["Padding"] = {"StringVal": "x" * 4000}
    fake = nomad_server.fake
    alloc = fake.register(SERVICE, "http://127.0.0.1:8000", alloc_stats(devices))
    assert len(json.dumps(fake.allocations[alloc])) > 256 * 1024
    reader = GpuReader(access(nomad_server), lambda: INTERVAL_S, dict, lambda *a: None)
    try:
        usage = await reader.read_stats(alloc)
    finally:
        await reader.close()
    assert usage is not None and usage.devices == 64
    assert usage.utilization == pytest.approx(0.5)


async def test_a_sidecar_drops_the_reading_when_the_view_goes_stale(
        redis_server: RedisServer, pods: PodFactory, sidecar: SidecarFactory,
        nomad_server: NomadServer) -> None:
    """Only the monitor reads GPUs: once its view is stale (the monitor stopped) the
    sidecar probes by itself and holds no reading it cannot renew."""
    [pod] = await pods(1)
    nomad_server.fake.register(SERVICE, pod.url, alloc_stats({"GPU-0": nvidia_device(30, 1, 4)}))
    pools = gpu_pool([pod])
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis_server.url}
    async with running_monitor(env, access(nomad_server)):
        running = await sidecar(pools, SIDECAR_REDIS_URL=redis_server.url)
        endpoint = running.sidecar.pools.endpoint("small", pod.url)
        assert endpoint is not None
        await until(lambda: endpoint.gpu is not None, "the sidecar holds the reading")
        assert endpoint.gpu is not None and endpoint.gpu.utilization == 0.3
    # The monitor stopped: no view is written any more.

    def probing() -> bool:
        return running.sidecar.stats()["pod_view"]["pools"]["small"]["source"] == "probing"
    await until(probing, "the view goes stale and the sidecar probes")
    assert endpoint.gpu is None
    assert running.sidecar.stats()["endpoints"][0]["gpu"] is None


async def test_registrations_nomad_pages_are_all_read(nomad_server: NomadServer) -> None:
    """A service list Nomad answers in pages (`X-Nomad-NextToken`) is followed to its end:
    an endpoint on a later page still gets its allocation."""
    from sidecar.fleet.gpureader import GpuReader

    fake = nomad_server.fake
    fake.page_size = 2
    urls = [f"http://127.0.0.1:{8000 + i}" for i in range(5)]
    allocs = {url: fake.register(SERVICE, url) for url in urls}
    reader = GpuReader(access(nomad_server), lambda: INTERVAL_S, dict, lambda *a: None)
    try:
        await reader.read_services({"p": (SERVICE, urls)})
    finally:
        await reader.close()
    assert reader.allocations == {("p", url): alloc for url, alloc in allocs.items()}
    assert fake.service_reads == 3
    assert [q.get("next_token") for q in fake.queries] == \
        [None, *(r["ID"] for r in fake.services[SERVICE][2::2])]


def top_text(stats: dict[str, Any]) -> str:
    """What `llm-sidecar top` prints for these stats."""
    from rich.console import Console

    from sidecar.tools.top import Snapshot, render

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render(Snapshot(time.time(), stats, {}), None))
    return console.export_text()
