"""`llm-sidecar simulate`: replay a request trace through the scaling policies with modelled
cold starts, and compare them.

The model (defaults; every one is a flag):
- a replica serves `slots` (8) requests at once; a request holds one slot for
  ContextTokens / 4000 + GeneratedTokens / 40 seconds;
- a replica asked for is ready after the pool's cold start (600 s); scaling down is
  immediate;
- both policies start in steady state with the replicas the trace's first cold-start window
  needs at 70 % slot utilization, and neither scales down before a full cold-start window;
- a request finds no warm capacity when every slot of every ready replica is busy when it
  arrives; it then queues (first come, first served) and its wait is its queueing delay;
- replica-minutes count every replica asked for, ready or still starting (it holds a GPU).
The policies are the same objects the scaler runs (policy.py); the simulator only feeds them
observations once per evaluation interval.
"""

from __future__ import annotations

import csv
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sidecar.scaler.policy import (
    Bounds,
    Decision,
    Observation,
    PredictivePolicy,
    TargetValuePolicy,
)


@dataclass(frozen=True, slots=True)
class Model:
    slots: int = 8
    context_tokens_per_s: float = 4000.0
    generated_tokens_per_s: float = 40.0
    cold_start_s: float = 600.0
    initial_utilization: float = 0.7
    interval_s: float = 10.0        # how often the policies are evaluated
    minimum: int = 1
    maximum: int = 1000


@dataclass(frozen=True, slots=True)
class Call:
    arrival: float  # seconds from the start of the trace
    hold_s: float


