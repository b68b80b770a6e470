"""A model pod's load: what its `/metrics` page says (parsed here, for only the series routing
needs, under the names of the pool's engine) or, without one, the in-flight counts every
sidecar heartbeats to Redis.

Pure: bytes and numbers in, a `PodLoad` out; no I/O. The prober and the heartbeat reader
fill `Endpoint.load` with these values in the background.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNNING = b"vllm:num_requests_running"
WAITING = b"vllm:num_requests_waiting"
KV_USAGE = b"vllm:kv_cache_usage_perc"
KV_USAGE_OLD = b"vllm:gpu_cache_usage_perc"  # vLLM before the V1 engine
SUCCESS = b"vllm:request_success_total"
MAX_METRICS_BYTES = 4 * 1024 * 1024  # a real vLLM page is ~50-200 KB


@dataclass(frozen=True, slots=True)
class Series:
    """One series of a page: a metric name, and optionally one label pair (`key="value"`)
    a sample must carry, for engines that put several quantities under one name (Triton's
    `nv_trt_llm_request_metrics{request_type="waiting"}`)."""

    name: bytes
    label: bytes = b""

    def selects(self, labels: bytes) -> bool:
        """Whether a sample's label block (`{...}`, or empty) carries this series' pair. The
        pair must start the block or follow a comma, and ends with its closing quote, so
        neither `xrequest_type="waiting"` nor `request_type="waiting2"` is taken for it."""
        if not self.label:
            return True
        at = labels.find(self.label)
        while at > 0:
            if labels[at - 1] in b"{,":
                return True
            at = labels.find(self.label, at + 1)
        return False


@dataclass(frozen=True, slots=True)
class Ratio:
    """A KV usage the page gives as two gauges (used blocks, all blocks), not as a fraction."""

    used: Series
    total: Series


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """Which series of an engine's Prometheus page mean running, waiting and KV usage.
    `kv_usage` lists fallbacks in order (the first present wins); empty when the engine
    exports no KV gauge (its usage reads 0, so only the queue marks it saturated)."""

    prefix: bytes            # every wanted series starts with it: other lines are skipped
    running: Series
    waiting: Series
    kv_usage: tuple[Series | Ratio, ...] = ()
    success: Series | None = None  # a completed-requests counter, for the completion rate

    @property
    def series(self) -> tuple[Series, ...]:
        kv = [part for usage in self.kv_usage
              for part in ((usage.used, usage.total) if isinstance(usage, Ratio) else (usage,))]
        return (self.running, self.waiting, *kv, *((self.success,) if self.success else ()))


TRITON_REQUESTS = b"nv_trt_llm_request_metrics"
TRITON_KV = b"nv_trt_llm_kv_cache_block_metrics"

# Per engine, the names as the engine's own source defines them (checked against that
# source; the version or commit read is named):
# - vllm: the V1 engine's PrometheusStatLogger (vllm/v1/metrics/loggers.py on main, 2026).
#   Releases before the KV gauge's rename print vllm:gpu_cache_usage_perc (V0 always; V1
#   for a while as a deprecated alias): the fallback.
# - llamacpp: llama.cpp's server (tools/server/server-task.cpp, build 11434, the one the
#   real-engine tier runs) with --metrics: requests_processing = busy slots,
#   requests_deferred = requests waiting for a slot. That build exports no KV gauge and no
#   completed-requests counter; older builds (examples/server/server.cpp, 2024) exported
#   kv_cache_usage_ratio (used KV cells / n_ctx), read when present.
# - sglang: SchedulerMetricsCollector (python/sglang/srt/metrics/collector.py, 0.5.x,
#   commit 00ae9c1): token_usage is the KV pool's used fraction; num_requests_total
#   (TokenizerMetricsCollector) counts finished requests.
# - tgi: text-generation-inference v3.3.6 (backends/v3/src/backend.rs and queue.rs, the
#   names described in router/src/server.rs): the current batch size and the queue; no KV
#   gauge. Its exporter (metrics-exporter-prometheus 0.15.3) prints counters without a
#   `_total` suffix, and a series only once it has been set: a fresh server's page has
#   none of these until its first request.
# - trtllm: trtllm-serve's Prometheus page, `/prometheus/metrics` (mounted only with
#   `return_perf_metrics: true`; its `/metrics` is iteration statistics in JSON). The gauges
#   come from MetricsCollector.log_iteration_stats (tensorrt_llm/metrics/collector.py,
#   main at commit 050f80d, 2026): numActiveRequests, numQueuedRequests, usedNumBlocks /
#   maxNumBlocks; they need `enable_iter_perf_stats` and appear after the engine's first
#   iteration. Releases up to 1.1.0rc5 exported only per-request counters and histograms:
#   there the page lacks the gauges, every read fails, and such a pool should drop
#   `metrics_path` (heartbeats).
# - triton: Triton with the TensorRT-LLM backend (triton_backend/inflight_batcher_llm/src/
#   custom_metrics_reporter/custom_metrics_reporter.cc in TensorRT-LLM, commit 0d5352f;
#   tensorrtllm_backend's README prints the same page from v0.18.0 to v1.0.0, and without
#   the "fraction" KV gauge in v0.12.0-v0.15.0), as Triton's OpenAI frontend
#   serves it on the API's port (`/metrics`, python/openai in triton-inference-server/server).
#   Running is request_type="active" (the executor's numActiveRequests: every request it
#   has taken from its queue, scheduled this iteration or paused), not "scheduled" (this
#   iteration's batch only, which llm-d's router reads): with "active", running + waiting is
#   every request the pod holds, as for the other engines. KV usage is the "fraction" block
#   gauge, or used / max blocks on builds before it existed.
ENGINES: dict[str, EngineMetrics] = {
    "vllm": EngineMetrics(b"vllm:", Series(RUNNING), Series(WAITING),
                          (Series(KV_USAGE), Series(KV_USAGE_OLD)), Series(SUCCESS)),
    "llamacpp": EngineMetrics(b"llamacpp:", Series(b"llamacpp:requests_processing"),
                              Series(b"llamacpp:requests_deferred"),
                              (Series(b"llamacpp:kv_cache_usage_ratio"),)),
    "sglang": EngineMetrics(b"sglang:", Series(b"sglang:num_running_reqs"),
                            Series(b"sglang:num_queue_reqs"), (Series(b"sglang:token_usage"),),
                            Series(b"sglang:num_requests_total")),
    "tgi": EngineMetrics(b"tgi_", Series(b"tgi_batch_current_size"), Series(b"tgi_queue_size"),
                         success=Series(b"tgi_request_success")),
    "trtllm": EngineMetrics(b"trtllm_", Series(b"trtllm_num_requests_running"),
                            Series(b"trtllm_num_requests_waiting"),
                            (Series(b"trtllm_kv_cache_utilization"),),
                            Series(b"trtllm_request_success_total")),
    "triton": EngineMetrics(
        b"nv_trt_llm_", Series(TRITON_REQUESTS, b'request_type="active"'),
        Series(TRITON_REQUESTS, b'request_type="waiting"'),
        (Series(TRITON_KV, b'kv_cache_block_type="fraction"'),
         Ratio(Series(TRITON_KV, b'kv_cache_block_type="used"'),
               Series(TRITON_KV, b'kv_cache_block_type="max"')))),
}
# Per engine, the wanted series by name (a name can carry several label-selected series).
_BY_NAME: dict[str, dict[bytes, tuple[Series, ...]]] = {
    engine: {name: tuple(s for s in names.series if s.name == name)
             for name in {s.name for s in names.series}}
    for engine, names in ENGINES.items()
}
DEFAULT_ENGINE = "vllm"


class MetricsParseError(ValueError):
    """The page is not Prometheus text, or lacks the queue gauges."""


@dataclass(frozen=True, slots=True)
class PodLoad:
    running: float
    waiting: float
    kv_usage: float         # 0..1; 0 when the source does not know it (heartbeats)
    at: float               # unix time of the observation
    source: str             # "metrics" or "heartbeat"
    completed: float = 0.0  # the pod's request_success counter (metrics only)
    rate: float = 0.0       # requests completed per second since the previous scrape

    def view(self) -> dict[str, object]:
        return {"running": self.running, "waiting": self.waiting,
                "kv_usage": round(self.kv_usage, 4), "rate": round(self.rate, 2),
                "source": self.source, "at": round(self.at, 3)}


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """A pod's GPUs as its node reports them (Nomad's device statistics): the mean over the
    pod's devices, each a fraction 0..1."""

    utilization: float      # time the GPUs were busy
    memory: float           # device memory in use / device memory
    devices: int            # how many devices the pod holds
    at: float               # unix time of the reading

    def view(self) -> dict[str, object]:
        return {"utilization": round(self.utilization, 4), "memory": round(self.memory, 4),
                "devices": self.devices, "at": round(self.at, 3)}


