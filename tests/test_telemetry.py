"""Telemetry: DogStatsD datagrams to a real UDP and Unix datagram socket, Prometheus text
that agrees with /stats, bounded memory without an agent, logs free of secrets and prompts,
and dashboards that only use metrics the code emits."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.telemetry import BY_KEY, CATALOG, RESERVOIR, Telemetry, catalog_markdown
from tests.conftest import CHAT, admin, base, chat, pool

ROOT = Path(__file__).resolve().parent.parent


class Agent:
    """A DogStatsD agent stand-in: a datagram socket read by a thread, like a real agent
    (a Unix datagram socket queues only a few datagrams before senders drop)."""

    def __init__(self, family: int, address: str | tuple[str, int]) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.lines: list[str] = []
        self._running = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                continue
            self.lines.extend(line for line in data.decode().split("\n") if line)

    def drain(self) -> list[str]:
        return list(self.lines)

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self.sock.close()


async def scripted_traffic(pods, sidecar, http, env: dict[str, str]):
    """Hits, misses, a fallback and a cold start, then a flush."""
    [large] = await pods(1, cold_start_s=0.3)
    [small] = await pods(1)
    running = await sidecar({"large": pool([large], "large-model", fallback="small",
                                           health_path="/health", health_interval_s=0.1),
                             "small": pool([small], "small-model")}, **env)
    await chat(http, running, "telemetry-1")  # large is warming: a cold-start fallback
    await chat(http, running, "telemetry-1")  # a route cache hit
    for _ in range(40):
        if running.sidecar.prober.cold_starts:
            break
        await asyncio.sleep(0.05)
    await chat(http, running, "telemetry-2")
    return running


async def flushed(running) -> None:
    """Send now (off the loop, as the flush task does) and give the agent time to read."""
    telemetry = running.sidecar.telemetry
    await asyncio.to_thread(telemetry.send, telemetry.snapshot())
    await asyncio.sleep(0.1)


def check_datagrams(lines: list[str]) -> None:
    def find(prefix: str, kind: str) -> list[str]:
        return [line for line in lines if line.startswith(prefix + ":") and f"|{kind}" in line]

    requests = find("llm_sidecar.requests", "c")
    assert any("pool:small" in line and "status_class:2xx" in line for line in requests)
    assert find("llm_sidecar.request.duration", "d")
    assert find("llm_sidecar.upstream.ttfb", "d")
    assert find("llm_sidecar.overhead", "d")
    assert any("from_pool:large" in line and "to_pool:small" in line
               for line in find("llm_sidecar.fallbacks", "c"))
    assert any("pool:large" in line for line in find("llm_sidecar.cold_start_fallbacks", "c"))
    assert find("llm_sidecar.route_cache.hits", "c")
    assert find("llm_sidecar.route_cache.misses", "c")
    assert any("model:small-model" in line for line in find("llm_sidecar.tokens.completion", "c"))
    assert any("state:ready" in line for line in find("llm_sidecar.endpoint.state", "g"))
    assert find("llm_sidecar.load_level", "g")
    assert find("llm_sidecar.cold_start.duration", "d")
    events = [line for line in lines if line.startswith("_e{")]
    assert any("cold start finished" in line for line in events)
    # tag cardinality: no session ids in any tag
    assert not any("telemetry-1" in line or "telemetry-2" in line for line in lines)
    # unified service tagging from DD_ENV / DD_SERVICE
    assert all("env:test" in line and "service:llm-sidecar" in line
               for line in lines if "|#" in line)


async def test_dogstatsd_over_udp(pods, sidecar, http):
    agent = Agent(socket.AF_INET, ("127.0.0.1", 0))
    try:
        port = agent.sock.getsockname()[1]
        running = await scripted_traffic(pods, sidecar, http, {
            "DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(port), "DD_ENV": "test",
            "DD_SERVICE": "llm-sidecar"})
        await flushed(running)
        check_datagrams(agent.drain())
    finally:
        agent.close()


async def test_dogstatsd_over_a_unix_datagram_socket(pods, sidecar, http):
    path = Path(tempfile.mkdtemp()) / "dsd.socket"
    agent = Agent(socket.AF_UNIX, str(path))
    try:
        running = await scripted_traffic(pods, sidecar, http, {
            "DD_DOGSTATSD_URL": f"unix://{path}", "DD_ENV": "test",
            "DD_SERVICE": "llm-sidecar"})
        await flushed(running)
        check_datagrams(agent.drain())
    finally:
        agent.close()


def datagram_tags(line: str) -> list[str]:
    """The tags of one DogStatsD line (metric `name:v|t|@r|#tags` or event `_e{…}|#tags`)."""
    for field in line.split("|")[1:]:
        if field.startswith("#"):
            return field[1:].split(",")
    return []


def duplicates(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Lines where a tag, or a tag key, appears twice."""
    found = []
    for line in lines:
        tags = datagram_tags(line)
        keys = Counter(tag.partition(":")[0] for tag in tags)
        twice = [tag for tag in tags if keys[tag.partition(":")[0]] > 1]
        if twice:
            found.append((line, twice))
    return found


