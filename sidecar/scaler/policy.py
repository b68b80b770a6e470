"""Scaling and load-level decisions: plain values in, a decision out.

The same objects run in `llm-sidecar scaler` (fed from the traffic sidecars report) and in
`llm-sidecar simulate` (fed from a trace), so what is simulated is exactly what runs. They
keep a little history between ticks but do no I/O and read no clock of their own.

Demand is measured in replica units: how many replicas' worth of work is offered (the
simulator: requests that would be in flight if served at once ÷ slots per replica; the
scaler: tokens per second ÷ what one replica serves). The pods' queue is a separate
saturation signal, never counted as demand.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Observation:
    """One pool at one tick."""

    now: float                    # seconds, any epoch (monotonic in the simulator)
    demand_peak: float | None     # highest demand seen since the last tick (replica units)
    demand_mean: float | None     # mean demand since the last tick (replica units)
    utilization: float | None     # busy share of ready capacity since the last tick (0..1+)
    current: int                  # replicas asked for (includes those still starting)
    ready: int                    # replicas serving
    # Requests waiting per request running at the worst ready pod (saturation; None:
    # unknown). Without a pod view: the pool's sums, waiting ÷ running (a mean).
    queued: float | None = None
    # Mean GPU utilization over the ready pods with a reading (0..1; None: no reading).
    gpu_utilization: float | None = None
    # Ready pods that queue with idle GPUs (`pressure`): not counted in `queued`.
    stalled: int = 0


# A pod whose KV cache is this full admits no new sequence without preempting one: it counts
# as saturated (at the threshold's queue) even while its own queue is still empty.
KV_FULL = 0.95
# Below this GPU utilization a pod is not computing: its queue is not waiting for compute.
GPU_IDLE = 0.2
# Waiting per running at which a pod counts as saturated (the policies' default threshold).
SATURATION = 0.05


@dataclass(frozen=True, slots=True)
class PodSample:
    """One ready pod at one tick (the fleet monitor's view of it)."""

    running: float
    waiting: float
    kv_usage: float = 0.0                  # 0..1 (0: not known)
    gpu_utilization: float | None = None   # 0..1 (None: not read)


@dataclass(frozen=True, slots=True)
class Pressure:
    """What a pool's ready pods say about its saturation (`pressure`)."""

    queued: float | None          # the worst counted pod's waiting ÷ running (None: no pod)
    gpu_utilization: float | None  # mean over the ready pods with a reading
    stalled: int                  # pods queueing with idle GPUs, left out of `queued`


def pod_queue(pod: PodSample, saturation: float = SATURATION) -> float:
    """A pod's queue per running request, with a full KV cache counting as the threshold."""
    queued = pod.waiting / max(pod.running, 1.0)
    return max(queued, saturation) if pod.kv_usage >= KV_FULL else queued


def pressure(pods: Sequence[PodSample], saturation: float = SATURATION) -> Pressure:
    """The pool's saturation signal from its ready pods: the worst pod, not the mean.

    - Users queue at a pod, not at a pool: with sticky sessions one pod can hold a queue
      while the others idle, and the mean (waiting ÷ running over the pool) dilutes it
      below any threshold as the pool grows. The worst pod is what someone waits behind.
    - KV usage near full (`KV_FULL`) counts as saturated even with an empty queue, but KV
      usage alone is never the signal: a prefill-heavy pod (long contexts, short answers)
      saturates its compute with the cache half empty, and only its queue shows it.
    - GPU utilization (the share of time a kernel ran, NVML's reading) reads near 1 as soon
      as any batch runs, so it cannot tell a saturated pod from a merely busy one; high
      utilization with a queue is the normal picture of saturation and adds nothing to the
      queue. What it can tell is a pod that is not computing: a pod whose own GPUs are idle
      (< `GPU_IDLE`) while requests wait there is stuck (a hung engine, a model reloading,
      a pod-local fault), and more replicas would not drain its queue — the monitor's
      probes eject it. Such a pod is counted in `stalled` and left out of `queued`. Its
      own reading is used, not the pool's mean: one saturated pod among idle ones has a
      low mean, and that is exactly the case the worst-pod rule exists for.
    """
    counted: list[float] = []
    stalled = 0
    readings = [p.gpu_utilization for p in pods if p.gpu_utilization is not None]
    for pod in pods:
        queued = pod_queue(pod, saturation)
        if queued >= saturation and pod.gpu_utilization is not None \
                and pod.gpu_utilization < GPU_IDLE:
            stalled += 1
            continue
        counted.append(queued)
    return Pressure(max(counted) if counted else (0.0 if pods else None),
                    sum(readings) / len(readings) if readings else None, stalled)


@dataclass(frozen=True, slots=True)
class Bounds:
    minimum: int
    maximum: int
    cold_start_s: float

    def clamp(self, count: int) -> int:
        return max(self.minimum, min(self.maximum, count))


@dataclass(frozen=True, slots=True)
class Decision:
    count: int
    reason: str

    def changes(self, current: int) -> bool:
        return self.count != current


class TargetValuePolicy:
    """The reactive baseline, as Nomad Autoscaler's target-value strategy scales: every
    evaluation, new count = ceil(count × metric / target) with the metric averaged over the
    query window, and nothing more for `cooldown_s` after a change."""

    name = "baseline"

    def __init__(self, bounds: Bounds, target: float = 0.7, window_s: float = 60.0,
                 cooldown_s: float = 300.0, started_at: float = 0.0) -> None:
        self.bounds = bounds
        self.target = target
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.started_at = started_at
        self._samples: deque[tuple[float, float]] = deque()
        self._last_change = -math.inf

    def decide(self, obs: Observation) -> Decision:
        if obs.utilization is not None:
            self._samples.append((obs.now, obs.utilization))
        while self._samples and self._samples[0][0] <= obs.now - self.window_s:
            self._samples.popleft()
        if not self._samples:
            return Decision(obs.current, "no metrics: holding")
        if obs.now - self._last_change < self.cooldown_s:
            return Decision(obs.current, "cooldown")
        metric = sum(u for _, u in self._samples) / len(self._samples)
        count = self.bounds.clamp(math.ceil(obs.current * metric / self.target))
        if count < obs.current and obs.now - self.started_at < self.bounds.cold_start_s:
            count = obs.current  # no scale-down before one cold-start window was observed
        if count != obs.current:
            self._last_change = obs.now
        return Decision(count, f"utilization {metric:.2f} vs target {self.target:.2f}")


# Bursts are measured against a level only once it has a minute of history: a fleet that
# just started sees its first intervals' peaks towering over a level still filling up.
WARMUP_S = 60.0

# The prior's defaults (SIDECAR_SCALER_PRIOR_CV, SIDECAR_SCALER_PRIOR_SAMPLES; docs/design.md).
# Off by default: tuned on synthetic traffic, on the real traces of docs/design.md it bought
# little on bursty traffic and cost smooth traffic more than its goal allows.
PRIOR_CV = 0.0
PRIOR_SAMPLES = 12.0
# The young pool's floor (SIDECAR_SCALER_PRIOR_FLOOR, replicas; docs/design.md "A young fleet's
# margin"): the largest floor that kept synthetic smooth hours within 1.15× the clairvoyant
# replica-minutes (10 reaches 1.18×); it keeps every bursty synthetic trace within its goal.
PRIOR_FLOOR = 9.0


def burst_bound(bursts: list[float], quantile: float, level: float, cv: float,
                samples: float) -> float:
    """The `quantile` of the next burst (replica units) when bursts are exponential with
    an unknown mean, and that mean has a conjugate (gamma) prior worth `samples`
    observations of mean `cv` × `level`: the posterior predictive is a Lomax,
    P(B > x) = (1 + x/β)^−α with α = samples + n and β = samples·cv·level + Σ bursts.
    Few observations leave α small and the tail heavy, so the bound is wide; it narrows
    to the exponential quantile, mean × ln(1/(1−q)), as observations accumulate."""
    alpha = samples + len(bursts)
    beta = samples * cv * max(0.0, level) + sum(bursts)
    if alpha <= 0 or beta <= 0:
        return 0.0
    # (1−q)^(−1/α) − 1, computed without overflow or cancellation; q = 1 has no bound.
    tail = max(1.0 - quantile, 1e-9)
    return beta * math.expm1(-math.log(tail) / alpha)


def trust(seen_s: float, window_s: float) -> float:
    """How far the learned quantile can be believed: the share of one window (a cold
    start: what the next decision must cover) that the burst history spans."""
    return min(1.0, max(0.0, seen_s / window_s)) if window_s > 0 else 1.0


def margin(learned: float, bound: float, trust: float) -> float:
    """What to hold above the level: the learned quantile, lifted towards the bound by the
    share of it the history cannot yet vouch for; never below the learned quantile."""
    return learned + (1.0 - trust) * max(0.0, bound - learned)


class PredictivePolicy:
    """Ours: capacity must be asked for a cold start ahead, so provision for what the next
    cold-start window can bring, learned from what the last ones brought.

    - Demand is the work offered (what the arrivals need), never the queue they built: a
      queue is the effect of missing capacity, and counting it again inflates the peak.
    - Level: the mean offered work of the last `level_s`.
    - Trend: the slope of that mean over the last `trend_s`, projected across the cold
      start, is added to the level (growth only; a falling trend is handled by holding).
    - Bursts: each interval's peak minus the level it rose from is its burst; the
      `quantile` of those bursts over the last `history_s` is added to the projected
      level, so the margin is what bursts of this traffic needed, not one held maximum
      (nor a ratio to the level, which explodes when the level is low).
    - Prior (`prior_cv` > 0; off by default): a short history cannot vouch for a high
      quantile (the first minutes may be quiet; a few samples hold no 0.995 quantile), so
      while the burst history spans less than a cold start the margin is lifted towards
      an upper bound that knows how little it has seen: the larger of the biggest burst
      seen (the first minute's included, measured against the level so far) and the
      quantile of a model of exponential bursts whose mean has a prior of `prior_cv` ×
      level worth `prior_samples` intervals (`burst_bound`; wide with few samples,
      narrowing as they accumulate). The lift is weighted by the share of the cold start
      not yet spanned, and the margin is never below the learned quantile.
    - Young pool's floor (`prior_floor`, replicas; 0: off): a history shorter than a
      cold start has not seen what the traffic can do, and the asks made then are the
      only ones ready when the first cold start ends. So the forecast is at least the
      floor until the history spans half a cold start (the asks that are ready for the
      first window's unseen traffic, and that the kept targets hold through the next
      half), then the floor shrinks linearly to 0 as the history spans a whole one and
      the learned margin takes over — erring on the side of warm capacity. It is a floor
      on the whole forecast, not a margin on top: a pool whose level and margin already
      ask for as much pays nothing for it (smooth traffic at a high level); a pool whose
      level is a fraction of a replica and whose bursts are many times that (bursty
      traffic) holds it. Like every target, it is clamped to the pool's bounds.
    - `headroom`: a share on top of all that (0 by default; the sweep's other knob).
    - Saturation: a queue at the worst ready pod (`pressure`: its waiting per running
      request, a full KV cache counting as the threshold, a pod with idle GPUs left out)
      that lasts `saturation_ticks` intervals says the offered work is under-measured (a
      saturated pod's token rate is flat at its capacity): the level is raised by the
      queued share (at most doubled) while it lasts, and it never enters the level, trend
      or burst history.
    - Up at once; down only to the highest target of the last `keep_s` (a cold start):
      a replica released in a gap shorter than that costs a full cold start to bring back.
    - No metrics: hold capacity.
    """

    name = "predictive"

    def __init__(self, bounds: Bounds, quantile: float = 0.995, headroom: float = 0.0,
                 level_s: float = 300.0, trend_s: float | None = None,
                 history_s: float = 3600.0, keep_s: float | None = None,
                 saturation: float = SATURATION, saturation_ticks: int = 3,
                 prior_cv: float = PRIOR_CV, prior_samples: float = PRIOR_SAMPLES,
                 prior_floor: float = PRIOR_FLOOR, started_at: float = 0.0) -> None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile={quantile!r}: expected a number in (0, 1]")
        if not prior_cv >= 0:
            raise ValueError(f"prior_cv={prior_cv!r}: expected a number >= 0")
        if not prior_samples > 0:
            raise ValueError(f"prior_samples={prior_samples!r}: expected a number > 0")
        if not 0 <= prior_floor < math.inf:
            raise ValueError(f"prior_floor={prior_floor!r}: expected a finite number >= 0")
        self.bounds = bounds
        self.quantile = quantile
        self.headroom = headroom
        self.prior_cv = prior_cv
        self.prior_samples = prior_samples
        self.prior_floor = prior_floor
        horizon = bounds.cold_start_s
        self.level_s = level_s
        # Three cold starts: a shorter window reads noise as trend on smooth traffic.
        self.trend_s = trend_s if trend_s is not None else 3 * horizon
        self.history_s = history_s
        self.keep_s = keep_s if keep_s is not None else horizon
        self.saturation = saturation
        self.saturation_ticks = saturation_ticks
        self.started_at = started_at
        self._means: deque[tuple[float, float]] = deque()    # now, mean offered
        self._bursts: deque[tuple[float, float]] = deque()   # now, peak − level
        # Bursts of the first minute, against a level still filling up: too rough for the
        # learned quantile, but evidence for the bound a young history is held to.
        self._early: deque[tuple[float, float]] = deque()
        self._targets: deque[tuple[float, int]] = deque()    # now, count wanted then
        self._saturated = 0

    def state(self) -> dict[str, Any]:
        """What the next decision needs of the past, as plain JSON values (the scaler keeps
        it in Redis so a scaler that takes over continues where the last one left off)."""
        return {"started_at": self.started_at, "saturated": self._saturated,
                "means": [[t, round(m, 6)] for t, m in self._means],
                "bursts": [[t, round(b, 6)] for t, b in self._bursts],
                "early": [[t, round(b, 6)] for t, b in self._early],
                "targets": [[t, n] for t, n in self._targets]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; a value not in that form raises ValueError/TypeError/
        KeyError and leaves this policy as it was."""
        means = deque((float(t), float(m)) for t, m in state["means"])
        bursts = deque((float(t), float(b)) for t, b in state["bursts"])
        targets = deque((float(t), int(n)) for t, n in state["targets"])
        started_at, saturated = float(state["started_at"]), int(state["saturated"])
        # A state from before the prior has no early bursts: its history is what it holds.
        early = deque((float(t), float(b)) for t, b in state.get("early", []))
        self._means, self._bursts, self._targets = means, bursts, targets
        self._early = early
        self.started_at, self._saturated = started_at, saturated

    def level(self, now: float) -> float:
        window = [m for t, m in self._means if t > now - self.level_s]
        return sum(window) / len(window) if window else 0.0

    def learned(self) -> float:
        """A high quantile of the bursts seen (replica units; 0 with none)."""
        bursts = sorted(b for _, b in self._bursts)
        if not bursts:
            return 0.0
        return bursts[min(len(bursts) - 1, math.ceil(self.quantile * len(bursts)) - 1)]

    def burst(self, now: float) -> float:
        """The burst (replica units) to hold above the level: the learned quantile, lifted
        towards `burst_bound` by the share of one cold start the history does not span."""
        learned = self.learned()
        seen = [b for _, b in self._early] + [b for _, b in self._bursts]
        if self.prior_cv == 0 or (not seen and self.level(now) == 0):
            return learned
        bound = max([burst_bound(seen, self.quantile, self.level(now), self.prior_cv,
                                 self.prior_samples), *seen])
        # The history's span is that of the level it was measured against (kept for three
        # cold starts, and carried by the state): the bursts' own deques are trimmed.
        first = self._means[0][0] if self._means else now
        return margin(learned, bound, trust(now - first, self.bounds.cold_start_s))

    def growth(self, now: float) -> float:
        points = [(t, m) for t, m in self._means if t > now - self.trend_s]
        # A trend needs history to stand on: a fleet that just started (or a scaler that
        # just took over) sees demand "grow" from nothing, which is no trend at all.
        if len(points) < 3 or points[-1][0] - points[0][0] < self.trend_s / 2:
            return 0.0
        n = len(points)
        mean_t = sum(t for t, _ in points) / n
        mean_m = sum(m for _, m in points) / n
        var = sum((t - mean_t) ** 2 for t, _ in points)
        if var == 0:
            return 0.0
        slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / var
        return max(0.0, slope) * self.bounds.cold_start_s

    def floor(self, now: float) -> float:
        """The young pool's floor (replicas): `prior_floor` until the history spans half a
        cold start, then shrinking linearly to 0 as it spans a whole one."""
        if not self.prior_floor:
            return 0.0
        first = self._means[0][0] if self._means else now
        unseen = 1.0 - trust(now - first, self.bounds.cold_start_s)
        return self.prior_floor * min(1.0, 2.0 * unseen)

    def forecast(self, now: float, queued: float | None = None) -> float:
        """Replicas to be ready for over the next cold-start window."""
        level = self.level(now)
        if self._saturated >= self.saturation_ticks and queued:
            # At most double: a deep queue says "more", not how much more.
            level *= 1 + min(queued, 1.0)
        learned = (level + self.growth(now) + self.burst(now)) * (1 + self.headroom)
        return max(learned, self.floor(now))

    def decide(self, obs: Observation) -> Decision:
        if obs.demand_peak is None or obs.demand_mean is None:
            return Decision(obs.current, "no metrics: holding capacity")
        now = obs.now
        self._means.append((now, obs.demand_mean))
        while self._means and self._means[0][0] <= now - max(self.level_s, self.trend_s,
                                                             self.bounds.cold_start_s):
            self._means.popleft()
        level = self.level(now)
        # A burst needs a level to stand on: not from the first minute of history.
        if level > 0 and now - self._means[0][0] >= WARMUP_S:
            self._bursts.append((now, max(0.0, obs.demand_peak - level)))
        elif level > 0:
            self._early.append((now, max(0.0, obs.demand_peak - level)))
        while self._early and self._early[0][0] <= now - self.bounds.cold_start_s:
            self._early.popleft()  # past one cold start the bound carries no weight
        while self._bursts and self._bursts[0][0] <= now - self.history_s:
            self._bursts.popleft()
        queued = obs.queued or 0.0
        self._saturated = self._saturated + 1 if queued >= self.saturation else 0
        forecast = self.forecast(now, queued)
        target = self.bounds.clamp(math.ceil(forecast - 1e-9))
        self._targets.append((now, target))
        while self._targets and self._targets[0][0] <= now - self.keep_s:
            self._targets.popleft()
        kept = max(t for _, t in self._targets)
        saturated = ", saturated" if self._saturated >= self.saturation_ticks else ""
        if self.floor(now) >= forecast > 0:
            saturated += f", young pool's floor {self.floor(now):.2f}"
        if obs.stalled:
            saturated += f", {obs.stalled} pod(s) queueing with idle GPUs not counted"
        reason = (f"forecast {forecast:.2f} replicas over the next "
                  f"{self.bounds.cold_start_s:.0f} s (level {level:.2f}, burst "
                  f"+{self.burst(now):.2f}{saturated})")
        if kept >= obs.current:
            return Decision(kept, reason)
        if now - self.started_at < self.bounds.cold_start_s:
            return Decision(obs.current, "no scale-down before one cold-start window")
        return Decision(kept, reason + f"; highest target of the last {self.keep_s:.0f} s")


LEVELS = ("low", "medium", "high")


class LoadLevelPolicy:
    """low / medium / high from fleet utilization, with hysteresis: a level is entered above
    its `up` threshold and left below a lower `down` one, and only after the condition held
    for `dwell` ticks in a row, so noise around a threshold does not flap routing tables.
    A fleet whose pods queue (`queued` ≥ `SATURATED` waiting per running request) counts as
    above the threshold whatever its utilization says: sustained saturation raises the
    level."""

    SATURATED: ClassVar[float] = SATURATION

    UP: ClassVar[dict[str, float]] = {"low": 0.60, "medium": 0.80}     # leave upward above
    DOWN: ClassVar[dict[str, float]] = {"medium": 0.45, "high": 0.65}  # leave downward below

    def __init__(self, level: str = "low", dwell: int = 2) -> None:
        self.level = level
        self.dwell = dwell
        self._streak = 0
        self._direction = 0

    def state(self) -> dict[str, Any]:
        return {"level": self.level, "streak": self._streak, "direction": self._direction}

    def restore(self, state: dict[str, Any]) -> None:
        level, streak, direction = state["level"], int(state["streak"]), int(state["direction"])
        if level not in LEVELS:
            raise ValueError(f"unknown load level {level!r}")
        self.level, self._streak, self._direction = level, streak, direction

    def decide(self, utilization: float | None, queued: float | None = None) -> str:
        saturated = queued is not None and queued >= self.SATURATED
        if utilization is None and not saturated:
            self._streak = 0
            return self.level
        index = LEVELS.index(self.level)
        direction = 0
        if self.level in self.UP and (saturated or utilization is None
                                      or utilization >= self.UP[self.level]):
            direction = 1
        elif (self.level in self.DOWN and not saturated and utilization is not None
              and utilization <= self.DOWN[self.level]):
            direction = -1
        if direction == 0 or direction != self._direction:
            self._direction = direction
            self._streak = 1 if direction else 0
        else:
            self._streak += 1
        if direction and self._streak >= self.dwell:
            self.level = LEVELS[index + direction]
            self._streak = 0
            self._direction = 0
        return self.level