def read_trace(path: str) -> list[tuple[float, int, int]]:
    """(seconds since the first request, context tokens, generated tokens), in order."""
    rows: list[tuple[datetime, int, int]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            stamp = row["TIMESTAMP"].strip()
            # The Azure trace has 7 fractional digits; datetime takes at most 6.
            if "." in stamp:
                head, frac = stamp.split(".", 1)
                stamp = f"{head}.{frac[:6]}"
            rows.append((datetime.fromisoformat(stamp), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [((t - start).total_seconds(), c, g) for t, c, g in rows]


def shape(trace: Sequence[tuple[float, int, int]], *, speed: float = 1.0, repeat: int = 1,
          diurnal: bool = False, seed: int = 0) -> list[tuple[float, int, int]]:
    """Compress or stretch time, repeat the trace back to back, and optionally thin it to a
    day-shaped load (a smooth daily curve between 30 % and 100 % of the trace's rate, with a
    morning ramp and an afternoon peak). Deterministic for a seed."""
    span = max(t for t, _, _ in trace) + 1.0
    rng = random.Random(seed)
    out = []
    copies = 24 if diurnal and repeat == 1 else repeat
    total = span * copies
    for copy in range(copies):
        for t, c, g in trace:
            at = copy * span + t
            if diurnal:
                phase = at / total  # 0..1 over the day
                keep = 0.65 - 0.35 * math.cos(2 * math.pi * (phase - 0.125))
                if rng.random() > keep:
                    continue
            out.append((at / speed, c, g))
    return out


def calls(trace: Sequence[tuple[float, int, int]], model: Model) -> list[Call]:
    return [Call(t, c / model.context_tokens_per_s + g / model.generated_tokens_per_s)
            for t, c, g in trace]


def initial_replicas(work: Sequence[Call], model: Model) -> int:
    """What the first cold-start window needs at the initial slot utilization."""
    window = [c for c in work if c.arrival < model.cold_start_s]
    concurrency = sum(c.hold_s for c in window) / model.cold_start_s
    return max(model.minimum,
               math.ceil(concurrency / (model.slots * model.initial_utilization)))


@dataclass
class Result:
    policy: str
    requests: int
    no_warm_capacity_requests: int
    # Those after the first cold-start window: before it ends no policy's decision can have
    # produced a ready replica, so the initial fleet alone decides the first window.
    no_warm_capacity_after_first_window: int
    p95_queue_delay_s: float
    max_queue_delay_s: float
    mean_utilization: float
    peak_utilization: float
    replica_minutes: float
    scale_actions: int
    timeline: list[tuple[float, float, int, int]] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        return {"policy": self.policy, "requests": self.requests,
                "no_warm_capacity_requests": self.no_warm_capacity_requests,
                "no_warm_capacity_share": round(self.no_warm_capacity_requests
                                                / max(self.requests, 1), 5),
                "no_warm_capacity_after_first_window":
                    self.no_warm_capacity_after_first_window,
                "p95_queue_delay_s": round(self.p95_queue_delay_s, 3),
                "max_queue_delay_s": round(self.max_queue_delay_s, 3),
                "mean_utilization": round(self.mean_utilization, 4),
                "peak_utilization": round(self.peak_utilization, 4),
                "replica_minutes": round(self.replica_minutes, 1),
                "scale_actions": self.scale_actions}


PolicyFactory = Callable[[Bounds], Any]


class _Fleet:
    """First come, first served over `capacity` slots; capacity may change at any time and
    calls already waiting take new slots as soon as they exist."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_service: list[float] = []           # end times (heap)
        self.waiting: deque[Call] = deque()
        self.waits: list[float] = []

    def advance(self, until: float) -> None:
        while self.in_service and self.in_service[0] <= until:
            freed_at = heapq.heappop(self.in_service)
            self._start_waiting(freed_at)

    def _start_waiting(self, at: float) -> None:
        while self.waiting and len(self.in_service) < self.capacity:
            call = self.waiting.popleft()
            self.waits.append(at - call.arrival)
            heapq.heappush(self.in_service, at + call.hold_s)

    def arrive(self, call: Call) -> bool:
        """False when every slot is busy (no warm capacity): the call waits."""
        self.advance(call.arrival)
        if len(self.in_service) < self.capacity and not self.waiting:
            self.waits.append(0.0)
            heapq.heappush(self.in_service, call.arrival + call.hold_s)
            return True
        self.waiting.append(call)
        return False

    def resize(self, capacity: int, at: float) -> None:
        self.advance(at)
        self.capacity = capacity
        self._start_waiting(at)


def run(work: Sequence[Call], make_policy: PolicyFactory, model: Model) -> Result:
    """Replay `work` against one policy; state is sampled every second and the policy is
    asked every `interval_s`."""
    bounds = Bounds(model.minimum, model.maximum, model.cold_start_s)
    policy = make_policy(bounds)
    ready = initial_replicas(work, model)
    starting: deque[float] = deque()    # ready-at times of replicas still starting
    fleet = _Fleet(ready * model.slots)
    no_warm = 0
    no_warm_late = 0
    util_sum = 0.0
    util_peak = 0.0
    samples = 0
    replica_seconds = 0.0
    actions = 0
    tick_demand: list[float] = []
    tick_busy: list[float] = []
    timeline: list[tuple[float, float, int, int]] = []
    horizon = (work[-1].arrival if work else 0.0) + 1.0
    interval = max(1, round(model.interval_s))
    index = 0
    second = 0
    while second < horizon:
        end = second + 1.0
        while index < len(work) and work[index].arrival < end:
            if not fleet.arrive(work[index]):
                no_warm += 1
                no_warm_late += work[index].arrival >= model.cold_start_s
            index += 1
        while starting and starting[0] <= end:
            ready += 1
            fleet.resize(ready * model.slots, starting.popleft())
        fleet.advance(end)
        capacity = ready * model.slots
        busy = len(fleet.in_service)
        utilization = min(1.0, busy / capacity) if capacity else 1.0
        util_sum += utilization
        util_peak = max(util_peak, utilization)
        samples += 1
        replica_seconds += ready + len(starting)
        tick_demand.append((busy + len(fleet.waiting)) / model.slots)
        tick_busy.append(utilization)
        second += 1
        if second % interval:
            continue
        current = ready + len(starting)
        obs = Observation(now=end, demand_peak=max(tick_demand),
                          demand_mean=sum(tick_demand) / len(tick_demand),
                          utilization=sum(tick_busy) / len(tick_busy),
                          current=current, ready=ready)
        decision: Decision = policy.decide(obs)
        if decision.count != current:
            actions += 1
            if decision.count > current:
                starting.extend([end + model.cold_start_s] * (decision.count - current))
            else:
                drop = current - decision.count
                for _ in range(min(drop, len(starting))):
                    starting.pop()  # cancel the newest starts first
                    drop -= 1
                ready -= drop
                fleet.resize(ready * model.slots, end)
        timeline.append((end, obs.demand_peak or 0.0, ready, ready + len(starting)))
        tick_demand.clear()
        tick_busy.clear()
    while fleet.waiting or fleet.in_service:  # let every call finish
        if not fleet.in_service and fleet.capacity == 0:
            break
        fleet.advance(fleet.in_service[0])
    waits = sorted(fleet.waits)
    p95 = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0
    return Result(policy=policy.name, requests=len(work), no_warm_capacity_requests=no_warm,
                  no_warm_capacity_after_first_window=no_warm_late, p95_queue_delay_s=p95,
                  max_queue_delay_s=waits[-1] if waits else 0.0,
                  mean_utilization=util_sum / max(samples, 1), peak_utilization=util_peak,
                  replica_minutes=replica_seconds / 60.0, scale_actions=actions,
                  timeline=timeline)


def baseline(bounds: Bounds) -> TargetValuePolicy:
    return TargetValuePolicy(bounds, target=0.7, window_s=60.0, cooldown_s=300.0)


def predictive(bounds: Bounds) -> PredictivePolicy:
    return PredictivePolicy(bounds)


POLICIES: dict[str, PolicyFactory] = {"baseline": baseline, "predictive": predictive}


def compare(work: Sequence[Call], model: Model) -> list[Result]:
    return [run(work, factory, model) for factory in POLICIES.values()]


def table(results: Sequence[Result]) -> str:
    lines = ["| policy | requests | no warm capacity | share | after the first cold-start "
             "window | p95 queue delay (s) | max queue delay (s) | mean util | peak util | "
             "replica-minutes | scale actions |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        row = r.row()
        lines.append(f"| {r.policy} | {r.requests} | {r.no_warm_capacity_requests} | "
                     f"{row['no_warm_capacity_share']:.2%} | "
                     f"{r.no_warm_capacity_after_first_window} | {r.p95_queue_delay_s:.2f} | "
                     f"{r.max_queue_delay_s:.1f} | {r.mean_utilization:.2f} | "
                     f"{r.peak_utilization:.2f} | {r.replica_minutes:.0f} | {r.scale_actions} |")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is in the dev extra
        raise SystemExit("--plot needs matplotlib: pip install 'llm-sidecar[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), sharex=True,
                             squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        hours = [t / 3600 for t, _, _, _ in result.timeline]
        ax.plot(hours, [d for _, d, _, _ in result.timeline], lw=0.8, color="tab:gray",
                label="demand (replicas' worth in flight, peak per interval)")
        ax.step(hours, [r for _, _, r, _ in result.timeline], where="post", color="tab:green",
                label="ready replicas")
        ax.step(hours, [q for _, _, _, q in result.timeline], where="post", color="tab:blue",
                ls="--", label="requested replicas")
        ax.set_title(f"{result.policy}: {result.no_warm_capacity_requests} of "
                     f"{result.requests} requests without warm capacity, "
                     f"{result.replica_minutes:.0f} replica-minutes", fontsize=10)
        ax.set_ylabel("replicas")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("hours")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
