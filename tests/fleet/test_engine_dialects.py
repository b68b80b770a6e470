"""Every engine's dialect: the label-selected series Triton needs, each engine's page read
under its own names and refused under any other's, and real processes — a fake-llm pod
speaking each dialect, saturated, read by a sidecar (and by the fleet monitor through real
Redis) whose pool names that engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.fleet.podload import ENGINES, MetricsParseError, Series, parse_metrics
from sidecar.fleet.podview import decode
from sidecar.tools.fakellm.dialects import DIALECTS, PAGES, Snapshot
from tests.conftest import Pod, PodFactory, SidecarFactory, admin, pool
from tests.fleet.test_fleet_monitor import MonitorProcess, monitor_process  # noqa: F401  (fixture)
from tests.support.polling import until
from tests.support.redis_server import RedisServer

# Where each dialect's page lives and which health answer its pool probes.
HEALTH = {"vllm": "/health", "sglang": "/health", "llamacpp": "/health", "tgi": "/health",
          "trtllm": "/health", "triton": "/health/ready"}
WITH_KV = {"vllm", "sglang", "trtllm", "triton"}  # the others export no KV gauge

# Triton with the TensorRT-LLM backend, as its README prints the page (labels sorted).
TRITON_PAGE = b"""\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 4
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 6
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="tensorrt_llm",version="1"} 0.4875
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="tensorrt_llm",version="1"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="tensorrt_llm",version="1"} 3042
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="free",model="tensorrt_llm",version="1"} 3198
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="tensorrt_llm",version="1"} 6240
nv_inference_request_success{model="tensorrt_llm",version="1"} 90
"""  # noqa: E501


# -- the label-selection parse -----------------------------------------------------------

@pytest.mark.parametrize("labels, selected", [
    (b'{request_type="waiting"}', True),                            # the block's first pair
    (b'{model="m",request_type="waiting",version="1"}', True),      # after a comma
    (b'{model="m",request_type="waiting2"}', False),                # another value
    (b'{model="m",xrequest_type="waiting"}', False),                # another label's name
    (b'{model="request_type=\\"waiting\\""}', False),               # inside a value
    (b"", False),                                                   # no labels at all
])
def test_a_label_selected_series_takes_only_its_own_pair(labels: bytes, selected: bool):
    assert Series(b"m", b'request_type="waiting"').selects(labels) is selected
    assert Series(b"m").selects(labels) is True  # a plain series takes every sample


def test_triton_reads_active_as_running_waiting_and_the_kv_fraction():
    load = parse_metrics(TRITON_PAGE, 1.0, "triton")
    assert (load.running, load.waiting, load.kv_usage) == (6.0, 4.0, 0.4875)


def test_triton_without_the_fraction_gauge_reads_used_over_max_blocks():
    page = b"\n".join(line for line in TRITON_PAGE.splitlines() if b'"fraction"' not in line)
    assert parse_metrics(page, 0, "triton").kv_usage == pytest.approx(3042 / 6240)
    no_max = b"\n".join(line for line in page.splitlines() if b'"max"' not in line)
    assert parse_metrics(no_max, 0, "triton").kv_usage == 0.0  # no total: unknown, not 1


def test_triton_sums_the_queues_of_two_models_on_one_server():
    second = TRITON_PAGE.replace(b'"tensorrt_llm"', b'"tensorrt_llm_2"')
    load = parse_metrics(TRITON_PAGE + second, 0, "triton")
    assert (load.running, load.waiting, load.kv_usage) == (12.0, 8.0, 0.4875)


def test_triton_without_a_waiting_sample_is_unreadable():
    page = b"\n".join(line for line in TRITON_PAGE.splitlines() if b'"waiting"' not in line)
    with pytest.raises(MetricsParseError, match='request_type="waiting"'):
        parse_metrics(page, 0, "triton")


@pytest.mark.parametrize("engine", ["trtllm", "tgi"])
def test_a_server_whose_gauges_appear_with_the_first_request_reads_nothing_before(engine):
    fresh = Snapshot("m", 0, 0, 0, 1000, 4, 0.0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(MetricsParseError, match="no "):
        parse_metrics(PAGES[engine][1](fresh).encode(), 0, engine)
    busy = Snapshot("m", 3, 2, 480, 1600, 3, 0.3, 5, 7, 0, 0, 0, 0)
    load = parse_metrics(PAGES[engine][1](busy).encode(), 0, engine)
    assert (load.running, load.waiting, load.completed) == (3.0, 2.0, 7.0)
    assert load.kv_usage == (0.3 if engine == "trtllm" else 0.0)


# -- each dialect read as itself, never as another -------------------------------------

snapshots = st.builds(
    Snapshot, model=st.text(min_size=1, max_size=12), running=st.integers(0, 64),
    waiting=st.integers(0, 64), in_use_tokens=st.integers(0, 4096),
    capacity=st.sampled_from([0, 1024, 4096]), max_num_seqs=st.integers(0, 64),
    usage=st.floats(0, 1), admitted=st.integers(1, 100), successes=st.integers(0, 10**6),
    prompt_tokens=st.integers(0, 10**6), generation_tokens=st.integers(0, 10**6),
    prefix_queries=st.integers(0, 10**6), prefix_hit_tokens=st.integers(0, 10**6))


@given(snapshot=snapshots)
def test_a_page_is_read_under_its_own_engine_and_refused_under_every_other(snapshot):
    assert set(DIALECTS) == set(ENGINES)
    for dialect in DIALECTS:
        page = PAGES[dialect][1](snapshot).encode()
        load = parse_metrics(page, 0, dialect)
        assert (load.running, load.waiting) == (snapshot.running, snapshot.waiting)
        for other in DIALECTS:
            if other != dialect:
                with pytest.raises(MetricsParseError):
                    parse_metrics(page, 0, other)


# -- real processes ------------------------------------------------------------------------

async def held(http: aiohttp.ClientSession, pod: Pod, i: int) -> None:
    """A streamed call left open until the test ends (its pod's shutdown ends it)."""
    body = {"model": "m", "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": f"question {i} " + "x" * 200}]}
    with contextlib.suppress(aiohttp.ClientError, asyncio.CancelledError):
        async with http.post(pod.url + "/v1/chat/completions", json=body) as r:
            await r.read()


