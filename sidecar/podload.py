"""A model pod's load: what its vLLM `/metrics` page says (parsed here, for only the series
routing needs) or, without one, the in-flight counts every sidecar heartbeats to Redis.

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
_WANTED = (RUNNING, WAITING, KV_USAGE, KV_USAGE_OLD, SUCCESS)
MAX_METRICS_BYTES = 4 * 1024 * 1024  # a real vLLM page is ~50-200 KB


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


def with_rate(previous: PodLoad | None, current: PodLoad) -> PodLoad:
    """`current` with its completion rate over the interval since `previous` (a counter
    that went down means the pod restarted: no rate for that interval)."""
    if previous is None or previous.source != "metrics" or current.at <= previous.at \
            or current.completed < previous.completed:
        return current
    rate = (current.completed - previous.completed) / (current.at - previous.at)
    return PodLoad(current.running, current.waiting, current.kv_usage, current.at,
                   current.source, current.completed, rate)


def parse_metrics(text: bytes, at: float) -> PodLoad:
    """Running, waiting and KV usage from a vLLM metrics page. A series with several label
    sets (one per engine of a data-parallel server) is summed for the queues and averaged
    for the usage fraction. Raises MetricsParseError on anything unreadable."""
    sums: dict[bytes, float] = {}
    counts: dict[bytes, int] = {}
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue  # comments, blank lines and other exporters' series
        name_end = len(line)
        for stop in (b"{", b" "):
            at_stop = line.find(stop)
            if 0 <= at_stop < name_end:
                name_end = at_stop
        name = line[:name_end]
        if name not in _WANTED:
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
    if RUNNING not in sums or WAITING not in sums:
        raise MetricsParseError("no vllm:num_requests_running / vllm:num_requests_waiting")
    usage_name = KV_USAGE if KV_USAGE in sums else KV_USAGE_OLD
    usage = sums[usage_name] / counts[usage_name] if usage_name in sums else 0.0
    return PodLoad(sums[RUNNING], sums[WAITING], min(1.0, usage), at, "metrics",
                   sums.get(SUCCESS, 0.0))


def heartbeat_load(inflight: int, max_num_seqs: int, at: float) -> PodLoad:
    """A pod's load from the fleet's summed in-flight counts: requests past what the pod runs
    at once are queued there. Without a known limit, everything counts as running."""
    if max_num_seqs > 0:
        running = min(inflight, max_num_seqs)
        return PodLoad(float(running), float(inflight - running), 0.0, at, "heartbeat")
    return PodLoad(float(inflight), 0.0, 0.0, at, "heartbeat")