def with_rate(previous: PodLoad | None, current: PodLoad) -> PodLoad:
    """`current` with its completion rate over the interval since `previous` (a counter
    that went down means the pod restarted: no rate for that interval)."""
    if previous is None or previous.source != "metrics" or current.at <= previous.at \
            or current.completed < previous.completed:
        return current
    rate = (current.completed - previous.completed) / (current.at - previous.at)
    return PodLoad(current.running, current.waiting, current.kv_usage, current.at,
                   current.source, current.completed, rate)


def parse_metrics(text: bytes, at: float, engine: str = DEFAULT_ENGINE) -> PodLoad:
    """Running, waiting and KV usage from an engine's metrics page (`ENGINES` names the
    series). A series with several samples (one per engine of a data-parallel server, one
    per model of a Triton server) is summed for the queues and averaged for the usage
    fraction. Raises MetricsParseError on anything unreadable, and for an unknown engine."""
    names = ENGINES.get(engine)
    if names is None:
        raise MetricsParseError(f"no metrics mapping for engine {engine!r}")
    wanted = _BY_NAME[engine]
    sums: dict[Series, float] = {}
    counts: dict[Series, int] = {}
    # Lines end with "\n" only: a label value may hold a raw "\r" (the format escapes only
    # backslash, quote and newline), which splitlines() would take for a line end.
    for line in text.split(b"\n"):
        if not line.startswith(names.prefix):
            continue  # comments, blank lines and other exporters' series
        name_end = len(line)
        for stop in (b"{", b" "):
            at_stop = line.find(stop)
            if 0 <= at_stop < name_end:
                name_end = at_stop
        candidates = wanted.get(line[:name_end])
        if candidates is None:
            continue
        rest = line[name_end:]
        labels = b""
        if rest.startswith(b"{"):
            close = rest.rfind(b"}")
            if close < 0:
                raise MetricsParseError(f"unclosed labels in {line[:120]!r}")
            labels, rest = rest[:close + 1], rest[close + 1:]
        chosen = [series for series in candidates if series.selects(labels)]
        if not chosen:
            continue  # the name's other label values (Triton's "max", "context", ...)
        fields = rest.split()
        if not fields:
            raise MetricsParseError(f"no value in {line[:120]!r}")
        try:
            value = float(fields[0])  # a trailing timestamp, if any, is ignored
        except ValueError:
            raise MetricsParseError(f"bad value in {line[:120]!r}") from None
        if value != value or value < 0:  # NaN or negative: not a load
            raise MetricsParseError(f"bad value in {line[:120]!r}")
        for series in chosen:
            sums[series] = sums.get(series, 0.0) + value
            counts[series] = counts.get(series, 0) + 1
    if names.running not in sums or names.waiting not in sums:
        raise MetricsParseError(f"no {_shown(names.running)} / {_shown(names.waiting)}")
    usage = 0.0
    for source in names.kv_usage:
        if isinstance(source, Ratio):
            if source.used in sums and sums.get(source.total, 0.0) > 0:
                usage = sums[source.used] / sums[source.total]
                break
        elif source in sums:
            usage = sums[source] / counts[source]
            break
    completed = sums.get(names.success, 0.0) if names.success else 0.0
    return PodLoad(sums[names.running], sums[names.waiting], min(1.0, usage), at, "metrics",
                   completed)


def _shown(series: Series) -> str:
    label = "{" + series.label.decode() + "}" if series.label else ""
    return series.name.decode() + label


def heartbeat_load(inflight: int, max_num_seqs: int, at: float) -> PodLoad:
    """A pod's load from the fleet's summed in-flight counts: requests past what the pod runs
    at once are queued there. Without a known limit, everything counts as running."""
    if max_num_seqs > 0:
        running = min(inflight, max_num_seqs)
        return PodLoad(float(running), float(inflight - running), 0.0, at, "heartbeat")
    return PodLoad(float(inflight), 0.0, 0.0, at, "heartbeat")
