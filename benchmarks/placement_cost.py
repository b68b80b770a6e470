"""What sticky-until-saturated costs the request path, in µs per call (medians of 7 runs).

    python benchmarks/placement_cost.py

Times `router.plan(route, now, body)` and its first candidate (what every request asks for)
against a copy of the plan's first step as it was before load-aware routing, on an
unsaturated pod (every request's path) and on a saturated one (the move decision; runs
only while a pod queues and this sidecar's move budget for it lasts), plus a new session's
pick (first touch only), the spill check every call makes and the spill decision a
parallel call makes while its pod is full, and parsing a vLLM-sized metrics page
(background only). No I/O.
"""

from __future__ import annotations

import json
import statistics
import timeit
from collections.abc import Callable, Iterator

from common import ROOT  # noqa: F401  (puts the project on sys.path)

from sidecar.config import load_settings
from sidecar.fleet.loads import take_reading
from sidecar.fleet.podload import PodLoad, parse_metrics
from sidecar.fleet.pools import Endpoint, Pool, PoolSet
from sidecar.routing.router import Router
from sidecar.routing.sessions import Route
from sidecar.routing.store import MemoryStore
from sidecar.tools.fakellm.engine import Engine

URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 5)]
BODY = b"x" * 8000  # a request of ~2,000 tokens: what a move weighs against the queue


def before(router: Router, route: Route, now: float) -> Iterator[tuple[Pool, Endpoint]]:
    """The plan's first step as it was: the session's own endpoint when usable."""
    start = router.pools.get(route.pool)
    if start is None:
        return
    first = route.endpoint
    if first is not None and first.pool == start.name and first.outlier.admit(now):
        yield start, first


def per_call_us(fn: Callable[[], object], number: int) -> float:
    runs = timeit.repeat(fn, number=number, repeat=7)
    return statistics.median(runs) / number * 1e6


def main() -> int:
    settings = load_settings({"SIDECAR_POOLS": json.dumps(
        {"p": {"model": "m", "endpoints": URLS, "metrics_path": "/metrics"}})})
    pools = PoolSet(settings)
    router = Router(settings, pools, MemoryStore(60))
    endpoints = pools.pools["p"].endpoints
    for i, e in enumerate(endpoints):
        load = PodLoad(4 + i, 0, 0.3, 0.0, "metrics", 0.0, 5.0)
        take_reading(e, load)
    route = router.propose("session-1", None)
    home = route.endpoint
    assert home is not None
    now = 1.0
    n = 200_000
    rows: list[tuple[str, float]] = []
    rows.append(("plan, first candidate, before this change",
                 per_call_us(lambda: next(before(router, route, now)), n)))
    after = per_call_us(lambda: next(router.plan(route, now, BODY).candidates(now)), n)
    rows.append(("plan, first candidate, unsaturated pod (every request)", after))
    hot = PodLoad(8, 6, 0.95, 0.0, "metrics", 0.0, 4.0)

    def saturated_call() -> object:
        take_reading(home, hot)   # re-arm the move budget: time the decision itself
        return next(router.plan(route, now, BODY).candidates(now))
    rows.append(("plan, first candidate, saturated pod (move decision)",
                 per_call_us(saturated_call, n // 4)))
    take_reading(home, PodLoad(4, 0, 0.3, 0.0, "metrics", 0.0, 5.0))
    rows.append(("spill check, a lone call (every request)",
                 per_call_us(lambda: router.spill(route, now), n)))
    route.inflight = 3
    rows.append(("spill check, a parallel call, its pod with room",
                 per_call_us(lambda: router.spill(route, now), n)))
    take_reading(home, hot)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 20_000}]}
                      ).encode()  # ~5 000 tokens: its first 4 KiB are hashed for the prefix
    rows.append(("spill decision, a parallel call, its pod full (runs while it queues)",
                 per_call_us(lambda: router.spill(route, now, body), n // 4)))
    route.inflight = 0
    rows.append(("new session pick (first touch only)",
                 per_call_us(lambda: pools.pools["p"].pick(b"session-2", 1.25), n // 4)))
    engine = Engine()
    page = (engine.metrics("m", 1000) * 40).encode()  # ~40 series groups, a real page's size
    rows.append((f"parse a {len(page) // 1024} KB metrics page (background)",
                 per_call_us(lambda: parse_metrics(page, 0.0), 2_000)))
    print("| what | µs per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")
    print(f"\nadded to every request: {after - rows[0][1]:.2f} µs (goal: < 3 µs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
