"""Scaling and load-level decisions: plain values in, a decision out.

The same objects run in `llm-sidecar scaler` (fed from the traffic sidecars report) and in
`llm-sidecar simulate` (fed from a trace), so what is simulated is exactly what runs. They
keep a little history between ticks but do no I/O and read no clock of their own.

Demand is measured in replica units: how many replicas' worth of work is in flight (the
simulator: requests in flight or queued ÷ slots per replica; the scaler: tokens per second
÷ what one replica serves).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Observation:
    """One pool at one tick."""

    now: float                    # seconds, any epoch (monotonic in the simulator)
    demand_peak: float | None     # highest demand seen since the last tick (replica units)
    demand_mean: float | None     # mean demand since the last tick (replica units)
    utilization: float | None     # busy share of ready capacity since the last tick (0..1+)
    current: int                  # replicas asked for (includes those still starting)
    ready: int                    # replicas serving


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


class PredictivePolicy:
    """Ours: capacity must be asked for a cold start ahead, so provision for the demand the
    next cold-start window can bring, not for the last minute's average.

    - Peak, not mean: the highest demand of the last `lookback` (one cold-start window by
      default), because a request that finds every slot busy waits.
    - Trend: the growth of mean demand over the last `trend` window, projected across the
      cold start, is added on top.
    - Headroom: `burst_margin` above that peak (over-provisioning at peak, as designed).
    - Up at once; down only after demand stayed below the current count for
      `scale_down_after` (a cold-start window by default), never below what the peak needs.
    - No metrics: hold capacity.
    """

    name = "predictive"

    def __init__(self, bounds: Bounds, burst_margin: float = 0.10,
                 lookback_s: float | None = None, trend_s: float | None = None,
                 scale_down_after_s: float | None = None, started_at: float = 0.0) -> None:
        self.bounds = bounds
        self.burst_margin = burst_margin
        horizon = bounds.cold_start_s
        self.lookback_s = lookback_s if lookback_s is not None else horizon
        self.trend_s = trend_s if trend_s is not None else 2 * horizon
        self.scale_down_after_s = (scale_down_after_s if scale_down_after_s is not None
                                   else horizon)
        self.started_at = started_at
        self._history: deque[tuple[float, float, float]] = deque()  # now, peak, mean
        self._low_since: float | None = None

    def forecast(self, now: float) -> float:
        """Demand (replica units) to be ready for over the next cold-start window."""
        peak = max(p for t, p, _ in self._history if t > now - self.lookback_s)
        return peak * (1 + self.burst_margin) + self._growth(now)

    def _growth(self, now: float) -> float:
        points = [(t, m) for t, _, m in self._history if t > now - self.trend_s]
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

    def decide(self, obs: Observation) -> Decision:
        if obs.demand_peak is None or obs.demand_mean is None:
            return Decision(obs.current, "no metrics: holding capacity")
        self._history.append((obs.now, obs.demand_peak, obs.demand_mean))
        horizon = max(self.lookback_s, self.trend_s)
        while self._history and self._history[0][0] <= obs.now - horizon:
            self._history.popleft()
        forecast = self.forecast(obs.now)
        desired = self.bounds.clamp(math.ceil(forecast - 1e-9))
        reason = f"forecast {forecast:.2f} replicas over the next {self.bounds.cold_start_s:.0f} s"
        if desired > obs.current:
            self._low_since = None
            return Decision(desired, reason)
        if desired == obs.current:
            self._low_since = None
            return Decision(obs.current, reason)
        if obs.now - self.started_at < self.bounds.cold_start_s:
            return Decision(obs.current, "no scale-down before one cold-start window")
        if self._low_since is None:
            self._low_since = obs.now
        if obs.now - self._low_since < self.scale_down_after_s:
            return Decision(obs.current, reason + "; waiting for sustained low demand")
        self._low_since = None
        return Decision(desired, reason + "; sustained low demand")


LEVELS = ("low", "medium", "high")


class LoadLevelPolicy:
    """low / medium / high from fleet utilization, with hysteresis: a level is entered above
    its `up` threshold and left below a lower `down` one, and only after the condition held
    for `dwell` ticks in a row, so noise around a threshold does not flap routing tables."""

    UP: ClassVar[dict[str, float]] = {"low": 0.60, "medium": 0.80}     # leave upward above
    DOWN: ClassVar[dict[str, float]] = {"medium": 0.45, "high": 0.65}  # leave downward below

    def __init__(self, level: str = "low", dwell: int = 2) -> None:
        self.level = level
        self.dwell = dwell
        self._streak = 0
        self._direction = 0

    def decide(self, utilization: float | None) -> str:
        if utilization is None:
            self._streak = 0
            return self.level
        index = LEVELS.index(self.level)
        direction = 0
        if self.level in self.UP and utilization >= self.UP[self.level]:
            direction = 1
        elif self.level in self.DOWN and utilization <= self.DOWN[self.level]:
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
