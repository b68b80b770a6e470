"""Listeners, start-up, reload and graceful drain.

    start-up: settings → Sidecar (pools, store, router, upstream engine, prober) → listeners
    serve:    until SIGTERM / SIGINT; SIGHUP re-reads SIDECAR_POOLS_FILE
    drain:    /ready turns 503, listeners close, in-flight requests finish (up to
              SIDECAR_DRAIN_TIMEOUT_S), background work stops and flushes, exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.admin import AdminThread
from sidecar.config import ConfigError, Listen, Settings, reload_pools
from sidecar.dataplane.exchange import Proxy
from sidecar.dataplane.listener import Listener
from sidecar.dataplane.upstream import HttpUpstream
from sidecar.health import HealthProber
from sidecar.placement import saturated
from sidecar.podload import PodLoad, heartbeat_load
from sidecar.podview import (
    STALE_INTERVALS,
    Following,
    PoolView,
    ViewError,
    decode,
    gpu_at,
    load_at,
    parse_notice,
    view_key,
)
from sidecar.pools import EndpointState, PoolSet
from sidecar.routing import Router
from sidecar.sessionkeys import watched
from sidecar.store import RouteStore, StoreUnavailable, make_store
from sidecar.supervise import Supervisor
from sidecar.telemetry import Telemetry
from sidecar.traffic import (
    HEARTBEAT_TTL_S,
    RedisClock,
    Traffic,
    endpoint_inflight_key,
    format_pod_load,
    pod_load_key,
    sum_endpoint_inflight,
)
from sidecar.traffic import STALE_AFTER_S as HEARTBEAT_STALE_S

log = logging.getLogger("sidecar.server")


class Sidecar:
    """Everything one sidecar process owns, started and stopped together."""

    def __init__(self, settings: Settings, store: RouteStore | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.env = env  # where `api_key_env` variables are read on reload (None: os.environ)
        self.telemetry = Telemetry(env)
        self.pools = PoolSet(settings)
        # Restarts of every background task (store reconnect and pub/sub, route writes and
        # refreshes, traffic and telemetry flushes, the admin heartbeat), for /stats.
        self.supervisor = Supervisor()
        self.store = store if store is not None else make_store(settings, self.supervisor)
        self.router = Router(settings, self.pools, self.store, self.telemetry,
                             self.supervisor)
        self.prober = HealthProber(self.pools, self.telemetry)
        self.traffic = Traffic()
        # The fleet monitor's pod views (podview.py): while a pool's view is fresh this
        # sidecar follows it and probes none of its pods; stale or absent, it probes them.
        self.following = Following()
        self.views_unreadable = 0
        self._probing_pools: set[str] | None = None  # None: not decided yet
        self.store.on_view(self._view_notice)
        self._pools_on_fallback: set[str] = set()
        self._stale_heartbeats: dict[str, list[bytes]] = {}
        self.telemetry.collectors.append(self.collect_metrics)
        self.upstream: HttpUpstream | None = None
        self.proxy: Proxy | None = None
        self.draining = False
        self.started_at = time.time()
        self.reloads = 0

    async def start(self) -> None:
        s = self.settings
        # Upstream TLS always verifies certificates: the system's CAs, or the bundle named
        # by SIDECAR_UPSTREAM_CA_FILE (private model servers with an internal CA). A stream
        # that goes silent for SIDECAR_STREAM_IDLE_TIMEOUT_S ends as a broken stream.
        self.upstream = HttpUpstream(s.connect_timeout_s, s.stream_idle_timeout_s,
                                     ssl.create_default_context(cafile=s.upstream_ca_file))
        self.proxy = Proxy(s, self.router, self.upstream, self.traffic, self.telemetry)
        await self.store.start()
        await self.router.start()
        if self.store.kind == "redis" and self._monitored():
            # One flush before probing: where a monitor publishes fresh views, this sidecar
            # starts by following them and never probes.
            await self.flush_traffic()
        self.follow_views()
        await self.prober.start()
        self.traffic.start(self.flush_traffic, self.supervisor)
        self.telemetry.start(self.supervisor)

    async def flush_traffic(self) -> None:
        """One pipelined round trip: this pod's counts since the last flush, its in-flight
        heartbeats (per pool and per endpoint), the scraped pod loads for the scaler, and
        the read of the fleet's per-endpoint heartbeats for pools without `metrics_path`
        (store.write keeps it within the Redis budget; an incident if Redis is away)."""
        inflight: dict[str, int] = {}
        endpoints: dict[str, dict[str, int]] = {}
        scraped: dict[str, dict[str, PodLoad]] = {}
        for name, pool in self.pools.pools.items():
            inflight[name] = sum(e.inflight for e in pool.endpoints)
            endpoints[name] = {e.url: e.inflight for e in pool.endpoints}
            loads = {e.url: e.load for e in pool.endpoints
                     if e.load is not None and e.load.source == "metrics"}
            if loads:
                scraped[name] = loads
        heartbeat_pools = [name for name, pool in self.pools.pools.items()
                           if not pool.config.metrics_path and pool.endpoints]
        view_pools = list(self._monitored()) if self.store.kind == "redis" else []
        stale, self._stale_heartbeats = self._stale_heartbeats, {}
        clock = self.traffic.clock
        now = clock.local()
        counted = True

        def build(pipe: Any) -> None:
            nonlocal counted
            counted = self.traffic.write(pipe, inflight, now, endpoints)  # its clock first
            _write_pod_load_for_scaler(pipe, scraped, clock)
            for name, fields in stale.items():
                pipe.hdel(endpoint_inflight_key(name), *fields)
            for name in heartbeat_pools:
                pipe.hgetall(endpoint_inflight_key(name))
            for name in view_pools:
                pipe.hmget(view_key(name), "version", "at", "view")

        try:
            replies = await self.store.write(build)
        except StoreUnavailable:
            # Redis away: a fleet view that can no longer be refreshed is dropped once stale.
            for e in self.pools.all_endpoints():
                if e.load is not None and e.load.source == "heartbeat" \
                        and now - e.load.at > HEARTBEAT_STALE_S:
                    e.set_load(None, False)
            self.follow_views()  # the views age: past their bound, probe again
            return
        if replies:
            clock.observe(replies[0], now, clock.local())
        views = replies[len(replies) - len(view_pools):] if replies else []
        replies = replies[:len(replies) - len(view_pools)]
        if replies and heartbeat_pools:
            self._apply_heartbeats(heartbeat_pools, replies[-len(heartbeat_pools):], now)
        for name, fields in zip(view_pools, views, strict=True):
            if isinstance(fields, list) and len(fields) == 3 and None not in fields:
                try:
                    self.take_view(decode(name, *fields))
                except ViewError as exc:
                    self._unreadable(exc)
        self.follow_views()
        if not counted and clock.synced:
            await self.flush_traffic()  # the first flush only learned Redis's clock

    def _monitored(self) -> dict[str, float]:
        """Pools whose pods are probed or scraped → their health interval."""
        return {name: pool.config.health_interval_s for name, pool in self.pools.pools.items()
                if pool.config.health_path or pool.config.metrics_path}

    def _view_notice(self, data: bytes) -> None:
        """The monitor saw an endpoint change state: apply its view now (no read needed)."""
        try:
            self.take_view(parse_notice(data))
        except ViewError as exc:
            self._unreadable(exc)
            return
        self.follow_views()

    def _unreadable(self, exc: ViewError) -> None:
        self.views_unreadable += 1
        if self.views_unreadable == 1:
            log.warning("%s (a monitor of another version?); this sidecar probes the "
                        "pools whose view it cannot read", exc)

    def take_view(self, view: PoolView) -> None:
        """A newer view of a pool, if fresh, moves its endpoints by the prober's setters."""
        pool = self.pools.get(view.pool)
        if pool is None or not self.following.offer(view):
            return
        redis_now = self.traffic.clock.now()
        if not view.fresh(redis_now, pool.config.health_interval_s):
            return
        local_now = time.time()
        for endpoint in pool.endpoints:
            entry = view.endpoints.get(endpoint.url)
            if entry is None:
                continue  # not in the monitor's configuration: this sidecar probes it
            # Not tied to a probe round: each view carries the monitor's latest reading.
            endpoint.set_gpu(None if entry.gpu is None else
                             gpu_at(entry.gpu, view, local_now, redis_now))
            if not self.following.new_round(pool.name, endpoint.url, entry):
                continue
            load = None if entry.load is None else \
                load_at(entry.load, view, local_now, redis_now)
            self.prober.apply_view(endpoint, entry.state if pool.config.health_path else None,
                                   load, bool(pool.config.metrics_path))
        self.following.mark_applied(view)
        self.following.keep_only(pool.name, {e.url for e in pool.endpoints})

    def follow_views(self) -> None:
        """Per pool: follow its fresh view (this sidecar probes none of the endpoints it
        covers), or probe by itself (no monitor, monitor away, Redis away). Says so when
        that changes."""
        monitored = self._monitored()
        if not monitored:
            return
        fresh = self.following.fresh_pools(monitored, self.traffic.clock.now()) \
            if self.store.kind == "redis" else set()
        covered = set()
        for name in fresh:
            pool, entries = self.pools.pools[name], self.following.views[name].endpoints
            for e in pool.endpoints:
                entry = entries.get(e.url)
                # A view without a state (the monitor's pools file has no health_path for
                # this pool) cannot end a cold start here: this sidecar probes it.
                if entry is not None and (entry.state is not None
                                          or not pool.config.health_path):
                    covered.add((name, e.url))
        self.prober.follow(covered)
        probing = set(monitored) - fresh
        for name in probing:  # only the monitor reads GPUs: no fresh view, no reading
            for e in self.pools.pools[name].endpoints:
                e.set_gpu(None)
        before, self._probing_pools = self._probing_pools, probing
        if before is None:
            if probing and self.store.kind == "redis":
                log.info("no fresh pod view for pools %s: this sidecar probes their pods "
                         "itself (run `llm-sidecar monitor` to probe once for the fleet)",
                         ", ".join(sorted(probing)))
            return
        for name in sorted(probing - before):
            bound = STALE_INTERVALS * monitored[name]
            self.telemetry.event("pod view stale", f"pool {name}: no pod view newer than "
                                 f"{bound:.1f} s (monitor or Redis away): this sidecar probes "
                                 "its pods itself", alert_type="warning",
                                 tags=[f"pool:{name}"])
            log.warning("pool %s: the pod view is older than %.1f s (monitor or Redis away): "
                        "probing its pods from this sidecar", name, bound)
        for name in sorted(before - probing):
            self.telemetry.event("pod view fresh", f"pool {name}: following the fleet "
                                 "monitor's pod view again; this sidecar stopped probing",
                                 tags=[f"pool:{name}"])
            log.info("pool %s: following the fleet monitor's pod view; stopped probing", name)

    def view_stats(self) -> dict[str, Any]:
        redis_now = self.traffic.clock.now()
        pools: dict[str, Any] = {}
        for name, interval in self._monitored().items():
            view = self.following.views.get(name)
            pools[name] = {
                "source": "probing" if self._probing_pools is None
                or name in self._probing_pools else "monitor",
                "version": view.version if view else None,
                "age_s": round(view.age(redis_now), 3) if view else None,
                "stale_after_s": STALE_INTERVALS * interval}
        return {"pools": pools, "probing_endpoints": self.prober.probing,
                "notices": getattr(self.store, "views_received", 0),
                "unreadable": self.views_unreadable}

    def _apply_heartbeats(self, names: list[str], replies: list[Any], now: float) -> None:
        """Pools without metrics: each endpoint's load is the fleet's summed in-flight."""
        for name, fields in zip(names, replies, strict=True):
            pool = self.pools.get(name)
            if pool is None or not isinstance(fields, dict):
                continue
            # The stamps are in Redis's clock (traffic.RedisClock), as every sidecar writes them.
            totals, stale = sum_endpoint_inflight(fields, self.traffic.clock.to_redis(now))
            if stale:
                self._stale_heartbeats[name] = stale
            for endpoint in pool.endpoints:
                load = heartbeat_load(totals.get(endpoint.url, 0), 0, now)
                endpoint.set_load(load, saturated(load))

    def collect_metrics(self, t: Telemetry) -> None:
        """Counters kept elsewhere as plain integers, and the gauges, for telemetry."""
        router, store = self.router.counters, self.store.counters
        t.counters[("route_cache_hits", ())] = router.cache_hits
        t.counters[("route_cache_misses", ())] = router.cache_misses
        t.counters[("redis_hits", ())] = store.found
        t.counters[("redis_misses", ())] = store.created
        for kind in ("errors", "timeouts", "skipped"):
            t.counters[("redis_errors", (kind.rstrip("s"),))] = getattr(store, kind)
        t.gauges = {k: v for k, v in t.gauges.items()
                    if k[0] not in ("endpoint_inflight", "endpoint_state", "endpoint_running",
                                    "endpoint_waiting", "endpoint_kv_usage")}
        for name, pool in self.pools.pools.items():
            ready = 0
            for e in pool.endpoints:
                t.gauge("endpoint_inflight", (name, e.url), e.inflight)
                if e.load is not None:  # one series per endpoint: bounded by the config
                    t.gauge("endpoint_running", (name, e.url), e.load.running)
                    t.gauge("endpoint_waiting", (name, e.url), e.load.waiting)
                    t.gauge("endpoint_kv_usage", (name, e.url), e.load.kv_usage)
                t.gauge("endpoint_state", (name, e.url, e.state.value), 1)
                ready += e.state is EndpointState.READY
            t.gauge("pool_ready_endpoints", (name,), ready)
            self._fallback_transition(t, name, pool.fallback, ready)
        t.gauge("load_level", (), ("low", "medium", "high").index(self.router.level))
        t.gauge("route_cache_size", (), len(self.router.cache))
        t.gauge("redis_available", (), 1 if self.store.available else 0)

    def _fallback_transition(self, t: Telemetry, pool: str, fallback: str | None,
                             ready: int) -> None:
        if fallback is None:
            return
        if ready == 0 and pool not in self._pools_on_fallback:
            self._pools_on_fallback.add(pool)
            t.event("fallback started", f"pool {pool} has no ready endpoint: its sessions "
                    f"go to {fallback}", alert_type="warning", tags=[f"pool:{pool}"])
        elif ready and pool in self._pools_on_fallback:
            self._pools_on_fallback.discard(pool)
            t.event("fallback ended", f"pool {pool} has a ready endpoint again",
                    tags=[f"pool:{pool}"])

    async def close(self) -> None:
        await self.telemetry.stop()
        await self.traffic.stop(self.flush_traffic)
        await self.prober.close()
        await self.router.close()
        await self.store.close()
        if self.upstream is not None:
            await self.upstream.aclose()

    def reload(self) -> bool:
        """SIGHUP: re-read the pools file; a bad file keeps the running configuration."""
        if self.settings.pools_file is None:
            log.warning("SIGHUP ignored: pools come from SIDECAR_POOLS (set "
                        "SIDECAR_POOLS_FILE to reload pools without a restart)")
            return False
        try:
            settings = reload_pools(self.settings, self.env)
        except ConfigError as exc:
            log.error("SIGHUP: pools file rejected, keeping the running configuration:\n  %s",
                      "\n  ".join(exc.problems))
            return False
        changes = self.pools.apply(settings.pools, settings.api_keys)
        if self.upstream is not None:  # removed endpoints' pooled connections go too
            self.upstream.retain({e.url for e in self.pools.all_endpoints()})
        self.settings = settings
        self.router.settings = settings
        self.prober.sync()
        self.reloads += 1
        log.info("SIGHUP: pools reloaded (%d endpoints added, %d draining)",
                 len(changes["added"]), len(changes["removed"]))
        return True

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if self.draining:
            reasons.append("draining: shutting down")
        if self.proxy is None:
            reasons.append("starting")
        if not any(pool.has_ready() for pool in self.pools.pools.values()):
            states = {e.url: e.state.value for e in self.pools.all_endpoints()}
            reasons.append(f"no pool has a ready endpoint ({states})")
        return reasons

    def stats(self) -> dict[str, Any]:
        store = self.store
        redis_state: dict[str, Any] = {"kind": store.kind, "available": store.available,
                                       **store.counters.view()}
        if hasattr(store, "incidents"):
            redis_state["incidents"] = store.incidents
        if hasattr(store, "subscriptions"):
            redis_state["pubsub_subscriptions"] = store.subscriptions
            redis_state["changes_received"] = store.changes_received
        endpoint_states: dict[str, int] = {s.value: 0 for s in EndpointState}
        for endpoint in self.pools.all_endpoints():
            endpoint_states[endpoint.state.value] += 1
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "process": process_view(),
            "load_level": self.router.level,
            "draining": self.draining,
            "reloads": self.reloads,
            "proxy": self.proxy.events.view() if self.proxy else {},
            "routes": {**self.router.counters.view(), "cached": len(self.router.cache),
                       "unwritten_moves": self.router.unwritten_moves,
                       "evicted": self.router.cache.evicted,
                       "expired": self.router.cache.expired},
            "store": redis_state,
            "background_tasks": {"restarts": self.supervisor.view(),
                                 "last_error": dict(self.supervisor.last_error),
                                 "running": self.supervisor.running()},
            "endpoint_states": endpoint_states,
            "endpoints": [e.view() for e in self.pools.all_endpoints()],
            "cold_starts": [c.view() for c in self.prober.cold_starts],
            "pools_without_ready_capacity": sorted(
                name for name, pool in self.pools.pools.items() if not pool.has_ready()),
            "traffic": self.traffic.view(),
            "load_level_changes": self.router.level_changes,
            "health_probes": self.prober.probes,
            "pod_view": self.view_stats(),
            "load_scrapes": {"scrapes": self.prober.scrapes,
                             "failures": self.prober.scrape_failures,
                             "parse_failures": self.prober.parse_failures},
        }


