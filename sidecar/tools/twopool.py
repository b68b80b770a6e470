"""`simulate --pools`: a small and a large pool at once, as the sidecars run them — the load
level (from fleet utilization and saturation) picks the routing table, each request's
selector picks its pool, and a request for the large pool that finds no warm capacity
there is served by the small one when it has a free slot (the large → small fallback).

Each pool is scaled by its own policy object (the scaler's); the large pool's requests hold
their slot `large_slowdown` times longer and its cold start is 900 s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.scaler.policy import Bounds, LoadLevelPolicy
from sidecar.tools.simulate import (
    Call,
    Model,
    PolicyFactory,
    PoolSim,
    Result,
    clairvoyant,
    initial_replicas,
)

# The sidecar job's SIDECAR_ROUTES: selector slots per pool at each load level.
ROUTES: dict[str, dict[str, int]] = {"low": {"small": 16},
                                     "medium": {"small": 12, "large": 4},
                                     "high": {"small": 8, "large": 8}}


@dataclass
class PoolsResult:
    policy: str
    requests: int
    waited: int                        # no warm capacity anywhere (they queued)
    waited_after_first_window: int     # after each pool's first cold-start window
    served_by_smaller_model: int       # routed to large, served by small
    p95_queue_delay_s: float
    pools: dict[str, Result]
    clairvoyant_minutes: dict[str, float]
    levels: dict[str, float] = field(default_factory=dict)  # seconds spent at each level

    def row(self) -> dict[str, Any]:
        return {"policy": self.policy, "requests": self.requests, "waited": self.waited,
                "waited_after_first_window": self.waited_after_first_window,
                "served_by_smaller_model": self.served_by_smaller_model,
                "p95_queue_delay_s": round(self.p95_queue_delay_s, 3),
                "replica_minutes": {n: round(r.replica_minutes, 1)
                                    for n, r in self.pools.items()},
                "clairvoyant_replica_minutes": {n: round(m, 1) for n, m
                                                in self.clairvoyant_minutes.items()},
                "seconds_at_level": {k: round(v) for k, v in self.levels.items()}}


def tables(routes: Mapping[str, Mapping[str, int]]) -> dict[str, tuple[str, ...]]:
    """Expand slot counts into 16-entry tables, slots given out in the order listed."""
    out = {}
    for level, slots in routes.items():
        table = tuple(pool for pool, n in slots.items() for _ in range(n))
        if len(table) != 16 or set(table) - {"small", "large"}:
            raise ValueError(f"--routes: level {level!r} must give 16 slots to small/large, "
                             f"got {dict(slots)}")
        out[level] = table
    return out


def run_pools(work: Sequence[Call], make_policy: PolicyFactory, model: Model, *,
              large_cold_start_s: float = 900.0, large_slowdown: float = 2.0,
              routes: Mapping[str, Mapping[str, int]] = ROUTES, seed: int = 1,
              large_minimum: int = 1) -> PoolsResult:
    table = tables(routes)
    rng = random.Random(seed)
    selectors = [rng.randrange(16) for _ in work]
    large_model = replace(model, cold_start_s=large_cold_start_s, minimum=large_minimum)
    big = [Call(c.arrival, c.hold_s * large_slowdown) for c in work]
    levels = LoadLevelPolicy()
    routed_low = [c for c, s in zip(work, selectors, strict=True)
                  if table[levels.level][s] == "small"]
    small = PoolSim("small", make_policy(Bounds(model.minimum, model.maximum,
                                                model.cold_start_s)),
                    model, initial_replicas(routed_low, model))
    large = PoolSim("large", make_policy(Bounds(large_model.minimum, large_model.maximum,
                                                large_cold_start_s)),
                    large_model, large_model.minimum)
    routed: dict[str, list[Call]] = {"small": [], "large": []}
    fallbacks = 0
    seconds_at: dict[str, float] = {}
    horizon = (work[-1].arrival if work else 0.0) + 1.0
    interval = max(1, round(model.interval_s))
    tick_util: list[float] = []
    tick_queued: list[float] = []
    index = 0
    second = 0
    while second < horizon:
        end = second + 1.0
        while index < len(work) and work[index].arrival < end:
            pool = table[levels.level][selectors[index]]
            if pool == "large":
                call = big[index]
                large.offer(call)
                routed["large"].append(call)
                if not large.fleet.has_room(call.arrival) and \
                        small.fleet.has_room(call.arrival):
                    fallbacks += 1
                    small.offer(work[index])
                    small.serve(work[index])
                else:
                    large.serve(call)
            else:
                small.offer(work[index])
                routed["small"].append(work[index])
                small.serve(work[index])
            index += 1
        for p in (small, large):
            p.second(end)
        ready = small.ready + large.ready
        offered = small.tick_offered[-1] + large.tick_offered[-1]
        tick_util.append(offered / ready if ready else 1.0)
        # The worst replica of either pool, as the scaler reads the monitor's views.
        tick_queued.append(max(small.tick_queued[-1], large.tick_queued[-1]))
        seconds_at[levels.level] = seconds_at.get(levels.level, 0.0) + 1.0
        second += 1
        if second % interval == 0:
            small.decide(end)
            large.decide(end)
            levels.decide(sum(tick_util) / len(tick_util), sum(tick_queued) / len(tick_queued))
            tick_util.clear()
            tick_queued.clear()
    results = {"small": small.result(), "large": large.result()}
    waits = sorted(small.fleet.waits + large.fleet.waits)
    p95 = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)] if waits else 0.0
    cv = {"small": clairvoyant(routed["small"], model, horizon),
          "large": clairvoyant(routed["large"], large_model, horizon)}
    return PoolsResult(policy=small.policy.name, requests=len(work),
                       waited=small.no_warm + large.no_warm,
                       waited_after_first_window=small.no_warm_late + large.no_warm_late,
                       served_by_smaller_model=fallbacks, p95_queue_delay_s=p95,
                       pools=results, clairvoyant_minutes=cv, levels=seconds_at)


def table(results: Sequence[PoolsResult]) -> str:
    lines = ["| policy | requests | waited | waited after the first window | served by the "
             "smaller model | p95 queue delay (s) | small replica-minutes (clairvoyant) | "
             "large replica-minutes (clairvoyant) | time at low / medium / high |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = sum(r.levels.values()) or 1.0
        share = " / ".join(f"{r.levels.get(k, 0.0) / total:.0%}"
                           for k in ("low", "medium", "high"))
        lines.append(f"| {r.policy} | {r.requests} | {r.waited} | "
                     f"{r.waited_after_first_window} | {r.served_by_smaller_model} | "
                     f"{r.p95_queue_delay_s:.2f} | "
                     f"{r.pools['small'].replica_minutes:.0f} "
                     f"({r.clairvoyant_minutes['small']:.0f}) | "
                     f"{r.pools['large'].replica_minutes:.0f} "
                     f"({r.clairvoyant_minutes['large']:.0f}) | {share} |")
    return "\n".join(lines)
