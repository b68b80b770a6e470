"""Telemetry behind one facade; the only module that imports `datadog`.

The hot path only updates in-process aggregates: an integer add per counter, a histogram
bucket (bisect) and a bounded sample reservoir per latency. Every FLUSH_INTERVAL_S a
background task sends counter deltas, gauges and the sampled latencies (with their sample
rate, so counts stay right) through the `datadog` package's DogStatsD client, configured by
Datadog's own variables (`DD_AGENT_HOST`, `DD_DOGSTATSD_PORT`, `DD_DOGSTATSD_URL` incl.
`unix://`, `DD_ENV`, `DD_SERVICE`, `DD_VERSION`, `DD_TAGS`). Prometheus text for
`GET /metrics` is rendered from the same aggregates. Nothing here blocks the event loop or
grows without bound when the agent is away: UDP and Unix datagrams are dropped, not queued.

Tags are pool, model, endpoint, status class, outcome: never session or request ids, and
models only as configured (never as a request names them). Each tag is sent once: the
`datadog` client adds the unified service tags itself, so they are set here exactly once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.supervise import Supervisor, cancel_and_wait

log = logging.getLogger("sidecar.events")

FLUSH_INTERVAL_S = 10.0
RESERVOIR = 512  # latency samples kept per metric and tag set between flushes
# Seconds: LLM latencies run from sub-millisecond overhead to minutes-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
COLD_START_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
TOKEN_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    kind: str        # counter, distribution, gauge
    datadog: str
    prometheus: str
    tags: tuple[str, ...]
    help: str
    unit: str = ""   # distributions: Datadog gets milliseconds, Prometheus seconds


CATALOG: tuple[Metric, ...] = (
    Metric("requests", "counter", "llm_sidecar.requests", "llm_sidecar_requests_total",
           ("pool", "model", "status_class"), "Requests answered, by the pool and configured "
           "model that served them (`none`: refused before routing) and status class."),
    Metric("upstream_errors", "counter", "llm_sidecar.upstream.errors",
           "llm_sidecar_upstream_errors_total", ("pool", "outcome"),
           "Failed upstream attempts by outcome (connect_error, first_byte_timeout, "
           "retryable_status, broken_before_content, broken_stream, …)."),
    Metric("retries", "counter", "llm_sidecar.retries", "llm_sidecar_retries_total",
           ("pool",), "Attempts after the first, by the pool retried from."),
    Metric("fallbacks", "counter", "llm_sidecar.fallbacks", "llm_sidecar_fallbacks_total",
           ("from_pool", "to_pool"), "Requests served by a pool other than the session's "
           "primary."),
    Metric("cold_start_fallbacks", "counter", "llm_sidecar.cold_start_fallbacks",
           "llm_sidecar_cold_start_fallbacks_total", ("pool",),
           "Sessions sent to a fallback because their pool was still warming."),
    Metric("budget_refusals", "counter", "llm_sidecar.retry_budget.refused",
           "llm_sidecar_retry_budget_refused_total", (), "Retries refused by the budget."),
    Metric("resumes", "counter", "llm_sidecar.resumes", "llm_sidecar_resumes_total", (),
           "Broken streams continued on another endpoint."),
    Metric("refused", "counter", "llm_sidecar.refused", "llm_sidecar_refused_total",
           ("status_code", "reason"), "Requests the sidecar answered itself, never sent "
           "upstream, because they were malformed or over a limit (400, 408, 413, 414, 417, "
           "431, 501), by status and error code."),
    Metric("internal_errors", "counter", "llm_sidecar.internal_errors",
           "llm_sidecar_internal_errors_total", (),
           "Requests whose handling failed inside the sidecar (a 500, or an aborted answer)."),
    Metric("client_disconnects", "counter", "llm_sidecar.client_disconnects",
           "llm_sidecar_client_disconnects_total", (),
           "Requests whose app went away before the answer was written."),
    Metric("prompt_tokens", "counter", "llm_sidecar.tokens.prompt",
           "llm_sidecar_prompt_tokens_total", ("pool", "model"),
           "Prompt tokens (from `usage`, else estimated), by the configured model that "
           "served."),
    Metric("completion_tokens", "counter", "llm_sidecar.tokens.completion",
           "llm_sidecar_completion_tokens_total", ("pool", "model"),
           "Completion tokens (from `usage`, streams included; else estimated)."),
    Metric("route_cache_hits", "counter", "llm_sidecar.route_cache.hits",
           "llm_sidecar_route_cache_hits_total", (), "Requests whose route was in memory."),
    Metric("route_cache_misses", "counter", "llm_sidecar.route_cache.misses",
           "llm_sidecar_route_cache_misses_total", (), "First touches (route resolved)."),
    Metric("redis_hits", "counter", "llm_sidecar.redis.hits", "llm_sidecar_redis_hits_total",
           (), "First touches that found the session's route in Redis."),
    Metric("redis_misses", "counter", "llm_sidecar.redis.misses",
           "llm_sidecar_redis_misses_total", (), "First touches that created the route."),
    Metric("redis_errors", "counter", "llm_sidecar.redis.errors",
           "llm_sidecar_redis_errors_total", ("kind",),
           "Redis operations that failed (error), ran past the budget (timeout) or were "
           "skipped while Redis was away (skipped)."),
    Metric("request_duration", "distribution", "llm_sidecar.request.duration",
           "llm_sidecar_request_duration_seconds", ("pool", "model", "status_class"),
           "Time from the request's arrival to the end of the response, by the pool and "
           "configured model that served it (after a fallback: the fallback's; `none`: "
           "refused before routing).", "ms"),
    Metric("upstream_ttfb", "distribution", "llm_sidecar.upstream.ttfb",
           "llm_sidecar_upstream_ttfb_seconds", ("pool", "model"),
           "Upstream time to response headers (streams: to the first content).", "ms"),
    Metric("overhead", "distribution", "llm_sidecar.overhead",
           "llm_sidecar_overhead_seconds", ("pool",),
           "Time the sidecar itself spent before the response started, upstream time "
           "excluded (also the `x-sidecar-overhead-ms` header).", "ms"),
    Metric("ttft", "distribution", "llm_sidecar.ttft", "llm_sidecar_ttft_seconds",
           ("pool", "model"), "Time to first token: from the request's arrival to a "
           "stream's first content event.", "ms"),
    Metric("inter_token", "distribution", "llm_sidecar.inter_token_latency",
           "llm_sidecar_inter_token_latency_seconds", ("pool", "model"),
           "Inter-token latency: a stream's mean gap between its content events (time "
           "per output token), one sample per stream.", "ms"),
    Metric("tokens_per_second", "distribution", "llm_sidecar.tokens_per_second",
           "llm_sidecar_tokens_per_second", ("pool", "model"),
           "Completion tokens per second of a stream, from its first to its last content "
           "event."),
    Metric("redis_latency", "distribution", "llm_sidecar.redis.latency",
           "llm_sidecar_redis_latency_seconds", (), "First-touch round trip to Redis.",
           "ms"),
    Metric("cold_start_duration", "distribution", "llm_sidecar.cold_start.duration",
           "llm_sidecar_cold_start_duration_seconds", ("pool",),
           "Time from an endpoint's registration to its first healthy probe.", "s"),
    Metric("endpoint_inflight", "gauge", "llm_sidecar.endpoint.inflight",
           "llm_sidecar_endpoint_inflight", ("pool", "endpoint"),
           "Requests in flight to each endpoint."),
    Metric("endpoint_state", "gauge", "llm_sidecar.endpoint.state",
           "llm_sidecar_endpoint_state", ("pool", "endpoint", "state"),
           "1 for each endpoint's current state (warming, ready, ejected, draining)."),
    Metric("endpoint_running", "gauge", "llm_sidecar.endpoint.running",
           "llm_sidecar_endpoint_running", ("pool", "endpoint"),
           "Requests the model pod runs (its vLLM metrics; else the fleet's in-flight)."),
    Metric("endpoint_waiting", "gauge", "llm_sidecar.endpoint.waiting",
           "llm_sidecar_endpoint_waiting", ("pool", "endpoint"),
           "Requests queued on the model pod (vllm:num_requests_waiting)."),
    Metric("endpoint_kv_usage", "gauge", "llm_sidecar.endpoint.kv_usage",
           "llm_sidecar_endpoint_kv_usage", ("pool", "endpoint"),
           "The model pod's KV-cache usage, 0–1 (vllm:kv_cache_usage_perc)."),
    Metric("endpoint_gpu_utilization", "gauge", "llm_sidecar.endpoint.gpu_utilization",
           "llm_sidecar_endpoint_gpu_utilization", ("pool", "endpoint"),
           "The model pod's GPU utilization, 0–1, mean over its devices (Nomad's device "
           "statistics; sent by the fleet monitor)."),
    Metric("endpoint_gpu_memory", "gauge", "llm_sidecar.endpoint.gpu_memory",
           "llm_sidecar_endpoint_gpu_memory", ("pool", "endpoint"),
           "The model pod's GPU memory in use, 0–1, mean over its devices (Nomad's device "
           "statistics; sent by the fleet monitor)."),
    Metric("load_scrape_failures", "counter", "llm_sidecar.load_scrape.failures",
           "llm_sidecar_load_scrape_failures_total", ("pool",),
           "Reads of a pod's `metrics_path` that failed or did not parse."),
    Metric("session_moves", "counter", "llm_sidecar.session_moves",
           "llm_sidecar_session_moves_total", ("pool",),
           "Sessions moved off a saturated pod to a less loaded one (sticky until "
           "saturated)."),
    Metric("spills", "counter", "llm_sidecar.spills", "llm_sidecar_spills_total", ("pool",),
           "Parallel calls of a session sent to another pod while the session's own pod "
           "queued (that call only; the session's route stays)."),
    Metric("pool_ready_endpoints", "gauge", "llm_sidecar.pool.ready_endpoints",
           "llm_sidecar_pool_ready_endpoints", ("pool",),
           "Ready endpoints per pool (0: no ready capacity)."),
    Metric("load_level", "gauge", "llm_sidecar.load_level", "llm_sidecar_load_level", (),
           "The load level new sessions use: 0 low, 1 medium, 2 high."),
    Metric("route_cache_size", "gauge", "llm_sidecar.route_cache.size",
           "llm_sidecar_route_cache_size", (), "Session routes held in memory."),
    Metric("redis_available", "gauge", "llm_sidecar.redis.available",
           "llm_sidecar_redis_available", (), "1 while the route store answers."),
    # Published by the scaler (its leader only), from its own /metrics and DogStatsD.
    Metric("scaler_forecast_replicas", "gauge", "llm_sidecar.scaler.forecast_replicas",
           "llm_sidecar_scaler_forecast_replicas", ("pool",),
           "Scaler: the replicas its policy wants for the pool now."),
    Metric("scaler_forecast_ratio", "gauge", "llm_sidecar.scaler.forecast_ratio",
           "llm_sidecar_scaler_forecast_ratio", ("pool",),
           "Scaler: forecast replicas ÷ the pool's current count (at least 1); the Nomad "
           "Autoscaler's target-value strategy with target 1 scales to the forecast."),
    Metric("scaler_demand", "gauge", "llm_sidecar.scaler.demand",
           "llm_sidecar_scaler_demand", ("pool",),
           "Scaler: work offered to the pool, in replicas' worth (tokens/s ÷ "
           "replica_tokens_per_s)."),
    Metric("scaler_queued", "gauge", "llm_sidecar.scaler.queued",
           "llm_sidecar_scaler_queued", ("pool",),
           "Scaler: requests waiting per request running at the pool's worst ready pod "
           "(the fleet monitor's view; without a fresh view, the pool's sums: a mean)."),
    Metric("scaler_gpu_utilization", "gauge", "llm_sidecar.scaler.gpu_utilization",
           "llm_sidecar_scaler_gpu_utilization", ("pool",),
           "Scaler: mean GPU utilization (0–1) over the pool's ready pods with a reading in "
           "the fleet monitor's view; absent without one."),
    Metric("scaler_view_fallbacks", "counter", "llm_sidecar.scaler.view_fallbacks",
           "llm_sidecar_scaler_view_fallbacks_total", ("pool",),
           "Scaler: ticks that judged a pool's saturation by the sidecars' pod-load reports "
           "because its pod view was missing, stale or unreadable."),
)
BY_KEY = {m.key: m for m in CATALOG}
EVENTS = ("cold start finished", "endpoint ejected", "endpoint restored",
          "fallback started", "fallback ended", "scaled pool", "load level",
          "pool has no ready capacity")


class _Series:
    """One distribution and tag set: Prometheus buckets plus a reservoir for DogStatsD."""

    __slots__ = ("bounds", "buckets", "count", "samples", "seen", "sum")

    def __init__(self, key: str) -> None:
        self.bounds = (COLD_START_BUCKETS if key == "cold_start_duration" else
                       TOKEN_RATE_BUCKETS if key == "tokens_per_second" else LATENCY_BUCKETS)
        self.buckets = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.samples: list[float] = []
        self.seen = 0  # samples offered since the last flush


UNIFIED_SERVICE_TAGS = (("DD_ENV", "env"), ("DD_SERVICE", "service"), ("DD_VERSION", "version"))
METRIC_TAG_KEYS = frozenset(tag for m in CATALOG for tag in m.tags)


def constant_tags(env: Mapping[str, str], added_by_client: Sequence[str] = ()) -> list[str]:
    """The tags every line carries, each once: DD_TAGS (space or comma separated), then
    env/service/version from DD_ENV/DD_SERVICE/DD_VERSION, which win over the same keys in
    DD_TAGS (as in Datadog's unified service tagging), then what the client derived from the
    process environment by itself (e.g. DATADOG_TAGS) that is not already there. Keys the
    metrics set themselves (pool, model, …) are not taken from DD_TAGS."""
    unified = {name: env[key].strip() for key, name in UNIFIED_SERVICE_TAGS
               if env.get(key, "").strip()}
    tags = []
    for tag in (*env.get("DD_TAGS", "").replace(",", " ").split(), *added_by_client):
        key = tag.partition(":")[0]
        if key in METRIC_TAG_KEYS:
            log.warning("DD_TAGS / DATADOG_TAGS: %r is ignored: the sidecar sets the %r tag "
                        "per metric", tag, key)
        elif ":" not in tag or key not in unified:
            tags.append(tag)
    tags.extend(f"{name}:{value}" for name, value in unified.items())
    return list(dict.fromkeys(tags))


def _dogstatsd(env: Mapping[str, str]) -> Any | None:
    url = env.get("DD_DOGSTATSD_URL", "")
    host = env.get("DD_AGENT_HOST", "")
    if not url and not host:
        return None
    from datadog.dogstatsd import DogStatsd

    # Buffered: lines are packed into full datagrams (the default is one per metric), and
    # sent when the flush task's worker thread calls flush() — never on the event loop.
    common: dict[str, Any] = {"disable_telemetry": True, "disable_buffering": False,
                              "flush_interval": 0}
    if url.startswith("unix://"):
        client = DogStatsd(socket_path=url[len("unix://"):], **common)
    elif url.startswith("udp://"):
        host, _, port = url[len("udp://"):].partition(":")
        client = DogStatsd(host=host, port=int(port or 8125), **common)
    else:
        client = DogStatsd(host=host, port=int(env.get("DD_DOGSTATSD_PORT") or 8125), **common)
    # The client reads DD_ENV/DD_SERVICE/DD_VERSION (and DATADOG_TAGS) from the process
    # environment and adds them itself: replaced by one list, so each tag is sent once.
    client.constant_tags = constant_tags(env, list(client.constant_tags or ()))
    return client


Collector = Callable[["Telemetry"], None]


class Telemetry:
    def __init__(self, env: Mapping[str, str] | None = None, seed: int | None = None) -> None:
        self._client = _dogstatsd(os.environ if env is None else env)
        self.counters: dict[tuple[str, tuple[str, ...]], float] = {}
        self._sent: dict[tuple[str, tuple[str, ...]], float] = {}
        self.series: dict[tuple[str, tuple[str, ...]], _Series] = {}
        self.gauges: dict[tuple[str, tuple[str, ...]], float] = {}
        self.collectors: list[Collector] = []
        self.events_sent: list[dict[str, Any]] = []
        self._random = random.Random(seed)
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0

    @property
    def datadog_enabled(self) -> bool:
        return self._client is not None

    # -- recording (the hot path: no I/O, no formatting) ----------------------------------

    def count(self, key: str, tags: tuple[str, ...] = (), value: float = 1) -> None:
        index = (key, tags)
        self.counters[index] = self.counters.get(index, 0) + value

    def observe(self, key: str, tags: tuple[str, ...], value: float) -> None:
        index = (key, tags)
        series = self.series.get(index)
        if series is None:
            series = self.series[index] = _Series(key)
        series.buckets[bisect.bisect_left(series.bounds, value)] += 1
        series.count += 1
        series.sum += value
        series.seen += 1
        if len(series.samples) < RESERVOIR:
            series.samples.append(value)
        else:  # reservoir sampling keeps a uniform sample of the interval
            # random() is C; randrange() runs Python code on every sample past the first
            slot = int(self._random.random() * series.seen)
            if slot < RESERVOIR:
                series.samples[slot] = value

    def gauge(self, key: str, tags: tuple[str, ...], value: float) -> None:
        self.gauges[(key, tags)] = value

    def event(self, title: str, text: str, *, alert_type: str = "info",
              tags: Sequence[str] = ()) -> None:
        log.info("event: %s: %s %s", title, text, " ".join(tags))
        self.events_sent = [*self.events_sent[-49:], {"title": title, "text": text,
                                                      "alert_type": alert_type,
                                                      "tags": list(tags)}]
        if self._client is not None:
            self._client.event(title, text, alert_type=alert_type, tags=list(tags))

    # -- export ---------------------------------------------------------------------------

    def collect(self) -> None:
        """Refresh gauges (and counters kept elsewhere as plain integers)."""
        for collector in self.collectors:
            collector(self)

    def snapshot(self) -> list[tuple[str, str, float, list[str], float]]:
        """On the event loop: what happened since the last snapshot, as DogStatsD calls
        (method, name, value, tags, sample rate). Reservoirs are emptied."""
        self.collect()
        self.flushes += 1
        batch: list[tuple[str, str, float, list[str], float]] = []
        enabled = self._client is not None
        for (key, tags), total in self.counters.items():
            delta = total - self._sent.get((key, tags), 0)
            if delta:
                metric = BY_KEY[key]
                if enabled:
                    batch.append(("increment", metric.datadog, delta, _tags(metric, tags), 1.0))
                self._sent[(key, tags)] = total
        if enabled:
            for (key, tags), value in self.gauges.items():
                metric = BY_KEY[key]
                batch.append(("gauge", metric.datadog, value, _tags(metric, tags), 1.0))
        for (key, tags), series in self.series.items():
            if series.seen and enabled:
                metric = BY_KEY[key]
                rate = len(series.samples) / series.seen
                scale = 1000.0 if metric.unit == "ms" else 1.0
                named = _tags(metric, tags)
                batch.extend(("distribution", metric.datadog, v * scale, named, rate)
                             for v in series.samples)
            series.samples.clear()
            series.seen = 0
        return batch

    def send(self, batch: list[tuple[str, str, float, list[str], float]]) -> int:
        """In a worker thread: hand the batch to the DogStatsD client and flush it."""
        client = self._client
        if client is None or not batch:
            return 0
        for method, name, value, tags, rate in batch:
            if method == "increment":
                client.increment(name, value, tags=tags)
            elif method == "gauge":
                client.gauge(name, value, tags=tags)
            else:
                client.distribution(name, value, tags=tags, sample_rate=rate)
        client.flush()
        return len(batch)

    def flush(self) -> int:
        """Snapshot and send now (tests, shutdown); returns the number of metric lines."""
        return self.send(self.snapshot())

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Flush every FLUSH_INTERVAL_S; a flush that raises restarts the loop after a
        backoff (counted by the supervisor)."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                batch = self.snapshot()
                await asyncio.to_thread(self.send, batch)
        self._task = (supervisor or Supervisor()).start("telemetry flush", loop)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait((self._task,))
        with contextlib.suppress(Exception):
            batch = self.snapshot()
            await asyncio.to_thread(self.send, batch)  # SIGTERM flushes metrics
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close_socket()

    def prometheus(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        self.collect()
        out: list[str] = []
        for metric in CATALOG:
            if metric.kind == "counter":
                rows = [(t, v) for (k, t), v in self.counters.items() if k == metric.key]
                _head(out, metric, "counter")
                for tags, value in sorted(rows):
                    out.append(f"{metric.prometheus}{_labels(metric, tags)} {_num(value)}")
            elif metric.kind == "gauge":
                rows = [(t, v) for (k, t), v in self.gauges.items() if k == metric.key]
                _head(out, metric, "gauge")
                for tags, value in sorted(rows):
                    out.append(f"{metric.prometheus}{_labels(metric, tags)} {_num(value)}")
            else:
                _head(out, metric, "histogram")
                for (key, tags), series in sorted(self.series.items(), key=lambda i: i[0]):
                    if key != metric.key:
                        continue
                    running = 0
                    for bound, n in zip([*series.bounds, float("inf")], series.buckets,
                                        strict=True):
                        running += n
                        le = "+Inf" if bound == float("inf") else _num(bound)
                        out.append(f"{metric.prometheus}_bucket"
                                   f"{_labels(metric, tags, ('le', le))} {running}")
                    out.append(f"{metric.prometheus}_sum{_labels(metric, tags)} "
                               f"{_num(series.sum)}")
                    out.append(f"{metric.prometheus}_count{_labels(metric, tags)} "
                               f"{series.count}")
        return "\n".join(out) + "\n"

    def counter_total(self, key: str) -> float:
        return sum(v for (k, _), v in self.counters.items() if k == key)


def catalog_markdown() -> str:
    """docs/reference.md's metric reference (a test checks it holds exactly this)."""
    lines = ["| Datadog (DogStatsD) | Prometheus | type | tags / labels | meaning |",
             "| --- | --- | --- | --- | --- |"]
    kinds = {"counter": ("count", "counter"), "gauge": ("gauge", "gauge"),
             "distribution": ("distribution", "histogram")}
    for m in CATALOG:
        dd, prom = kinds[m.kind]
        unit = f" ({m.unit} in Datadog, seconds in Prometheus)" if m.unit == "ms" else (
            " (seconds)" if m.unit == "s" else "")
        lines.append(f"| `{m.datadog}` | `{m.prometheus}` | {dd} / {prom} | "
                     f"{', '.join(m.tags) or '—'} | {m.help}{unit} |")
    return "\n".join(lines)


def _tags(metric: Metric, values: Iterable[str]) -> list[str]:
    return [f"{name}:{value}" for name, value in zip(metric.tags, values, strict=False)]


def _head(out: list[str], metric: Metric, kind: str) -> None:
    out.append(f"# HELP {metric.prometheus} {metric.help.replace(chr(10), ' ')}")
    out.append(f"# TYPE {metric.prometheus} {kind}")


def _labels(metric: Metric, values: tuple[str, ...], extra: tuple[str, str] | None = None
            ) -> str:
    pairs = [*zip(metric.tags, values, strict=False)]
    if extra:
        pairs.append(extra)
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