def process_view() -> dict[str, int]:
    """This process's resources, for soak tests and operators (Linux procfs)."""
    view = {"asyncio_tasks": len(asyncio.all_tasks())}
    with contextlib.suppress(OSError):
        view["open_fds"] = len(os.listdir("/proc/self/fd"))
    with contextlib.suppress(OSError, ValueError):
        # procfs reads are memory reads: microseconds, fine on the event loop
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                view["rss_bytes"] = int(line.split()[1]) * 1024
    return view


def _write_pod_load_for_scaler(pipe: Any, scraped: dict[str, dict[str, PodLoad]],
                               clock: RedisClock) -> None:
    """The scraped loads, for the scaler (traffic.py's `llmsc:podload:{<pool>}` layout),
    stamped in Redis's clock. Every sidecar of the fleet writes the same pod's latest
    reading; readers skip stale ones."""
    for pool, loads in sorted(scraped.items()):
        key = pod_load_key(pool)
        pipe.hset(key, mapping={url: format_pod_load(round(load.running), round(load.waiting),
                                                     load.kv_usage, clock.to_redis(load.at))
                                for url, load in loads.items()})
        pipe.expire(key, HEARTBEAT_TTL_S)


class Running:
    """A started sidecar: its listeners and where they listen (tests and the demo use it)."""

    def __init__(self, sidecar: Sidecar, listener: Listener, server: asyncio.Server,
                 admin: AdminThread) -> None:
        self.sidecar = sidecar
        self.listener = listener
        self.admin = admin
        name = server.sockets[0].getsockname() if server.sockets else None
        self.port = name[1] if isinstance(name, tuple) else None
        self.admin_port = admin.port

    async def stop(self) -> None:
        """Drain: not ready first, then close the listener and let in-flight requests
        finish; then background work stops and flushes."""
        self.sidecar.draining = True
        await self.listener.drain(self.sidecar.settings.drain_timeout_s)
        await self.sidecar.close()
        await self.admin.stop()