async def test_every_datagram_carries_each_tag_once_with_the_agents_variables_set(
        pods, sidecar_process, http):
    """Set as Nomad sets them, in the real process's environment: the `datadog` client adds
    DD_ENV/DD_SERVICE/DD_VERSION itself, so the sidecar must not add them again."""
    agent = Agent(socket.AF_INET, ("127.0.0.1", 0))
    try:
        [pod] = await pods(1)
        process = sidecar_process({
            "SIDECAR_POOLS": json.dumps({"small": pool([pod])}),
            "DD_AGENT_HOST": "127.0.0.1", "DD_DOGSTATSD_PORT": str(agent.sock.getsockname()[1]),
            "DD_ENV": "prod", "DD_SERVICE": "chat-app", "DD_VERSION": "1.2.3",
            "DD_TAGS": "team:ml,env:prod region:eu-west-1"})
        await process.start()
        for i in range(5):
            async with http.post(process.base + "/v1/chat/completions", json=CHAT,
                                 headers={"x-session-id": f"tags-{i}"}) as r:
                assert r.status == 200
        async with http.post(process.base + "/v1/chat/completions", data=b"{}",
                             headers={"x-session-id": "x" * 300}) as r:
            assert r.status == 400  # refused before routing: pool and model `none`
        process.process.send_signal(signal.SIGTERM)  # the last flush goes out on exit
        assert await process.wait() == 0
        await asyncio.sleep(0.2)
        lines = agent.drain()
    finally:
        agent.close()
    tagged = [line for line in lines if "|#" in line]
    assert len(tagged) > 10, lines
    assert duplicates(tagged) == []
    for line in tagged:
        tags = datagram_tags(line)
        for tag in ("env:prod", "service:chat-app", "version:1.2.3", "team:ml",
                    "region:eu-west-1"):
            assert tag in tags, (tag, line)


async def test_latency_and_tokens_carry_the_model_that_served(pods, sidecar, http):
    agent = Agent(socket.AF_INET, ("127.0.0.1", 0))
    try:
        [large] = await pods(1, fail_next=1)  # its first answer is a 503: small serves it
        [small] = await pods(1)
        running = await sidecar({"large": pool([large], "large-model", fallback="small"),
                                 "small": pool([small], "small-model")},
                                DD_AGENT_HOST="127.0.0.1",
                                DD_DOGSTATSD_PORT=str(agent.sock.getsockname()[1]),
                                DD_ENV="test", DD_SERVICE="llm-sidecar")
        status, headers, _ = await chat(http, running, "model-1")
        assert status == 200 and headers["x-sidecar-fallback"] == "large"
        assert (await chat(http, running, "model-2"))[1]["x-sidecar-pool"] == "large"
        # A model name from the request never becomes a tag: the configured one does.
        await chat(http, running, "model-3", {**CHAT, "model": "made-up-model-4711"})
        await flushed(running)
        lines = agent.drain()
    finally:
        agent.close()
    assert duplicates([line for line in lines if "|#" in line]) == []
    served: dict[str, set[tuple[str, str]]] = {}
    for line in lines:
        name = line.partition(":")[0]
        tags = dict(tag.partition(":")[::2] for tag in datagram_tags(line))
        if name in ("llm_sidecar.request.duration", "llm_sidecar.upstream.ttfb",
                    "llm_sidecar.tokens.prompt", "llm_sidecar.tokens.completion"):
            served.setdefault(name, set()).add((tags.get("pool", ""), tags.get("model", "")))
    # model-1 asked for large and was served by small: the model after the fallback
    # rewrite is small's; model-2 and model-3 were served by large itself.
    for name in ("llm_sidecar.request.duration", "llm_sidecar.upstream.ttfb",
                 "llm_sidecar.tokens.prompt", "llm_sidecar.tokens.completion"):
        assert served.get(name) == {("small", "small-model"), ("large", "large-model")}, \
            (name, served.get(name))
    assert "made-up-model-4711" not in "".join(lines)
    telemetry = running.sidecar.telemetry
    for key, tags in [*telemetry.counters, *telemetry.series, *telemetry.gauges]:
        assert len(tags) == len(BY_KEY[key].tags), f"{key} recorded with {tags}: mislabelled"
    text = running.sidecar.telemetry.prometheus()
    assert 'llm_sidecar_request_duration_seconds_count{pool="small",model="small-model",' \
           'status_class="2xx"}' in text
    assert 'llm_sidecar_upstream_ttfb_seconds_count{pool="large",model="large-model"}' in text


