"""`llm-sidecar scaler`: each tick, read the global traffic view and the pods' load from
Redis, decide each pool's replica count with the predictive policy, apply it through Nomad
(or only publish it as a metric for the stock Nomad Autoscaler), and publish the load level
the sidecars use for new sessions.

Safe to run twice: only the holder of a Redis lock (with expiry) acts; the other keeps
trying and takes over within a lock lifetime if the leader dies. The first decision comes
at start, then every SIDECAR_SCALER_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from sidecar.scaler.config import ScaledPool, ScalerSettings
from sidecar.scaler.nomad import DeploymentActive, GroupStatus, NomadClient, NomadError
from sidecar.scaler.policy import Bounds, LoadLevelPolicy, Observation, PredictivePolicy
from sidecar.store import LEVEL_CHANNEL, LEVEL_KEY
from sidecar.telemetry import Telemetry
from sidecar.traffic import BUCKET_S, PoolLoad, PoolTraffic, read_pod_load, read_traffic

log = logging.getLogger("sidecar.scaler")

LEADER_KEY = "llmsc:scaler:leader"
FORECAST_GAUGES = frozenset({"scaler_forecast_replicas", "scaler_forecast_ratio",
                             "scaler_demand", "scaler_queued"})
# Take the lock, or keep it if it is ours, in one round trip.
ACQUIRE_OR_RENEW = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


@dataclass
class PoolReport:
    pool: str
    demand_peak: float | None = None
    demand_mean: float | None = None
    queued: float | None = None
    desired: int | None = None
    healthy: int | None = None
    decision: int | None = None
    action: str = "hold"
    reason: str = ""


@dataclass
class TickReport:
    leader: bool
    level: str | None = None
    pools: list[PoolReport] = field(default_factory=list)


class Scaler:
    def __init__(self, settings: ScalerSettings, redis: Any, nomad: NomadClient,
                 events: Telemetry | None = None, instance: str | None = None,
                 now: float | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.nomad = nomad
        self.events = events or Telemetry()
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        started = time.time() if now is None else now
        self.policies = {
            name: PredictivePolicy(Bounds(p.minimum, p.maximum, p.cold_start_s),
                                   quantile=settings.burst_quantile,
                                   headroom=settings.headroom, started_at=started)
            for name, p in settings.pools.items()}
        self.levels = LoadLevelPolicy()
        self.published_level: str | None = None
        self._last_down: dict[str, float] = {}
        self._without_capacity: set[str] = set()
        self._lock = redis.register_script(ACQUIRE_OR_RENEW)
        self.ticks = 0

    @property
    def buckets(self) -> int:
        return max(1, math.ceil(self.settings.interval_s / BUCKET_S))

    async def is_leader(self) -> bool:
        ttl_ms = int(self.settings.interval_s * 3 * 1000)
        return bool(await self._lock(keys=[LEADER_KEY], args=[self.instance, ttl_ms]))

    async def tick(self, now: float | None = None) -> TickReport:
        now = time.time() if now is None else now
        self.ticks += 1
        try:
            if not await self.is_leader():
                self._unpublish()
                return TickReport(leader=False)
            view = await read_traffic(self.redis, self.settings.pools, now, self.buckets)
            loads = await read_pod_load(self.redis, self.settings.pools, now)
        except (RedisError, OSError) as exc:
            log.warning("redis unavailable (%s): holding every pool this tick", exc)
            self._unpublish()
            return TickReport(leader=False)
        report = TickReport(leader=True)
        demand_total = 0.0
        ready_total = 0
        complete = True
        running = sum(load.running for load in loads.values())
        waiting = sum(load.waiting for load in loads.values())
        reporting = sum(load.pods for load in loads.values())
        for name, pool in self.settings.pools.items():
            item = await self._decide(name, pool, view[name], loads[name], now)
            report.pools.append(item)
            if item.demand_mean is None or item.healthy is None:
                complete = False
            else:
                demand_total += item.demand_mean
                ready_total += item.healthy
        utilization = demand_total / ready_total if complete and ready_total else None
        if complete and ready_total == 0 and demand_total > 0:
            utilization = math.inf
        fleet_queued = waiting / max(running, 1) if reporting else None
        report.level = await self._publish_level(self.levels.decide(utilization, fleet_queued))
        return report

    def _unpublish(self, pool: str | None = None) -> None:
        """A scaler that does not lead (or cannot read a pool) publishes no forecast for it:
        the stock autoscaler then sees no value rather than a stale one."""
        for key in [k for k in self.events.gauges
                    if k[0] in FORECAST_GAUGES and (pool is None or k[1] == (pool,))]:
            del self.events.gauges[key]

    def _publish(self, name: str, report: PoolReport, desired: int) -> None:
        tags = (name,)
        if report.decision is not None:
            self.events.gauge("scaler_forecast_replicas", tags, report.decision)
            # Against at least 1: the target-value strategy multiplies the current count.
            self.events.gauge("scaler_forecast_ratio", tags,
                              round(report.decision / max(desired, 1), 4))
        if report.demand_mean is not None:
            self.events.gauge("scaler_demand", tags, round(report.demand_mean, 4))
        if report.queued is not None:
            self.events.gauge("scaler_queued", tags, round(report.queued, 4))

    async def _decide(self, name: str, pool: ScaledPool, traffic: PoolTraffic, load: PoolLoad,
                      now: float) -> PoolReport:
        report = PoolReport(name)
        try:
            status: GroupStatus = await self.nomad.scale_status(pool.job, pool.group)
        except (NomadError, OSError, TimeoutError) as exc:
            report.reason = f"cannot read Nomad: {exc}"
            log.error("pool %s: %s; holding", name, report.reason)
            self._unpublish(name)
            return report
        report.desired, report.healthy = status.desired, status.healthy
        if status.healthy == 0 and name not in self._without_capacity:
            self._without_capacity.add(name)
            self.events.event(f"pool {name} has no ready capacity",
                              f"{status.desired} asked for, none healthy yet",
                              alert_type="warning", tags=[f"pool:{name}"])
        elif status.healthy > 0:
            self._without_capacity.discard(name)
        if not traffic.missing:
            rates = [r / pool.replica_tokens_per_s for r in traffic.tokens_per_s]
            report.demand_peak = max(rates)
            report.demand_mean = sum(rates) / len(rates)
        report.queued = load.queued
        obs = Observation(now=now, demand_peak=report.demand_peak,
                          demand_mean=report.demand_mean,
                          utilization=(report.demand_mean / status.healthy
                                       if report.demand_mean is not None and status.healthy
                                       else None),
                          current=status.desired, ready=status.healthy, queued=load.queued)
        decision = self.policies[name].decide(obs)
        report.decision, report.reason = decision.count, decision.reason
        self._publish(name, report, status.desired)
        if decision.count == status.desired:
            return report
        if decision.count < status.desired and \
                now - self._last_down.get(name, -math.inf) < self.settings.cooldown_s:
            report.reason += "; scale-down cooldown"
            return report
        message = (f"llm-sidecar scaler: {status.desired} → {decision.count} "
                   f"({decision.reason})")
        if self.settings.dry_run:
            report.action = "dry-run"
            log.info("dry run: pool %s (job %s group %s) would scale %s", name, pool.job,
                     pool.group, message)
            return report
        try:
            evaluation = await self.nomad.scale(pool.job, pool.group, decision.count, message,
                                                {"scaler": self.instance, "pool": name})
        except DeploymentActive:
            report.action = "blocked"
            report.reason += "; a deployment is active, trying next tick"
            log.info("pool %s: %s", name, report.reason)
            return report
        except (NomadError, OSError, TimeoutError) as exc:
            report.action = "failed"
            report.reason += f"; {exc}"
            log.error("pool %s: scaling to %d failed: %s", name, decision.count, exc)
            return report
        report.action = "scaled"
        if decision.count < status.desired:
            self._last_down[name] = now
        self.events.event(f"scaled pool {name} to {decision.count}",
                          f"{message}; evaluation {evaluation}",
                          tags=[f"pool:{name}", f"job:{pool.job}"])
        return report

    async def _publish_level(self, level: str) -> str:
        if level != self.published_level:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(LEVEL_KEY, level)
                pipe.publish(LEVEL_CHANNEL, level)
                await pipe.execute()
            if self.published_level is not None:
                self.events.event(f"load level {level}",
                                  f"load level {self.published_level} → {level}")
            self.published_level = level
        return level

    async def run(self, stop: asyncio.Event) -> None:
        """Tick at once, then every interval, until `stop` is set."""
        while not stop.is_set():
            started = time.monotonic()
            try:
                report = await self.tick()
                if report.leader:
                    for item in report.pools:
                        log.info("pool %s: demand %s replicas, queued %s, desired %s, "
                                 "healthy %s → %s (%s) %s", item.pool, _fmt(item.demand_mean),
                                 _fmt(item.queued), item.desired, item.healthy, item.decision,
                                 item.action, item.reason)
            except Exception:
                log.exception("scaler tick failed")
            wait = max(0.0, self.settings.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


async def serve_metrics(telemetry: Telemetry, host: str, port: int) -> web.AppRunner:
    """GET /metrics (Prometheus text) and GET /health on `host:port`; the caller cleans up
    the returned runner."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=telemetry.prometheus(), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
