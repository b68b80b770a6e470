"""`llm-sidecar scaler`: each tick, read the global traffic view and the fleet monitor's pod
views from Redis (the sidecars' pod-load reports for a pool whose view is stale), decide
each pool's replica count with the predictive policy, apply it through Nomad (or only
publish it as a metric for the stock Nomad Autoscaler), and publish the load level the
sidecars use for new sessions.

Safe to run twice: only the holder of a Redis lock acts, and it confirms the lock (compare
and extend, by its token) immediately before each Nomad call, which must end before that
lease does; the other keeps trying and takes over within a lock lifetime. What a decision
needs of the past (the policies' history, the last scale-down of each pool) lives in Redis,
so a new leader continues where the old left off. Every time is Redis's `TIME`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sidecar.fleet.loads import read_pod_load
from sidecar.fleet.podview import STALE_INTERVALS, PoolView, ViewError, ViewState, decode, view_key
from sidecar.fleet.traffic import BUCKET_S, PoolTraffic, read_traffic
from sidecar.redisfaults import CAUGHT, Fault, classify, describe
from sidecar.routing.store import LEVEL_CHANNEL, LEVEL_KEY
from sidecar.scaler.config import ScaledPool, ScalerSettings
from sidecar.scaler.nomad import DeploymentActive, GroupStatus, NomadClient, NomadError
from sidecar.scaler.policy import (
    Bounds,
    LoadLevelPolicy,
    Observation,
    PodSample,
    PredictivePolicy,
    Pressure,
    pressure,
)
from sidecar.serviceport import serve
from sidecar.supervise import SUPERVISOR, Supervisor, supervised_until
from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar.scaler")

LEADER_KEY = "llmsc:scaler:leader"
# The state shares the lock's Cluster slot (the hash tag is the lock's name), so one script
# can check the lock and write the state atomically on every topology.
STATE_KEY = "llmsc:scaler:state:{llmsc:scaler:leader}"
STATE_TTL_S = 86400  # a fleet whose scalers all stopped for a day starts afresh
MIN_CALL_S = 0.05  # a Nomad call given less than this would time out before it began
FORECAST_GAUGES = frozenset({"scaler_forecast_replicas", "scaler_forecast_ratio",
                             "scaler_demand", "scaler_queued", "scaler_gpu_utilization"})
# Keep the lock if it is ours (extend it), or take it if free and ARGV[3] says so; and say
# what Redis's clock reads, in the same round trip. 1: kept, 2: taken, 0: someone else's.
LEASE = """
local now = redis.call('TIME')
local holder = redis.call('GET', KEYS[1])
local held = 0
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  held = 1
elseif not holder and ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  held = 2
end
return {held, now[1], now[2]}
"""
# Write the state (field/value pairs from ARGV[3], expiry ARGV[2] ms) only while ARGV[1]
# holds the lock: a deposed leader cannot overwrite what its successor decided.
SAVE_STATE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""
# A scale-down happened (whoever leads by now): keep the latest time, never an older one.
NOTE_SCALE_DOWN = """
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > last then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"""


class LostLease(Exception):
    """The lock could not be confirmed: this scaler stops acting until it leads again."""


@dataclass(frozen=True, slots=True)
class Lease:
    held: bool
    taken: bool          # newly taken (not kept): load the state the last leader left
    now: float           # Redis's clock when it answered
    until: float         # monotonic deadline before which the lock is surely still ours


@dataclass
class PoolReport:
    pool: str
    demand_peak: float | None = None
    demand_mean: float | None = None
    queued: float | None = None
    gpu_utilization: float | None = None
    source: str = "view"       # where `queued` came from: "view" or "pod-load"
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


def view_pods(view: PoolView, now: float, interval_s: float) -> list[PodSample] | None:
    """The ready pods of a pool's view, with the loads and GPU readings no older than the
    staleness bound; None when the view is stale or shows no ready pod's load (nothing to
    judge saturation by: the sidecars' reports are read instead)."""
    if not view.fresh(now, interval_s):
        return None
    bound = STALE_INTERVALS * interval_s
    age = view.age(now)
    pods = []
    for entry in view.endpoints.values():
        # No state: the monitor scrapes this pool's metrics without probing its health.
        if entry.state not in (ViewState.READY, None) or entry.load is None \
                or age + entry.load.at > bound:
            continue
        gpu = entry.gpu.utilization if entry.gpu is not None \
            and age + entry.gpu.at <= bound else None
        pods.append(PodSample(entry.load.running, entry.load.waiting, entry.load.kv_usage,
                              gpu))
    return pods or None