async def test_an_unreachable_agent_costs_nothing_and_memory_stays_bounded(pods, sidecar, http):
    [pod] = await pods(1)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    running = await sidecar({"small": pool([pod])}, DD_AGENT_HOST="127.0.0.1",
                            DD_DOGSTATSD_PORT=str(port))
    telemetry = running.sidecar.telemetry
    for round_ in range(3):
        results = await asyncio.gather(*(chat(http, running, f"u-{round_}-{i}")
                                         for i in range(300)))
        assert {status for status, _, _ in results} == {200}
        telemetry.send(telemetry.snapshot())
    for series in telemetry.series.values():
        assert len(series.samples) == 0 and series.seen == 0
    # 900 requests: the aggregates hold a fixed number of tag sets, not one per request.
    assert len(telemetry.counters) < 40 and len(telemetry.series) < 10


def test_constant_tags_are_each_sent_once():
    from sidecar.telemetry import constant_tags

    env = {"DD_TAGS": "team:ml, env:staging region:eu,team:ml pool:sneaky", "DD_ENV": "prod",
           "DD_SERVICE": "chat-app", "DD_VERSION": "1.2.3"}
    # What the `datadog` client adds from the process environment by itself.
    client = ["env:prod", "service:chat-app", "version:1.2.3", "dd.internal.entity_id:x"]
    assert constant_tags(env, client) == ["team:ml", "region:eu", "dd.internal.entity_id:x",
                                          "env:prod", "service:chat-app", "version:1.2.3"]
    assert constant_tags({"DD_TAGS": "env:staging"}) == ["env:staging"]
    assert constant_tags({}) == []


def test_the_sample_reservoir_is_bounded_and_keeps_counts_honest():
    telemetry = Telemetry({})
    for i in range(10_000):
        telemetry.observe("overhead", ("small",), i / 1e6)
    [series] = telemetry.series.values()
    assert len(series.samples) == RESERVOIR and series.count == 10_000
    assert sum(series.buckets) == 10_000


