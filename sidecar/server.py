"""Listeners, start-up, reload and graceful drain.

    start-up: settings → Sidecar (pools, store, router, upstream engine, prober, fleet
              load) → listeners
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
from sidecar.fleet.health import HealthProber
from sidecar.fleet.loads import FleetLoad
from sidecar.fleet.pools import EndpointState, PoolSet
from sidecar.fleet.traffic import Traffic
from sidecar.routing.router import Router
from sidecar.routing.sessionkeys import watched
from sidecar.routing.store import RouteStore, make_store
from sidecar.supervise import Supervisor
from sidecar.telemetry import Telemetry

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
        # Pod loads, the fleet's heartbeats and the monitor's pod views (fleet/loads.py).
        self.fleet = FleetLoad(self.pools, self.store, self.traffic, self.prober,
                               self.telemetry)
        self._pools_on_fallback: set[str] = set()
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
        await self.fleet.start()  # before probing: fresh views are followed, not probed
        await self.prober.start()
        self.traffic.start(self.fleet.flush, self.supervisor)
        self.telemetry.start(self.supervisor)

    async def flush_traffic(self) -> None:
        """One flush now (loads.FleetLoad.flush), as the background loop makes."""
        await self.fleet.flush()

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
        await self.traffic.stop(self.fleet.flush)
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
            "pod_view": self.fleet.view_stats(),
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