class Scaler:
    def __init__(self, settings: ScalerSettings, redis: Any, nomad: NomadClient,
                 events: Telemetry | None = None, instance: str | None = None,
                 now: float | None = None, supervisor: Supervisor = SUPERVISOR) -> None:
        self.settings = settings
        self.redis = redis
        self.nomad = nomad
        self.events = events or Telemetry()
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        # The lock's value: unique per run, so a restarted instance is a new holder.
        self.token = f"{self.instance}:{os.urandom(6).hex()}"
        self.supervisor = supervisor
        self._started_at = now  # None: the first tick's Redis time
        self.policies: dict[str, PredictivePolicy] = {}
        self.levels = LoadLevelPolicy()
        self.published_level: str | None = None
        self._last_down: dict[str, float] = {}
        self._without_capacity: set[str] = set()
        self._lease_script = redis.register_script(LEASE)
        self._save_script = redis.register_script(SAVE_STATE)
        self._down_script = redis.register_script(NOTE_SCALE_DOWN)
        self._lease: Lease | None = None
        self._restored = False
        self._bugs_logged: set[str] = set()
        # Pools read from the sidecars' reports for want of a fresh view (logged once per
        # streak), and how many ticks each has fallen back (for `stats`).
        self._falling_back: set[str] = set()
        self.fallbacks: dict[str, int] = {}
        self.ticks = 0
        self.leader_ticks = 0

    @property
    def buckets(self) -> int:
        return max(1, math.ceil(self.settings.interval_s / BUCKET_S))

    @property
    def lock_ttl_s(self) -> float:
        return self.settings.interval_s * 3

    async def lease(self, take: bool = True) -> Lease:
        """Extend the lock if it is ours (or take it if free and `take`); Redis's time."""
        asked = time.monotonic()
        held, seconds, micros = await self._lease_script(
            keys=[LEADER_KEY], args=[self.token, int(self.lock_ttl_s * 1000), int(take)])
        # Redis starts the expiry after we asked, so `asked + ttl` errs on the safe side.
        lease = Lease(bool(held), held == 2, int(seconds) + int(micros) / 1e6,
                      asked + self.lock_ttl_s)
        self._lease = lease if lease.held else None
        return lease

    async def is_leader(self) -> bool:
        return (await self.lease()).held

    async def confirm(self) -> float:
        """Immediately before a Nomad call: extend the lock only if it is still ours. Returns
        the seconds the call may take (it must end before the lease does); raises LostLease
        when the lock moved, expired, or Redis cannot say."""
        try:
            lease = await self.lease(take=False)
        except CAUGHT as exc:
            raise LostLease(f"cannot confirm the lock ({describe(exc)})") from exc
        if not lease.held:
            raise LostLease("the lock is no longer ours")
        # Leave a tenth of the lease for the clocks' rates to disagree.
        budget = (lease.until - time.monotonic()) * 0.9
        if budget < MIN_CALL_S:
            raise LostLease(f"the lease leaves {max(budget, 0.0):.3f} s, too little for a "
                            "Nomad call")
        return budget

    def _policy(self, name: str, pool: ScaledPool, now: float) -> PredictivePolicy:
        policy = self.policies.get(name)
        if policy is None:
            started = self._started_at if self._started_at is not None else now
            policy = self.policies[name] = PredictivePolicy(
                Bounds(pool.minimum, pool.maximum, pool.cold_start_s),
                quantile=self.settings.burst_quantile, headroom=self.settings.headroom,
                prior_cv=self.settings.prior_cv, prior_samples=self.settings.prior_samples,
                prior_floor=self.settings.prior_floor,
                started_at=started)
        return policy

    async def _restore(self, now: float) -> None:
        """Continue from the state the last leader saved (none: start afresh)."""
        fields = {k.decode() if isinstance(k, bytes) else k: v
                  for k, v in (await self.redis.hgetall(STATE_KEY)).items()}
        self.policies.clear()
        self.levels = LoadLevelPolicy()
        self._last_down.clear()
        self.published_level = None  # publish once as the new leader
        for name, pool in self.settings.pools.items():
            policy = self._policy(name, pool, now)
            raw = fields.get(f"policy:{name}")
            down = fields.get(f"down:{name}")
            try:
                if raw is not None:
                    policy.restore(json.loads(raw))
                if down is not None:
                    self._last_down[name] = float(down)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("pool %s: the saved scaler state is unreadable (%s); starting "
                            "its history afresh", name, exc)
        raw = fields.get("levels")
        if raw is not None:
            try:
                self.levels.restore(json.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("the saved load level state is unreadable (%s)", exc)
        self._restored = True

    async def _save(self) -> bool:
        pairs: list[str] = []
        for name, policy in self.policies.items():
            pairs += [f"policy:{name}", json.dumps(policy.state(), separators=(",", ":"))]
        pairs += ["levels", json.dumps(self.levels.state(), separators=(",", ":"))]
        saved = await self._save_script(keys=[LEADER_KEY, STATE_KEY],
                                        args=[self.token, STATE_TTL_S * 1000, *pairs])
        return bool(saved)

    async def tick(self, now: float | None = None) -> TickReport:
        """One decision round. Redis errors (every tree redisfaults knows) propagate to
        `run`, which restarts the loop; `now` (tests) overrides Redis's clock."""
        self.ticks += 1
        try:
            return await self._tick(now)
        except CAUGHT:
            self._step_down()
            raise

    async def _tick(self, now: float | None) -> TickReport:
        lease = await self.lease()
        if not lease.held:
            self._step_down()
            return TickReport(leader=False)
        now = lease.now if now is None else now
        if lease.taken or not self._restored:
            await self._restore(now)
        view = await read_traffic(self.redis, self.settings.pools, now, self.buckets)
        pressures = await self.read_pressure(now)
        self.leader_ticks += 1
        report = TickReport(leader=True)
        demand_total = 0.0
        ready_total = 0
        complete = True
        for name, pool in self.settings.pools.items():
            try:
                item = await self._decide(name, pool, view[name], pressures[name], now)
            except LostLease as exc:
                log.warning("pool %s: %s: no Nomad call; following from now on", name, exc)
                report.leader = False
                report.pools.append(PoolReport(name, action="not-leader", reason=str(exc)))
                self._step_down()
                return report
            report.pools.append(item)
            if item.demand_mean is None or item.healthy is None:
                complete = False
            else:
                demand_total += item.demand_mean
                ready_total += item.healthy
        utilization = demand_total / ready_total if complete and ready_total else None
        if complete and ready_total == 0 and demand_total > 0:
            utilization = math.inf
        # The worst pool's worst pod: wherever users queue, the level rises.
        known = [item.queued for item in report.pools if item.queued is not None]
        level = self.levels.decide(utilization, max(known) if known else None)
        if self._lease is None or time.monotonic() >= self._lease.until:
            # The tick outlived the lock (a slow Nomad read): another scaler may lead now.
            log.warning("this tick outlived the lock: not publishing, following from now on")
            report.leader = False
            self._step_down()
            return report
        report.level = await self._publish_level(level)
        if not await self._save():
            log.warning("the lock moved during this tick: its state was not saved")
            report.leader = False
            self._step_down()
        return report

    async def read_pressure(self, now: float) -> dict[str, tuple[Pressure, str]]:
        """Each pool's saturation signal and where it came from: its pod view (one pipelined
        read of every pool's view; on Cluster each pool's key is in its own slot) when
        fresh, else the sidecars' pod-load reports (a second read, for those pools only)."""
        pools = self.settings.pools
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in pools:
                pipe.hmget(view_key(name), "version", "at", "view")
            replies = await pipe.execute()
        out: dict[str, tuple[Pressure, str]] = {}
        missing: dict[str, str] = {}
        unreadable: set[str] = set()
        for (name, pool), fields in zip(pools.items(), replies, strict=True):
            if not isinstance(fields, list) or len(fields) != 3 or None in fields:
                missing[name] = "no pod view"
                continue
            try:
                pods = view_pods(decode(name, *fields), now, pool.health_interval_s)
            except ViewError as exc:
                missing[name] = str(exc)
                unreadable.add(name)
                continue
            if pods is None:
                missing[name] = "its pod view is stale or shows no ready pod's load"
                continue
            out[name] = (pressure(pods), "view")
            if name in self._falling_back:
                self._falling_back.discard(name)
                log.info("pool %s: reading the fleet monitor's pod view again", name)
        if missing:
            loads = await read_pod_load(self.redis, list(missing), now)
            for name, why in missing.items():
                out[name] = (Pressure(loads[name].queued, None, 0), "pod-load")
                self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
                self.events.count("scaler_view_fallbacks", (name,))
                if name not in self._falling_back:
                    self._falling_back.add(name)
                    # A fleet without a monitor has no view at all: that is information,
                    # not a fault; a view that cannot be read is one.
                    log.log(logging.WARNING if name in unreadable else logging.INFO,
                            "pool %s: %s; judging saturation by the sidecars' pod-load "
                            "reports (the pool's mean queue, not its worst pod's) until "
                            "a fresh view arrives", name, why)
        return out

    def _step_down(self) -> None:
        """Not leading (or not sure): publish no forecast, and load the state afresh when
        leading again (another leader may have moved it on)."""
        self._lease = None
        self._restored = False
        self._unpublish()

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
        key = ("scaler_gpu_utilization", tags)
        if report.gpu_utilization is not None:
            self.events.gauge(*key, round(report.gpu_utilization, 4))
        elif key in self.events.gauges:
            del self.events.gauges[key]  # no reading now: no stale value either

    async def _decide(self, name: str, pool: ScaledPool, traffic: PoolTraffic,
                      measured: tuple[Pressure, str], now: float) -> PoolReport:
        signal, source = measured
        report = PoolReport(name, queued=signal.queued, gpu_utilization=signal.gpu_utilization,
                            source=source)
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
        obs = Observation(now=now, demand_peak=report.demand_peak,
                          demand_mean=report.demand_mean,
                          utilization=(report.demand_mean / status.healthy
                                       if report.demand_mean is not None and status.healthy
                                       else None),
                          current=status.desired, ready=status.healthy, queued=signal.queued,
                          gpu_utilization=signal.gpu_utilization, stalled=signal.stalled)
        decision = self._policy(name, pool, now).decide(obs)
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
        # Fencing: the status above may have taken longer than the lock lives; act only on
        # a lock confirmed now, and end the call before that lease can end.
        budget = await self.confirm()
        try:
            evaluation = await self.nomad.scale(pool.job, pool.group, decision.count, message,
                                                {"scaler": self.instance, "pool": name},
                                                timeout_s=budget)
        except DeploymentActive:
            report.action = "blocked"
            report.reason += "; a deployment is active, trying next tick"
            log.info("pool %s: %s", name, report.reason)
            return report
        except (NomadError, OSError, TimeoutError) as exc:
            report.action = "failed"
            report.reason += f"; {exc or type(exc).__name__}"
            log.error("pool %s: scaling to %d failed: %s", name, decision.count,
                      exc or type(exc).__name__)
            return report
        report.action = "scaled"
        if decision.count < status.desired:
            self._last_down[name] = now
            # Recorded whether or not this scaler still leads: it is a fact about Nomad the
            # next leader's cooldown must know.
            await self._down_script(keys=[STATE_KEY], args=[f"down:{name}", repr(now)])
        self.events.event(f"scaled pool {name} to {decision.count}",
                          f"{message}; evaluation {evaluation}",
                          tags=[f"pool:{name}", f"job:{pool.job}"])
        return report

    async def _publish_level(self, level: str) -> str:
        if level != self.published_level:
            # Two commands, not a pipeline: redis-py refuses PUBLISH in a Cluster pipeline.
            # The key first, so a sidecar that reads it on the message sees the new level.
            await self.redis.set(LEVEL_KEY, level)
            await self.redis.publish(LEVEL_CHANNEL, level)
            if self.published_level is not None:
                self.events.event(f"load level {level}",
                                  f"load level {self.published_level} → {level}")
            self.published_level = level
        return level

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                report = await self.tick()
            except CAUGHT as exc:
                if classify(exc) is Fault.BUG and describe(exc) not in self._bugs_logged:
                    self._bugs_logged.add(describe(exc))
                    log.error("scaler tick: Redis refused a command", exc_info=exc)
                raise  # the supervisor restarts this loop with a backoff, logging once
            if report.leader:
                for item in report.pools:
                    log.info("pool %s: demand %s replicas, queued %s (%s), GPU %s, desired "
                             "%s, healthy %s → %s (%s) %s", item.pool, _fmt(item.demand_mean),
                             _fmt(item.queued), item.source, _fmt(item.gpu_utilization),
                             item.desired, item.healthy, item.decision, item.action,
                             item.reason)
            wait = max(0.0, self.settings.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick at once, then every interval, until `stop` is set; any exception (a Redis
        outage of any topology, a bug) restarts the loop after a bounded backoff."""
        async def body() -> None:
            await self._loop(stop)

        await supervised_until(stop, "scaler", body, self.supervisor)


async def serve_metrics(telemetry: Telemetry, host: str, port: int) -> web.AppRunner:
    """GET /metrics (Prometheus text) and GET /health on `host:port`; the caller cleans up
    the returned runner."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=telemetry.prometheus(), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    return await serve({"/metrics": metrics, "/health": health}, host, port)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
