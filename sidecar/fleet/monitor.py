"""`llm-sidecar monitor`: one process (the holder of a Redis lock) probes every endpoint of
every pool once per `health_interval_s` — health and metrics, on kept-alive connections,
jittered and bounded by the prober's timeouts and page cap — and publishes each pool's pod
view (podview.py) for every sidecar to read, pushed with each write (a change of state at
once).

The probing, its classification and the metrics parsing are the sidecar's own
(health.HealthProber over a PoolSet); this module adds the lock and the writes. Where a pool
names its `nomad_service` and Nomad is reachable, gpureader.py reads its pods' GPUs beside
the probes and the view carries each endpoint's reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from aiohttp import web

from sidecar.config import ConfigError, Settings, reload_pools
from sidecar.fleet.gpureader import GpuReader
from sidecar.fleet.health import HealthProber
from sidecar.fleet.podload import GpuUsage
from sidecar.fleet.podview import (
    MONITOR_LEADER_KEY,
    STALE_INTERVALS,
    VIEW_CHANNEL,
    EndpointView,
    encode,
    state_of,
    view_key,
)
from sidecar.fleet.pools import Endpoint, EndpointState, Pool, PoolSet
from sidecar.redisfaults import CAUGHT
from sidecar.scaler.config import NomadAccess
from sidecar.serviceport import serve
from sidecar.supervise import SUPERVISOR, Supervisor, supervised_until
from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar.monitor")

# Keep the lock if it is ours, or take it if free. 1: kept, 2: taken, 0: someone else's.
LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# The view, its version and Redis's time in one script (one round trip, one slot), and the
# view pushed to every sidecar under the pool's name, ARGV[4] (a keyless PUBLISH inside a
# script works on Cluster).
WRITE_VIEW = """
local t = redis.call('TIME')
local at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'at', at, 'view', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. '\\0' .. v .. '\\0' .. at .. '\\0' .. ARGV[1])
return v
"""


# Probe rounds that end within this long of each other are written together; and a pool is
# written (and its view pushed to every sidecar) at most WRITES_PER_INTERVAL times per
# interval: the push is what keeps the load a sidecar routes on as fresh as its own scrape
# was (a sidecar that waited for its next read routed on loads seconds old, and moved
# sessions onto pods that had filled since), and the bound keeps a large pool's pushes from
# growing with its endpoints.
WRITE_GAP_S = 0.1
WRITES_PER_INTERVAL = 8


def monitored(pools: PoolSet) -> list[Pool]:
    return [p for p in pools.pools.values() if p.config.health_path or p.config.metrics_path]


def gpu_pools(settings: Settings) -> list[str]:
    """The pools whose GPUs the monitor reads from Nomad (none: Nomad is never called)."""
    return sorted(name for name, p in settings.pools.items()
                  if p.nomad_service and (p.health_path or p.metrics_path))


class FleetMonitor:
    """Leads (holds MONITOR_LEADER_KEY) or waits. While leading it owns a fresh PoolSet and
    prober, so a new reign starts from what it observes itself, never from a past one."""

    def __init__(self, settings: Settings, redis: Any, telemetry: Telemetry | None = None,
                 instance: str | None = None, supervisor: Supervisor = SUPERVISOR,
                 nomad: NomadAccess | None = None) -> None:
        self.settings = settings
        self.nomad = nomad  # None: no GPU readings (no pool names a nomad_service)
        self.redis = redis
        self.telemetry = telemetry if telemetry is not None else Telemetry({})
        self.supervisor = supervisor
        instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        self.token = f"{instance}:{os.urandom(6).hex()}"
        self._lease = redis.register_script(LEASE)
        self._release = redis.register_script(RELEASE)
        self._write = redis.register_script(WRITE_VIEW)
        self.pools: PoolSet | None = None
        self.prober: HealthProber | None = None
        self.lease_until = 0.0            # monotonic; the lock is surely ours before it
        self._rounds: dict[tuple[str, str], int] = {}  # probe rounds of each endpoint
        self._reign = ""                  # names this reign's rounds in the view
        self._fresh: set[str] = set()     # pools with a round not yet written
        self._changed: set[str] = set()   # pools with a state change not yet announced
        self._wake = asyncio.Event()
        self.writes = 0
        self.notices = 0
        self.reigns = 0
        self.probes = 0                   # over every reign (each has its own prober)
        self.scrapes = 0
        self.gpu: GpuReader | None = None  # reads while leading, when `nomad` is set
        self._gpu_task: asyncio.Task[None] | None = None
        self._gpu_stats: dict[str, Any] = {}  # the last reign's reader, for /stats
        self.telemetry.collectors.append(self._collect)

    @property
    def interval_s(self) -> float:
        intervals = [p.health_interval_s for p in self.settings.pools.values()
                     if p.health_path or p.metrics_path]
        return min(intervals, default=5.0)

    @property
    def lock_ttl_s(self) -> float:
        # Two intervals: renewed every interval; a standby takes over before the view goes
        # stale (STALE_INTERVALS) for the sidecars.
        return max(1.0, self.interval_s * 2)

    @property
    def leading(self) -> bool:
        return self.prober is not None and time.monotonic() < self.lease_until

    async def keep_lease(self) -> bool:
        asked = time.monotonic()
        held = await self._lease(keys=[MONITOR_LEADER_KEY],
                                 args=[self.token, int(self.lock_ttl_s * 1000)])
        self.lease_until = asked + self.lock_ttl_s if held else 0.0
        return bool(held)

    async def _lead(self) -> None:
        self.reigns += 1
        self.pools = PoolSet(self.settings)
        self._rounds.clear()
        self._reign = os.urandom(3).hex()
        self._fresh.clear()
        self._changed.clear()
        self.prober = HealthProber(self.pools, self.telemetry, keep_alive=True,
                                   observer=self._observed)
        await self.prober.start()
        if self.nomad is not None:
            self.gpu = GpuReader(self.nomad, lambda: self.interval_s, self._gpu_targets,
                                 self._gpu_read)
            self._gpu_task = self.supervisor.start("gpu readings", self.gpu.run)
        log.info("leading: probing %d endpoints of %d pools",
                 sum(len(p.endpoints) for p in monitored(self.pools)),
                 len(monitored(self.pools)))
        self.telemetry.event("fleet monitor leading", f"{self.token} probes the pools")

    async def _step_down(self) -> None:
        prober, self.prober = self.prober, None
        gpu, self.gpu = self.gpu, None
        task, self._gpu_task = self._gpu_task, None
        if gpu is not None:
            await self.supervisor.stop(task)
            await gpu.close()
            self._gpu_stats = gpu.stats()
        self.lease_until = 0.0
        self._fresh.clear()
        self._changed.clear()
        if prober is not None:
            self.probes += prober.probes
            self.scrapes += prober.scrapes
            await prober.close()
            log.info("not leading: stopped probing")

    def _observed(self, endpoint: Endpoint, before: EndpointState) -> None:
        key = (endpoint.pool, endpoint.url)
        self._rounds[key] = self._rounds.get(key, 0) + 1
        self._fresh.add(endpoint.pool)
        if endpoint.state is not before:
            self._changed.add(endpoint.pool)
        self._wake.set()

    def _gpu_targets(self) -> dict[str, tuple[str, list[str]]]:
        if self.pools is None:
            return {}
        return {p.name: (p.config.nomad_service, [e.url for e in p.endpoints])
                for p in monitored(self.pools) if p.config.nomad_service}

    def _gpu_read(self, pool: str, url: str, gpu: GpuUsage | None) -> None:
        endpoint = self.pools.endpoint(pool, url) if self.pools is not None else None
        if endpoint is not None:
            endpoint.set_gpu(gpu)

    def _collect(self, t: Telemetry) -> None:
        """One gauge pair per endpoint with a reading (bounded by the configuration)."""
        t.gauges = {k: v for k, v in t.gauges.items()
                    if k[0] not in ("endpoint_gpu_utilization", "endpoint_gpu_memory")}
        if self.pools is None or not self.leading:
            return
        for pool in monitored(self.pools):
            for e in pool.endpoints:
                if e.gpu is not None:
                    t.gauge("endpoint_gpu_utilization", (pool.name, e.url), e.gpu.utilization)
                    t.gauge("endpoint_gpu_memory", (pool.name, e.url), e.gpu.memory)

    def view_of(self, pool: Pool) -> dict[str, EndpointView] | None:
        """The pool's view, once every endpoint has been probed in this reign (until then
        the last reign's view stays up: it is fresher than "all warming")."""
        if any((pool.name, e.url) not in self._rounds for e in pool.endpoints):
            return None
        return {e.url: EndpointView(
                    state_of(e.state.value) if pool.config.health_path else None,
                    e.load if pool.config.metrics_path else None,
                    f"{self._reign}:{self._rounds[(pool.name, e.url)]}", e.gpu)
                for e in pool.endpoints}

    def reload(self) -> bool:
        """SIGHUP: re-read the pools file (the same one the sidecars render); new endpoints
        are probed at once, a pool's view waits for their first answer."""
        if self.settings.pools_file is None:
            log.warning("SIGHUP ignored: pools come from SIDECAR_POOLS (set "
                        "SIDECAR_POOLS_FILE to reload pools without a restart)")
            return False
        try:
            self.settings = reload_pools(self.settings)
        except ConfigError as exc:
            log.error("SIGHUP: pools file rejected, keeping the running configuration:\n  %s",
                      "\n  ".join(exc.problems))
            return False
        if self.pools is not None and self.prober is not None:
            self.pools.apply(self.settings.pools, self.settings.api_keys)
            kept = {(p.name, e.url) for p in self.pools.pools.values() for e in p.endpoints}
            self._rounds = {k: n for k, n in self._rounds.items() if k in kept}
            self.prober.sync()
        log.info("SIGHUP: pools reloaded")
        return True

    async def publish(self, pool: Pool, changed: bool) -> bool:
        """Write and push the pool's view; `changed`: an endpoint changed state since the
        last write (counted in `notices`)."""
        if not self.leading:
            return False
        endpoints = self.view_of(pool)
        if endpoints is None:
            return False
        ttl_ms = int(STALE_INTERVALS * pool.config.health_interval_s * 1000)
        # Every write is pushed (a state change is announced at once, and each reading
        # reaches the sidecars' routing without waiting for their next read).
        await self._write(keys=[view_key(pool.name)],
                          args=[encode(endpoints, time.time()), ttl_ms, VIEW_CHANNEL,
                                pool.name])
        self.writes += 1
        self._fresh.discard(pool.name)
        if changed:
            self.notices += 1
            self._changed.discard(pool.name)
        return True

    async def tick(self) -> None:
        """Keep (or take) the lock; lead or follow accordingly; write every pool's view."""
        try:
            held = await self.keep_lease()
        except CAUGHT:
            await self._step_down()
            raise
        if not held:
            await self._step_down()
            return
        if self.prober is None:
            await self._lead()
        assert self.pools is not None
        for pool in monitored(self.pools):
            await self.publish(pool, changed=pool.name in self._changed)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.tick()
            # A standby asks twice per interval: it leads within 2.5 intervals of the last
            # renewal, before the view the leader wrote then is stale (STALE_INTERVALS).
            wait = self.interval_s if self.leading else self.interval_s / 2
            deadline = loop.time() + wait
            while (remaining := deadline - loop.time()) > 0:
                if not (self._fresh or self._changed):
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._wake.wait()
                if self.pools is not None:
                    # A probe round ended: its reading is written now (a sidecar's next
                    # read has it), and a state change is announced to every sidecar.
                    for pool in monitored(self.pools):
                        if pool.name in self._fresh or pool.name in self._changed:
                            await self.publish(pool, changed=pool.name in self._changed)
                    # Rounds that end together share one write.
                    gap = max(WRITE_GAP_S, self.interval_s / WRITES_PER_INTERVAL)
                    await asyncio.sleep(min(gap, max(0.0, deadline - loop.time())))

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: any exception (Redis away) steps down and restarts the loop after
        a bounded backoff. On the way out the lock is released, so a standby leads at once."""
        async def body() -> None:
            try:
                await self._loop()
            except BaseException:
                await self._step_down()
                raise

        try:
            await supervised_until(stop, "fleet monitor", body, self.supervisor)
        finally:
            await self._step_down()
            with contextlib.suppress(*CAUGHT):
                async with asyncio.timeout(1.0):
                    await self._release(keys=[MONITOR_LEADER_KEY], args=[self.token])

    def stats(self) -> dict[str, Any]:
        prober = self.prober
        endpoints = [e.view() for p in monitored(self.pools) for e in p.endpoints] \
            if self.pools is not None else []
        return {"leading": self.leading, "reigns": self.reigns, "interval_s": self.interval_s,
                "view_writes": self.writes, "notices": self.notices,
                "health_probes": self.probes + (prober.probes if prober else 0),
                "load_scrapes": self.scrapes + (prober.scrapes if prober else 0),
                "scrape_failures": prober.scrape_failures if prober else 0,
                "endpoints": endpoints,
                "gpu": (self.gpu.stats() if self.gpu is not None else self._gpu_stats)
                if self.nomad is not None else None,
                "restarts": self.supervisor.view()}


async def serve_stats(monitor: FleetMonitor, host: str, port: int) -> web.AppRunner:
    """GET /stats (JSON) and GET /health; the caller cleans up the returned runner."""
    async def stats(request: web.Request) -> web.Response:
        return web.json_response(monitor.stats())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "leading": monitor.leading})

    return await serve({"/stats": stats, "/health": health}, host, port)