async def saturated_pod(pods: PodFactory, http: aiohttp.ClientSession, engine: str
                        ) -> tuple[Pod, list[asyncio.Task[None]]]:
    """A pod speaking `engine` that runs two sequences and queues three more."""
    [pod] = await pods(1, model="m", engine=engine, max_num_seqs=2, kv_cache_tokens=1024,
                       tokens_per_s=20)
    calls = [asyncio.create_task(held(http, pod, i)) for i in range(5)]

    async def queued() -> bool:
        return (pod.fake.engine.running, pod.fake.engine.waiting) == (2, 3)
    await until(queued, "the pod runs two calls and queues three")
    return pod, calls


async def endpoint_view(http: aiohttp.ClientSession, running: Any, url: str) -> dict[str, Any]:
    async with http.get(admin(running) + "/endpoints") as r:
        data = await r.json()
    return next(e for p in data.values() for e in p["endpoints"] if e["url"] == url)


@pytest.mark.parametrize("engine", DIALECTS)
async def test_a_saturated_pod_is_read_in_its_engines_dialect(
        engine: str, pods: PodFactory, sidecar: SidecarFactory,
        http: aiohttp.ClientSession) -> None:
    pod, calls = await saturated_pod(pods, http, engine)
    running = await sidecar({"p": pool([pod], model="m", engine=engine,
                                       metrics_path=PAGES[engine][0],
                                       health_path=HEALTH[engine], health_interval_s=0.1)})

    async def read() -> bool:
        view = await endpoint_view(http, running, pod.url)
        return view["state"] == "ready" and view["load"] is not None \
            and view["load"]["waiting"] == 3
    await until(read, f"the sidecar reads the {engine} pod's queue")
    view = await endpoint_view(http, running, pod.url)
    load = view["load"]
    assert (load["running"], load["waiting"], load["source"]) == (2, 3, "metrics")
    assert load["saturated"]
    if engine in WITH_KV:
        assert 0 < load["kv_usage"] <= 1  # two long prompts hold part of the 1024 tokens
    else:
        assert load["kv_usage"] == 0
    prober = running.sidecar.prober
    assert prober.parse_failures == 0
    for call in calls:
        call.cancel()


