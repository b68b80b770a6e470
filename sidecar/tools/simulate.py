"""`llm-sidecar simulate`: replay a request trace through the scaling policies with modelled
cold starts, and compare them with each other and with the clairvoyant schedule.

The model (defaults; every one is a flag):
- a replica serves `slots` (8) requests at once; a request holds one slot for
  ContextTokens / 4000 + GeneratedTokens / 40 seconds;
- a replica asked for is ready after the pool's cold start (600 s); scaling down is
  immediate;
- every policy starts in steady state with the replicas the trace's first cold-start window
  needs at 70 % slot utilization, and none scales down before a full cold-start window;
- a request finds no warm capacity when every slot of every ready replica is busy when it
  arrives; it then queues at the replica with the shortest queue (first come, first
  served there; a queued request stays at its replica, as in an engine's scheduler) and
  its wait is its queueing delay; the goal counts those arriving after the first
  cold-start window, since before it ends no decision can have produced a ready replica;
- replica-minutes count every replica asked for, ready or still starting (it holds a GPU).
The policies are the same objects the scaler runs (policy.py), with the scaler's
SIDECAR_SCALER_PRIOR_CV / _SAMPLES / _FLOOR read from the environment; the simulator feeds
them, once per evaluation interval, the work offered (the concurrency the arrivals need if
served at once, as the scaler's token rate measures it), the worst replica's queue
(saturation, as the scaler reads it from the monitor's pod view) and the replicas' GPU
utilization (each replica's busy share of its slots).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.scaler.config import load_prior
from sidecar.scaler.policy import (
    Bounds,
    Observation,
    PodSample,
    PredictivePolicy,
    TargetValuePolicy,
    pressure,
)
from sidecar.tools.traces import read_trace, shape

__all__ = ["Call", "Model", "Result", "calls", "clairvoyant", "compare", "read_trace", "run",
           "shape", "table"]


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
    requests_after_first_window: int
    p95_queue_delay_s: float
    max_queue_delay_s: float
    mean_utilization: float
    peak_utilization: float
    replica_minutes: float
    scale_actions: int
    peak_replicas: int = 0
    timeline: list[tuple[float, float, int, int]] = field(default_factory=list, repr=False)

    @property
    def late_share(self) -> float:
        """Share of requests after the first cold-start window without warm capacity."""
        return self.no_warm_capacity_after_first_window / max(self.requests_after_first_window,
                                                              1)

    def row(self) -> dict[str, Any]:
        return {"policy": self.policy, "requests": self.requests,
                "no_warm_capacity_requests": self.no_warm_capacity_requests,
                "no_warm_capacity_share": round(self.no_warm_capacity_requests
                                                / max(self.requests, 1), 5),
                "no_warm_capacity_after_first_window":
                    self.no_warm_capacity_after_first_window,
                "no_warm_capacity_share_after_first_window": round(self.late_share, 5),
                "p95_queue_delay_s": round(self.p95_queue_delay_s, 3),
                "max_queue_delay_s": round(self.max_queue_delay_s, 3),
                "mean_utilization": round(self.mean_utilization, 4),
                "peak_utilization": round(self.peak_utilization, 4),
                "replica_minutes": round(self.replica_minutes, 1),
                "peak_replicas": self.peak_replicas,
                "scale_actions": self.scale_actions}


PolicyFactory = Callable[[Bounds], Any]


class _Pod:
    """One replica: `slots` requests at once, and its own first-come-first-served queue (a
    request queued at a pod stays there, as in an engine's scheduler)."""

    __slots__ = ("busy", "slots", "waiting")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0
        self.waiting: deque[Call] = deque()


class _Fleet:
    """A pool's replicas, each with its slots and its queue. An arrival goes to the replica
    with the most free slots, or — every slot busy — joins the shortest queue (the sidecar's
    least-loaded choice); a replica's queue is served only by its own slots. Replicas come
    and go at any time: a new one starts empty, a removed one finishes what it runs and
    hands its queue to the others."""

    def __init__(self, replicas: int, slots: int) -> None:
        self.slots = slots
        self.pods = [_Pod(slots) for _ in range(replicas)]
        self.ends: list[tuple[float, int, _Pod]] = []   # (end time, order, pod) heap
        self._order = 0
        self.busy = 0                                    # slots busy, draining pods included
        self.queued = 0                                  # calls waiting at any pod
        self.waits: list[float] = []

    def _start(self, pod: _Pod, call: Call, at: float) -> None:
        pod.busy += 1
        self.busy += 1
        self._order += 1
        heapq.heappush(self.ends, (at + call.hold_s, self._order, pod))

    def advance(self, until: float) -> None:
        while self.ends and self.ends[0][0] <= until:
            freed_at, _, pod = heapq.heappop(self.ends)
            pod.busy -= 1
            self.busy -= 1
            if pod.waiting:
                call = pod.waiting.popleft()
                self.queued -= 1
                self.waits.append(freed_at - call.arrival)
                self._start(pod, call, freed_at)

    def _roomiest(self) -> _Pod | None:
        best = None
        for pod in self.pods:
            if pod.busy < pod.slots and (best is None or pod.busy < best.busy):
                best = pod
        return best

    def has_room(self, at: float) -> bool:
        self.advance(at)
        return self._roomiest() is not None

    def arrive(self, call: Call) -> bool:
        """False when every slot of every replica is busy (no warm capacity): the call
        waits at the replica with the shortest queue."""
        self.advance(call.arrival)
        pod = self._roomiest()
        if pod is not None:
            self.waits.append(0.0)
            self._start(pod, call, call.arrival)
            return True
        self._enqueue(call)
        return False

    def _enqueue(self, call: Call) -> None:
        if not self.pods:  # no replica at all: it waits for the first one
            self.pods.append(_Pod(0))
        min(self.pods, key=lambda p: len(p.waiting)).waiting.append(call)
        self.queued += 1

    def resize(self, replicas: int, at: float) -> None:
        """Add empty replicas, or remove the least loaded ones (their queues move on)."""
        self.advance(at)
        gone = [p for p in self.pods if not p.slots]  # the placeholder of an empty fleet
        self.pods = [p for p in self.pods if p.slots]
        if replicas >= len(self.pods):
            self.pods.extend(_Pod(self.slots) for _ in range(replicas - len(self.pods)))
        else:
            self.pods.sort(key=lambda p: p.busy + len(p.waiting))
            gone += self.pods[:len(self.pods) - replicas]
            self.pods = self.pods[len(self.pods) - replicas:]
        moved = sorted((c for p in gone for c in p.waiting), key=lambda c: c.arrival)
        for pod in gone:
            pod.waiting.clear()
        self.queued -= len(moved)
        for call in moved:
            self._enqueue(call)
        for pod in self.pods:  # a replica with free slots serves its queue at once
            while pod.waiting and pod.busy < pod.slots:
                call = pod.waiting.popleft()
                self.queued -= 1
                self.waits.append(at - call.arrival)
                self._start(pod, call, at)

    def samples(self) -> list[PodSample]:
        """Each replica as the monitor would see it; its GPU busy as its slots are."""
        return [PodSample(p.busy, len(p.waiting), 0.0, min(1.0, p.busy / p.slots))
                for p in self.pods if p.slots]

    def drain(self) -> None:
        while self.ends:
            self.advance(self.ends[0][0])


class PoolSim:
    """One pool in the simulator: its fleet, the replicas starting, the policy deciding its
    count, the offered work it saw since the last decision, and what it cost."""

    def __init__(self, name: str, policy: Any, model: Model, initial: int) -> None:
        self.name = name
        self.policy = policy
        self.model = model
        self.ready = initial
        self.starting: deque[float] = deque()     # ready-at times of replicas starting
        self.fleet = _Fleet(initial, model.slots)
        self.offered: list[float] = []            # end times if served at once (heap)
        self.tick_peak = 0.0
        self.tick_offered: list[float] = []
        self.tick_busy: list[float] = []
        self.tick_queued: list[float] = []
        self.tick_gpu: list[float] = []
        self.no_warm = 0
        self.no_warm_late = 0
        self.late = 0
        self.served = 0
        self.util_sum = 0.0
        self.util_peak = 0.0
        self.samples = 0
        self.replica_seconds = 0.0
        self.peak_replicas = initial
        self.actions = 0
        self.timeline: list[tuple[float, float, int, int]] = []

    def offer(self, call: Call) -> None:
        """Count `call` as work offered to this pool (whoever ends up serving it)."""
        while self.offered and self.offered[0] <= call.arrival:
            heapq.heappop(self.offered)
        heapq.heappush(self.offered, call.arrival + call.hold_s)
        self.tick_peak = max(self.tick_peak, len(self.offered) / self.model.slots)

    def serve(self, call: Call) -> None:
        self.served += 1
        late = call.arrival >= self.model.cold_start_s
        self.late += late
        if not self.fleet.arrive(call):
            self.no_warm += 1
            self.no_warm_late += late

    def second(self, end: float) -> None:
        while self.starting and self.starting[0] <= end:
            self.ready += 1
            self.fleet.resize(self.ready, self.starting.popleft())
        self.fleet.advance(end)
        while self.offered and self.offered[0] <= end:
            heapq.heappop(self.offered)
        capacity = self.ready * self.model.slots
        busy = self.fleet.busy
        utilization = min(1.0, busy / capacity) if capacity else 1.0
        self.util_sum += utilization
        self.util_peak = max(self.util_peak, utilization)
        self.samples += 1
        self.replica_seconds += self.ready + len(self.starting)
        self.tick_offered.append(len(self.offered) / self.model.slots)
        self.tick_busy.append(utilization)
        # The saturation signal as the scaler reads it from the monitor's view: the worst
        # replica's queue (only a queued call makes one); GPUs busy as their slots are.
        self.tick_queued.append(pressure(self.fleet.samples()).queued or 0.0
                                if self.fleet.queued else 0.0)
        active = sum(p.busy for p in self.fleet.pods)
        self.tick_gpu.append(min(1.0, active / capacity) if capacity else 0.0)

    def decide(self, end: float) -> None:
        current = self.ready + len(self.starting)
        n = len(self.tick_offered)
        peak = max(self.tick_peak, *self.tick_offered) if n else self.tick_peak
        obs = Observation(now=end, demand_peak=peak, demand_mean=sum(self.tick_offered) / n,
                          utilization=sum(self.tick_busy) / n, current=current,
                          ready=self.ready, queued=sum(self.tick_queued) / n,
                          gpu_utilization=sum(self.tick_gpu) / n)
        count = self.policy.decide(obs).count
        if count != current:
            self.actions += 1
            if count > current:
                self.starting.extend([end + self.model.cold_start_s] * (count - current))
            else:
                drop = current - count
                while drop and self.starting:
                    self.starting.pop()  # cancel the newest starts first
                    drop -= 1
                self.ready -= drop
                self.fleet.resize(self.ready, end)
        self.peak_replicas = max(self.peak_replicas, count)
        self.timeline.append((end, peak, self.ready, self.ready + len(self.starting)))
        self.tick_peak = 0.0
        self.tick_offered.clear()
        self.tick_busy.clear()
        self.tick_queued.clear()
        self.tick_gpu.clear()

    def result(self, requests: int | None = None) -> Result:
        self.fleet.drain()
        waits = sorted(self.fleet.waits)
        p95 = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0
        return Result(policy=self.policy.name, requests=self.served if requests is None
                      else requests, no_warm_capacity_requests=self.no_warm,
                      no_warm_capacity_after_first_window=self.no_warm_late,
                      requests_after_first_window=self.late, p95_queue_delay_s=p95,
                      max_queue_delay_s=waits[-1] if waits else 0.0,
                      mean_utilization=self.util_sum / max(self.samples, 1),
                      peak_utilization=self.util_peak,
                      replica_minutes=self.replica_seconds / 60.0, scale_actions=self.actions,
                      peak_replicas=self.peak_replicas, timeline=self.timeline)


def run(work: Sequence[Call], make_policy: PolicyFactory, model: Model) -> Result:
    """Replay `work` against one policy; state is sampled every second and the policy is
    asked every `interval_s`."""
    bounds = Bounds(model.minimum, model.maximum, model.cold_start_s)
    pool = PoolSim("pool", make_policy(bounds), model, initial_replicas(work, model))
    horizon = (work[-1].arrival if work else 0.0) + 1.0
    interval = max(1, round(model.interval_s))
    index = 0
    second = 0
    while second < horizon:
        end = second + 1.0
        while index < len(work) and work[index].arrival < end:
            pool.offer(work[index])
            pool.serve(work[index])
            index += 1
        pool.second(end)
        second += 1
        if second % interval == 0:
            pool.decide(end)
    return pool.result()


def clairvoyant(work: Sequence[Call], model: Model, horizon: float | None = None) -> float:
    """Replica-minutes of the cheapest schedule that, knowing the future, always has
    ceil(concurrency / slots) replicas ready (at least `minimum`, and at least one), so
    nothing waits. Replica k is needed wherever that count is ≥ k; through a gap shorter
    than the cold start it is kept (a gap costs its length), otherwise released and asked
    for again one cold start ahead (a gap costs one cold start); a replica first needed
    within one cold start of t=0 was asked for before the window opened and counts from 0.
    """
    if horizon is None:
        horizon = (work[-1].arrival if work else 0.0) + 1.0
    floor = max(1, model.minimum)
    events = sorted([(c.arrival, 1) for c in work] + [(c.arrival + c.hold_s, -1) for c in work])
    # A slot freed at t serves a call arriving at t: ends sort first at equal times.
    concurrency = 0
    level = floor
    since: dict[int, float] = {}                  # level → start of the current need
    last_end: dict[int, float] = {}               # level → end of its previous need
    cost = horizon * floor
    cold = model.cold_start_s

    def begin(k: int, at: float) -> None:
        nonlocal cost
        if k in last_end:
            cost += min(at - last_end[k], cold)
        else:
            cost += min(at, cold)
        since[k] = at

    def finish(k: int, at: float) -> None:
        nonlocal cost
        cost += at - since.pop(k)
        last_end[k] = at

    for at, delta in events:
        if at >= horizon:
            break
        concurrency += delta
        need = max(floor, math.ceil(concurrency / model.slots))
        while need > level:
            level += 1
            begin(level, at)
        while need < level:
            finish(level, at)
            level -= 1
    for k in list(since):
        finish(k, horizon)
    return cost / 60.0


def baseline(bounds: Bounds) -> TargetValuePolicy:
    return TargetValuePolicy(bounds, target=0.7, window_s=60.0, cooldown_s=300.0)


def predictive(bounds: Bounds) -> PredictivePolicy:
    # The scaler's own prior settings, so a replay runs what the scaler would.
    cv, samples, floor = load_prior()
    return PredictivePolicy(bounds, prior_cv=cv, prior_samples=samples, prior_floor=floor)


POLICIES: dict[str, PolicyFactory] = {"baseline": baseline, "predictive": predictive}


def compare(work: Sequence[Call], model: Model) -> list[Result]:
    return [run(work, factory, model) for factory in POLICIES.values()]


def table(results: Sequence[Result], clairvoyant_minutes: float | None = None) -> str:
    lines = ["| policy | requests | no warm capacity | share | after the first cold-start "
             "window | share after | p95 queue delay (s) | max queue delay (s) | mean util | "
             "peak util | peak replicas | replica-minutes | × clairvoyant | scale actions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if clairvoyant_minutes is not None:
        lines.append(f"| clairvoyant | | 0 | 0.00% | 0 | 0.00% | 0.00 | 0.0 | | | | "
                     f"{clairvoyant_minutes:.0f} | 1.00 | |")
    for r in results:
        row = r.row()
        ratio = (f"{r.replica_minutes / clairvoyant_minutes:.2f}" if clairvoyant_minutes
                 else "")
        lines.append(f"| {r.policy} | {r.requests} | {r.no_warm_capacity_requests} | "
                     f"{row['no_warm_capacity_share']:.2%} | "
                     f"{r.no_warm_capacity_after_first_window} | {r.late_share:.2%} | "
                     f"{r.p95_queue_delay_s:.2f} | {r.max_queue_delay_s:.1f} | "
                     f"{r.mean_utilization:.2f} | {r.peak_utilization:.2f} | {r.peak_replicas} | "
                     f"{r.replica_minutes:.0f} | {ratio} | {r.scale_actions} |")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), sharex=True,
                             squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        hours = [t / 3600 for t, _, _, _ in result.timeline]
        ax.plot(hours, [d for _, d, _, _ in result.timeline], lw=0.8, color="tab:gray",
                label="work offered (replicas' worth, peak per interval)")
        ax.step(hours, [r for _, _, r, _ in result.timeline], where="post", color="tab:green",
                label="ready replicas")
        ax.step(hours, [q for _, _, _, q in result.timeline], where="post", color="tab:blue",
                ls="--", label="requested replicas")
        ax.set_title(f"{result.policy}: {result.late_share:.2%} of requests after the first "
                     f"cold-start window without warm capacity, "
                     f"{result.replica_minutes:.0f} replica-minutes", fontsize=10)
        ax.set_ylabel("replicas")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("hours")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is in the dev extra
        raise SystemExit("--plot needs matplotlib: pip install 'llm-sidecar[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
