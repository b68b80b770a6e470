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
class EngineMetrics:
    """Which series of an engine's Prometheus page mean running, waiting and KV usage.
    `kv_usage` lists fallbacks in order (the first present wins); empty when the engine
    exports no KV gauge (its usage reads 0, so only the queue marks it saturated)."""

    prefix: bytes            # every wanted series starts with it: other lines are skipped
    running: bytes
    waiting: bytes
    kv_usage: tuple[bytes, ...] = ()
    success: bytes | None = None  # a completed-requests counter, for the completion rate

    @property
    def wanted(self) -> frozenset[bytes]:
        return frozenset({self.running, self.waiting, *self.kv_usage,
                          *((self.success,) if self.success else ())})


# Per engine, the names as the engine's own source defines them:
# - vllm: V1 engine (vllm/v1/metrics/loggers.py), and V0's KV gauge name as a fallback.
# - llamacpp: llama.cpp's server (tools/server/server-task.cpp, build 11434) with
#   --metrics: requests_processing = busy slots, requests_deferred = requests waiting for
#   a slot; it exports no KV-usage gauge and no completed-requests counter.
# - sglang: SchedulerMetricsCollector (python/sglang/srt/metrics/collector.py, 2025):
#   token_usage is the KV pool's used fraction.
# - tgi: text-generation-inference 3.x's router (docs/source/reference/metrics.md):
#   the current batch size and the queue; no KV gauge.
# trtllm-serve has no Prometheus page of these series: its pools use heartbeats (no
# metrics_path), which config.py enforces.
ENGINES: dict[str, EngineMetrics | None] = {
    "vllm": EngineMetrics(b"vllm:", RUNNING, WAITING, (KV_USAGE, KV_USAGE_OLD), SUCCESS),
    "llamacpp": EngineMetrics(b"llamacpp:", b"llamacpp:requests_processing",
                              b"llamacpp:requests_deferred"),
    "sglang": EngineMetrics(b"sglang:", b"sglang:num_running_reqs", b"sglang:num_queue_reqs",
                            (b"sglang:token_usage",)),
    "tgi": EngineMetrics(b"tgi_", b"tgi_batch_current_size", b"tgi_queue_size"),
    "trtllm": None,
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
    series). A series with several label sets (one per engine of a data-parallel server) is
    summed for the queues and averaged for the usage fraction. Raises MetricsParseError on
    anything unreadable, and for an engine without a mapping."""
    names = ENGINES.get(engine)
    if names is None:
        raise MetricsParseError(f"no metrics mapping for engine {engine!r}")
    wanted = names.wanted
    sums: dict[bytes, float] = {}
    counts: dict[bytes, int] = {}
    for line in text.splitlines():
        if not line.startswith(names.prefix):
            continue  # comments, blank lines and other exporters' series
        name_end = len(line)
        for stop in (b"{", b" "):
            at_stop = line.find(stop)
            if 0 <= at_stop < name_end:
                name_end = at_stop
        name = line[:name_end]
        if name not in wanted:
            continue
        rest = line[name_end:]
        if rest.startswith(b"{"):
            close = rest.rfind(b"}")
            if close < 0:
                raise MetricsParseError(f"unclosed labels in {line[:120]!r}")
            rest = rest[close + 1:]
        fields = rest.split()
        if not fields:
            raise MetricsParseError(f"no value in {line[:120]!r}")
        try:
            value = float(fields[0])  # a trailing timestamp, if any, is ignored
        except ValueError:
            raise MetricsParseError(f"bad value in {line[:120]!r}") from None
        if value != value or value < 0:  # NaN or negative: not a load
            raise MetricsParseError(f"bad value in {line[:120]!r}")
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    if names.running not in sums or names.waiting not in sums:
        raise MetricsParseError(f"no {names.running.decode()} / {names.waiting.decode()}")
    usage = 0.0
    for usage_name in names.kv_usage:
        if usage_name in sums:
            usage = sums[usage_name] / counts[usage_name]
            break
    completed = sums.get(names.success, 0.0) if names.success else 0.0
    return PodLoad(sums[names.running], sums[names.waiting], min(1.0, usage), at, "metrics",
                   completed)


def heartbeat_load(inflight: int, max_num_seqs: int, at: float) -> PodLoad:
    """A pod's load from the fleet's summed in-flight counts: requests past what the pod runs
    at once are queued there. Without a known limit, everything counts as running."""
    if max_num_seqs > 0:
        running = min(inflight, max_num_seqs)
        return PodLoad(float(running), float(inflight - running), 0.0, at, "heartbeat")
    return PodLoad(float(inflight), 0.0, 0.0, at, "heartbeat")