async def test_a_pool_naming_another_engine_reads_no_load(
        pods: PodFactory, sidecar: SidecarFactory, http: aiohttp.ClientSession) -> None:
    pod, calls = await saturated_pod(pods, http, "sglang")
    running = await sidecar({"p": pool([pod], model="m", engine="vllm",
                                       metrics_path="/metrics", health_interval_s=0.1)})
    prober = running.sidecar.prober

    async def refused() -> bool:
        return prober.parse_failures >= 3
    await until(refused, "three pages refused")
    assert (await endpoint_view(http, running, pod.url))["load"] is None
    for call in calls:
        call.cancel()


async def test_a_loading_llamacpp_pod_is_warming_and_a_loading_triton_pod_is_not_ready(
        pods: PodFactory, sidecar: SidecarFactory, http: aiohttp.ClientSession) -> None:
    [llama] = await pods(1, model="m", engine="llamacpp", cold_start_s=600.0)
    [triton] = await pods(1, model="m", engine="triton", cold_start_s=600.0)
    running = await sidecar({
        "a": pool([llama], model="m", engine="llamacpp", health_path="/health",
                  health_interval_s=0.1),
        "b": pool([triton], model="n", engine="triton", health_path="/health/ready",
                  health_interval_s=0.1)})
    prober = running.sidecar.prober

    async def probed() -> bool:
        return llama.fake.paths.get("/health", 0) >= 2 and \
            triton.fake.paths.get("/health/ready", 0) >= 2
    await until(probed, "both pods probed twice")
    assert prober.loading_probes >= 2  # llama.cpp's 503 "Loading model" (Triton says 400)
    for pod in (llama, triton):
        assert (await endpoint_view(http, running, pod.url))["state"] == "warming"
        pod.fake.behaviour.cold_start_s = 0.0

    async def ready() -> bool:
        states = [(await endpoint_view(http, running, p.url))["state"] for p in (llama, triton)]
        return states == ["ready", "ready"]
    await until(ready, "both pods ready once loaded")


async def test_the_monitor_publishes_a_triton_pods_load_through_redis(
        redis_server: RedisServer, pods: PodFactory, http: aiohttp.ClientSession,
        monitor_process: Callable[[dict[str, str]], MonitorProcess]) -> None:  # noqa: F811
    pod, calls = await saturated_pod(pods, http, "triton")
    pools = {"small": pool([pod], model="m", engine="triton", metrics_path="/metrics",
                           health_path="/health/ready", health_interval_s=0.5)}
    await monitor_process({"SIDECAR_POOLS": json.dumps(pools),
                           "SIDECAR_REDIS_URL": redis_server.url}).start()
    client = redis_server.client()

    async def published() -> bool:
        raw = client.hmget("llmsc:podview:{small}", "version", "at", "view")
        if None in raw:
            return False
        entry = decode("small", *raw).endpoints.get(pod.url)
        return entry is not None and entry.load is not None and entry.load.waiting == 3
    await until(published, "the monitor publishes the pod's queue")
    raw = client.hmget("llmsc:podview:{small}", "version", "at", "view")
    load = decode("small", *raw).endpoints[pod.url].load
    assert load is not None and (load.running, load.waiting) == (2.0, 3.0)
    assert 0 < load.kv_usage <= 1
    for call in calls:
        call.cancel()


async def test_fake_llm_refuses_an_engine_it_cannot_speak(
        pods: PodFactory, http: aiohttp.ClientSession) -> None:
    [pod] = await pods(1)
    async with http.post(pod.url + "/_control", json={"engine": "ollama"}) as r:
        assert r.status == 400
        assert "engine must be one of" in await r.text()
    assert pod.fake.behaviour.engine == "vllm"
    async with http.post(pod.url + "/_control", json={"engine": "trtllm"}) as r:
        assert r.status == 200
    async with http.get(pod.url + "/metrics") as r:  # trtllm-serve's JSON statistics
        assert r.content_type == "application/json"
        assert (await r.json())[0]["numActiveRequests"] == 0