async def listen(listener: Listener, where: Listen) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if where.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where.path)
        server = await loop.create_unix_server(listener.protocol, where.path)
    else:
        server = await loop.create_server(listener.protocol, where.host, where.port,
                                          reuse_address=True)
    listener.server = server
    return server


async def start(settings: Settings, store: RouteStore | None = None,
                env: Mapping[str, str] | None = None) -> Running:
    sidecar = Sidecar(settings, store, env)
    await sidecar.start()
    assert sidecar.proxy is not None
    listener = Listener(sidecar.proxy.handle, settings.session_header,
                        settings.max_body_bytes,
                        lambda exc: log.error("request failed inside the sidecar",
                                              exc_info=exc), sidecar.proxy.events,
                        watched(sidecar.proxy.sources))
    admin = AdminThread(sidecar, settings.admin_listen)
    try:
        server = await listen(listener, settings.listen)
        await admin.start()
    except OSError:
        await listener.drain(0)
        await sidecar.close()
        raise
    for name, where in (("proxy", settings.listen), ("admin", settings.admin_listen)):
        if not where.is_loopback:
            log.warning("the %s listener binds %s, which is NOT loopback: anything that can "
                        "reach this address can use it", name, where)
    if (warning := settings.admin_warning()) is not None:
        log.warning(warning)
    return Running(sidecar, listener, server, admin)


