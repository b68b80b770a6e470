"""Active health probes and load scrapes: each endpoint of a pool with a `health_path` is
probed, and one with a `metrics_path` has its metrics read (under its engine's names), at
once and then every `health_interval_s` (with jitter, so pods do not probe in lockstep).
Never on the request path.

A warming endpoint's first healthy probe is its cold start event; a ready endpoint that fails
probes in a row is ejected, and an ejected one that answers is restored. A pod that answers
it is still loading its model is warming, not failing.

Where a fleet monitor publishes a pod view (podview.py), a sidecar follows it instead:
`follow` stops probing the endpoints a fresh view covers, and `apply_view` moves them by the
same methods a probe result does. States move only through each endpoint's outlier
detector (outlier.py), loads only through loads.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

import aiohttp

from sidecar.fleet.bodyread import read_capped
from sidecar.fleet.loads import scrape_failed, scraped
from sidecar.fleet.podload import (
    DEFAULT_ENGINE,
    MAX_METRICS_BYTES,
    MetricsParseError,
    parse_metrics,
)
from sidecar.fleet.podview import Action, ViewState, action_for
from sidecar.fleet.pools import Endpoint, EndpointState, PoolSet
from sidecar.supervise import cancel_and_wait
from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar.health")

PROBE_TIMEOUT_S = 2.0
JITTER = 0.2
# llama.cpp's server answers every path with 503 {"error":{"message":"Loading model",…}}
# while it loads its weights (tools/server/server-http.cpp); vLLM does not listen until then.
LOADING_MARK = b"loading model"
LOADING_BODY_BYTES = 4096


class Probe(Enum):
    HEALTHY = "healthy"
    LOADING = "loading"   # up, but its model is still loading: warming
    DOWN = "down"


def classify_probe(status: int, body: bytes) -> Probe:
    """A health answer, judged: 200 is healthy; a 503 that says the model is loading is a
    pod in its cold start; anything else is a failed probe."""
    if status == 200:
        return Probe.HEALTHY
    if status == 503 and LOADING_MARK in body[:LOADING_BODY_BYTES].lower():
        return Probe.LOADING
    return Probe.DOWN


class ColdStart:
    __slots__ = ("at", "duration_s", "endpoint", "pool")

    def __init__(self, endpoint: str, pool: str, duration_s: float) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.duration_s = duration_s
        self.at = time.time()

    def view(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "pool": self.pool,
                "duration_s": round(self.duration_s, 3), "at": self.at}


# Called after each probe round of an endpoint, with the state it had before the round.
ProbeObserver = Callable[[Endpoint, EndpointState], None]


class HealthProber:
    """Probes every endpoint of the pools that have a health or metrics path, except those
    `covered` by a fresh pod view. `keep_alive` (the monitor) reuses one connection per
    pod; a sidecar's own probes close theirs (it probes only while the monitor is away)."""

    def __init__(self, pools: PoolSet, telemetry: Telemetry | None = None,
                 keep_alive: bool = False, observer: ProbeObserver | None = None) -> None:
        self.pools = pools
        self.keep_alive = keep_alive
        self.observer = observer
        self.covered: set[tuple[str, str]] = set()  # (pool, URL): state from the pod view
        self.telemetry = telemetry if telemetry is not None else Telemetry({})
        self.cold_starts: deque[ColdStart] = deque(maxlen=100)
        self.probes = 0
        self.loading_probes = 0    # answers "still loading its model" (warming pods)
        self.scrapes = 0
        self.scrape_failures = 0   # unreachable, non-200, too large or unparsable pages
        self.parse_failures = 0    # of which: answered, but not vLLM's metrics text
        self._http: aiohttp.ClientSession | None = None
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
            # Kept alive (the monitor): one connection per pod at most, as each endpoint's
            # task sends its health and metrics requests one after the other.
            connector=aiohttp.TCPConnector(limit=0 if self.keep_alive else 64,
                                           force_close=not self.keep_alive))
        self.sync()

    def sync(self) -> None:
        """Probe exactly the endpoints of pools that have a health path (after each reload)."""
        wanted: dict[tuple[str, str], Endpoint] = {}
        for pool in self.pools.pools.values():
            if pool.config.health_path or pool.config.metrics_path:
                for endpoint in pool.endpoints:
                    if (pool.name, endpoint.url) not in self.covered:
                        wanted[(pool.name, endpoint.url)] = endpoint
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
        loop = asyncio.get_running_loop()
        for key, endpoint in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = loop.create_task(self._probe_forever(endpoint))

    @property
    def probing(self) -> int:
        """How many endpoints this process probes itself now."""
        return len(self._tasks)

    def follow(self, covered: set[tuple[str, str]]) -> None:
        """Probe no endpoint in `covered` (a fresh view says their state); probe the rest."""
        if covered != self.covered:
            self.covered = covered
            if self._http is not None:
                self.sync()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.warning("a probe task had ended with %r", task.exception())
        if self._http is not None:
            await self._http.close()

    async def _probe_forever(self, endpoint: Endpoint) -> None:
        while endpoint.state is not EndpointState.DRAINING:
            pool = self.pools.get(endpoint.pool)
            if pool is None or not (pool.config.health_path or pool.config.metrics_path):
                return
            interval = pool.config.health_interval_s
            before = endpoint.state
            if pool.config.health_path:
                result = await self.probe(endpoint, pool.config.health_path)
                self.apply(endpoint, result)
            if pool.config.metrics_path:
                await self.scrape(endpoint, pool.config.metrics_path, interval,
                                  pool.config.engine)
            if self.observer is not None:
                self.observer(endpoint, before)
            await asyncio.sleep(interval * random.uniform(1 - JITTER, 1 + JITTER))

    async def probe(self, endpoint: Endpoint, path: str) -> Probe:
        assert self._http is not None
        self.probes += 1
        try:
            async with self._http.get(endpoint.url + path) as response:
                # Read (bounded) even when healthy: a body left unread would close the
                # kept-alive connection.
                body = await read_capped(response.content, LOADING_BODY_BYTES)
                return classify_probe(response.status, body[:LOADING_BODY_BYTES])
        except (aiohttp.ClientError, OSError, TimeoutError):
            return Probe.DOWN

    async def scrape(self, endpoint: Endpoint, path: str, interval: float,
                     engine: str = DEFAULT_ENGINE) -> None:
        """Read the pod's load; a failed read keeps the last one until it is stale."""
        assert self._http is not None
        self.scrapes += 1
        try:
            # Bounded: a slow page must not hold the view past one interval.
            async with asyncio.timeout(min(PROBE_TIMEOUT_S, interval)):
                async with self._http.get(endpoint.url + path) as response:
                    if response.status != 200:
                        raise MetricsParseError(f"status {response.status}")
                    body = await read_capped(response.content, MAX_METRICS_BYTES)
            if len(body) > MAX_METRICS_BYTES:
                raise MetricsParseError("page larger than the limit")
            try:
                load = parse_metrics(body, time.time(), engine)
            except MetricsParseError:
                self.parse_failures += 1
                raise
        except (aiohttp.ClientError, OSError, TimeoutError, MetricsParseError) as exc:
            self.scrape_failures += 1
            self.telemetry.count("load_scrape_failures", (endpoint.pool,))
            log.debug("metrics of %s unreadable: %s", endpoint.url, exc)
            scrape_failed(endpoint, interval, time.time())
            return
        scraped(endpoint, load)

    def apply_view(self, endpoint: Endpoint, state: ViewState | None) -> None:
        """The monitor's word on an endpoint's state (None: the monitor does not probe its
        health), through the same methods as a probe's result."""
        action = action_for(state, endpoint.state.value)
        if action is Action.HEALTHY:
            self.apply(endpoint, Probe.HEALTHY)
        elif action is Action.LOADING:
            self.apply(endpoint, Probe.LOADING)
        elif action is Action.EJECT:
            # As probe_failed: no probation, only "ready" restores it.
            endpoint.outlier.eject(retry_at=float("inf"))
            self.telemetry.event("endpoint ejected", f"{endpoint.url} (pool {endpoint.pool}) "
                                 "is failing its probes (fleet monitor)", alert_type="warning",
                                 tags=[f"pool:{endpoint.pool}"])

    def apply(self, endpoint: Endpoint, result: Probe) -> None:
        """A probe's result, reported to the endpoint's outlier detector (it owns the
        state)."""
        health = endpoint.outlier
        if result is Probe.LOADING:
            self.loading_probes += 1
            if health.loading():
                self.telemetry.event("endpoint loading", f"{endpoint.url} (pool "
                                     f"{endpoint.pool}) is loading its model again: warming",
                                     alert_type="warning", tags=[f"pool:{endpoint.pool}"])
            return
        if result is Probe.HEALTHY:
            if health.state is EndpointState.EJECTED:
                health.restore()
                self.telemetry.event("endpoint restored", f"{endpoint.url} (pool "
                                     f"{endpoint.pool}) passed its health probe",
                                     tags=[f"pool:{endpoint.pool}"])
            elif (duration := health.probe_passed()) is not None:
                self.cold_starts.append(ColdStart(endpoint.url, endpoint.pool, duration))
                self.telemetry.observe("cold_start_duration", (endpoint.pool,), duration)
                self.telemetry.event("cold start finished", f"{endpoint.url} (pool "
                                     f"{endpoint.pool}) ready after {duration:.1f} s",
                                     tags=[f"pool:{endpoint.pool}"])
            return
        if health.probe_failed():
            self.telemetry.event("endpoint ejected", f"{endpoint.url} (pool "
                                 f"{endpoint.pool}) failed {health.consecutive_failures}"
                                 " probes in a row", alert_type="warning",
                                 tags=[f"pool:{endpoint.pool}"])