async def test_metrics_parse_and_agree_with_stats(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    for i in range(7):
        await chat(http, running, f"m-{i % 3}")
    async with http.post(base(running) + "/v1/chat/completions", json=CHAT,
                         headers={"x-session-id": "x" * 300}) as r:
        assert r.status == 400
    async with http.get(admin(running) + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    async with http.get(admin(running) + "/stats") as r:
        stats = await r.json()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = families["llm_sidecar_requests"]
    total = sum(s.value for s in requests.samples)
    assert total == stats["proxy"]["requests"] == 8
    by_status = {(s.labels["pool"], s.labels["status_class"]): s.value for s in requests.samples}
    assert by_status == {("small", "2xx"): 7, ("none", "4xx"): 1}
    hits = families["llm_sidecar_route_cache_hits"].samples[0].value
    assert hits == stats["routes"]["cache_hits"] == 4
    duration = families["llm_sidecar_request_duration_seconds"]
    counts = [s.value for s in duration.samples if s.name.endswith("_count")]
    assert sum(counts) == 8
    buckets = [s for s in duration.samples if s.name.endswith("_bucket")
               and s.labels["pool"] == "small"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 7
    ready = families["llm_sidecar_pool_ready_endpoints"].samples[0]
    assert ready.labels == {"pool": "small"} and ready.value == 1


async def test_every_response_says_the_sidecars_own_overhead(pods, sidecar, http):
    [pod] = await pods(1, ttft_ms=50)
    running = await sidecar({"small": pool([pod])})
    _, headers, _ = await chat(http, running, "oh")
    overhead = float(headers["x-sidecar-overhead-ms"])
    # the upstream took 50 ms: none of it may be counted as the sidecar's; but its own
    # work (routing, headers) is measured, not rounded away to zero
    assert 0 < overhead < 40


async def test_no_log_line_holds_a_key_or_message_content(pods, sidecar, http, caplog):
    [pod] = await pods(1, drop_after_chunks=2, max_tokens=5)
    secret = "sk-live-5ecret-do-not-log"
    prompt = "my-private-prompt-text-4711"
    running = await sidecar({"external": pool([pod], api_key_env="TEL_KEY")},
                            TEL_KEY=secret, SIDECAR_REQUEST_LOG="info")
    caplog.set_level(logging.DEBUG)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    await chat(http, running, "logs", body, Authorization=f"Bearer {secret}")
    try:
        async with http.post(base(running) + "/v1/chat/completions",
                             json={**body, "stream": True},
                             headers={"Authorization": f"Bearer {secret}"}) as r:
            await r.read()
    except Exception:  # the broken stream
        pass
    async with http.get(admin(running) + "/stats") as r:
        stats_text = await r.text()
    records = [r.getMessage() + json.dumps(getattr(r, "fields", {})) for r in caplog.records]
    assert any('"session": "logs"' in line for line in records), "request lines are logged"
    for text in [*records, stats_text]:
        assert secret not in text
        assert prompt not in text


def test_dashboard_and_monitors_use_only_metrics_the_code_emits():
    names = {m.datadog for m in CATALOG}
    queries = []
    dashboard = json.loads((ROOT / "deploy" / "datadog" / "dashboard.json").read_text())
    for widget in dashboard["widgets"]:
        for request in widget["definition"].get("requests", []):
            queries.append(request["q"])
    monitors = json.loads((ROOT / "deploy" / "datadog" / "monitors.json").read_text())
    queries.extend(m["query"] for m in monitors)
    used = set(re.findall(r"(llm_sidecar\.[a-z_.]+?)\{", " ".join(queries)))
    assert used, "no metric found in the queries"
    assert used <= names, sorted(used - names)
    assert len(monitors) >= 4
    # every tag a query filters ($template variables) or groups by is a tag the metric has
    for query in queries:
        for name, filters in re.findall(r"(llm_sidecar\.[a-z_.]+?)\{([^}]*)\}", query):
            metric = next(m for m in CATALOG if m.datadog == name)
            for variable in re.findall(r"\$(\w+)", filters):
                assert variable in (*metric.tags, "service", "env"), (name, variable)
        for name, tag_list in re.findall(r"(llm_sidecar\.[a-z_.]+?)\{[^}]*\} by \{([^}]*)\}",
                                         query):
            metric = next(m for m in CATALOG if m.datadog == name)
            for tag in tag_list.split(","):
                assert tag in (*metric.tags, "service", "env"), (name, tag)


def test_the_reference_lists_every_metric_as_the_code_defines_it():
    reference = (ROOT / "docs" / "reference.md").read_text()
    assert catalog_markdown() in reference


@pytest.mark.parametrize("key", sorted(BY_KEY))
def test_every_catalog_metric_is_emitted_somewhere(key):
    sources = "".join(p.read_text() for p in (ROOT / "sidecar").rglob("*.py")
                      if p.name != "telemetry.py")
    assert f'"{key}"' in sources, f"{key} is in the catalog but nothing records it"