async def serve(settings: Settings) -> int:
    """`llm-sidecar serve`: run until SIGTERM/SIGINT, then drain and exit 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before the listeners open: a SIGTERM that arrives as soon as /health answers drains
    # the sidecar instead of killing it.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        running = await start(settings)
    except OSError as exc:
        log.error("cannot listen: %s (is another process using the port? set "
                  "SIDECAR_LISTEN / SIDECAR_ADMIN_LISTEN)", exc)
        return 1
    # Everything start-up made lives as long as the process: out of the collector's sight,
    # a full collection under load no longer walks it (fewer multi-millisecond pauses).
    gc.collect()
    gc.freeze()
    loop.add_signal_handler(signal.SIGHUP, running.sidecar.reload)
    store = running.sidecar.store
    log.info("llm-sidecar %s listening on %s (admin %s), %d pools, route store: %s",
             __version__, settings.listen, settings.admin_listen, len(settings.pools),
             store.kind)
    if store.kind == "memory":
        log.warning("SIDECAR_REDIS_URL is not set: routes live in this process only "
                    "(fine for one pod; set it so pods share session routes)")
    await stop.wait()
    log.info("draining: finishing in-flight requests (up to %.0f s)", settings.drain_timeout_s)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    await running.stop()
    log.info("stopped")
    return 0
