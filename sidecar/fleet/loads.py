"""Pod load's one owner: each endpoint's load (a metrics scrape, the fleet's heartbeats, the
monitor's view) is set here, `saturated` judged once; with it, the books of the flush that
shares loads through Redis, which pools follow the monitor's view, and the keys' layout.

Layout (sidecars write, sidecars and the scaler read; times are Redis's, see
traffic.RedisClock; the pod views' `llmsc:podview:{<pool>}` layout is podview.py's):

    llmsc:epinflight:{<pool>}   hash: "<pod id> <endpoint URL>" → "<in-flight>:<unix time>"
                                (each sidecar's in-flight per endpoint at each flush; summed
                                by URL it is each model pod's fleet-wide load, for pools
                                without a metrics path; stale fields are pruned)
    llmsc:podload:{<pool>}      hash: <endpoint URL> →
                                "<running>:<waiting>:<kv_usage 0..1>:<unix time>"
                                (each model pod's load as its /metrics show it, written by
                                the sidecars that scrape it with format_pod_load, then
                                EXPIRE HEARTBEAT_TTL_S; the scaler ignores and prunes fields
                                older than STALE_AFTER_S)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.fleet.podload import PodLoad, heartbeat_load, with_rate
from sidecar.fleet.podview import (
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
from sidecar.fleet.traffic import HEARTBEAT_TTL_S, STALE_AFTER_S, RedisClock, Traffic, prune
from sidecar.policy.placement import saturated
from sidecar.routing.store import RouteStore, StoreUnavailable

if TYPE_CHECKING:
    from sidecar.fleet.health import HealthProber
    from sidecar.fleet.pools import Endpoint, PoolSet
    from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar.loads")

# A scraped load older than this many probe intervals is dropped (routing stops using it).
LOAD_STALE_INTERVALS = 3


# -- the layout ------------------------------------------------------------------------------

def endpoint_inflight_key(pool: str) -> str:
    return f"llmsc:epinflight:{{{pool}}}"


def sum_endpoint_inflight(fields: dict[bytes, bytes], now: float
                          ) -> tuple[dict[str, int], list[bytes]]:
    """Fleet-wide in-flight per endpoint URL from one `llmsc:epinflight` hash, and the stale
    fields (sidecars that stopped heartbeating) to prune."""
    totals: dict[str, int] = {}
    stale: list[bytes] = []
    for name, value in fields.items():
        count, _, stamp = value.partition(b":")
        _, _, url = name.partition(b" ")
        try:
            fresh = now - float(stamp or 0) <= STALE_AFTER_S
            n = int(count)
        except ValueError:
            fresh, n = False, 0
        if not fresh or not url:
            stale.append(name)
            continue
        key = url.decode(errors="replace")
        totals[key] = totals.get(key, 0) + n
    return totals, stale


def pod_load_key(pool: str) -> str:
    return f"llmsc:podload:{{{pool}}}"


def format_pod_load(running: int, waiting: int, kv_usage: float, now: float) -> str:
    """The value a sidecar writes for one endpoint: `HSET pod_load_key(pool) <url> <this>`."""
    if running < 0 or waiting < 0 or not 0.0 <= kv_usage <= 1.0:
        raise ValueError(f"pod load: running={running!r} and waiting={waiting!r} must be >= 0, "
                         f"kv_usage={kv_usage!r} in 0..1")
    return f"{int(running)}:{int(waiting)}:{kv_usage:.4f}:{now:.3f}"


def parse_pod_load(value: bytes | str) -> tuple[int, int, float, float] | None:
    """(running, waiting, kv_usage, unix time), or None for a value not in that form."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    parts = text.split(":")
    if len(parts) != 4:
        return None
    try:
        running, waiting = int(parts[0]), int(parts[1])
        kv_usage, stamp = float(parts[2]), float(parts[3])
    except ValueError:
        return None
    if running < 0 or waiting < 0 or not 0.0 <= kv_usage <= 1.0:
        return None
    return running, waiting, kv_usage, stamp


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """What a pool's model pods report about themselves (fresh reports only)."""

    pods: int                    # endpoints with a fresh report (0: unknown)
    running: int
    waiting: int
    kv_usage: float              # highest KV-cache usage among them (0..1)

    @property
    def queued(self) -> float | None:
        """Requests waiting per request running: the saturation signal (None: unknown)."""
        if not self.pods:
            return None
        return self.waiting / max(self.running, 1)


async def read_pod_load(client: Any, pools: Iterable[str], now: float
                        ) -> dict[str, PoolLoad]:
    """The scaler's read: one pipelined read of every pool's pod-load hash; reports older
    than STALE_AFTER_S (or not in the written form) are ignored, and pruned in a second
    round trip."""
    pools = list(pools)
    async with client.pipeline(transaction=False) as pipe:
        for pool in pools:
            pipe.hgetall(pod_load_key(pool))
        replies = await pipe.execute()
    view: dict[str, PoolLoad] = {}
    stale: dict[str, list[bytes]] = {}
    for pool, fields in zip(pools, replies, strict=True):
        pods = running = waiting = 0
        kv = 0.0
        for endpoint, value in fields.items():
            parsed = parse_pod_load(value)
            if parsed is None or now - parsed[3] > STALE_AFTER_S:
                stale.setdefault(pool, []).append(endpoint)
                continue
            pods += 1
            running += parsed[0]
            waiting += parsed[1]
            kv = max(kv, parsed[2])
        view[pool] = PoolLoad(pods, running, waiting, kv)
    await prune(client, pod_load_key, stale)
    return view


# -- one endpoint's load ------------------------------------------------------------------------

def take_reading(endpoint: Endpoint, load: PodLoad | None, shared: bool = False) -> None:
    """Every load an endpoint gets comes through here (None: unknown). `shared`: the
    monitor's view, which every sidecar reads at the same time."""
    endpoint.set_load(load, load is not None and saturated(load), shared)


def scraped(endpoint: Endpoint, load: PodLoad) -> None:
    """A fresh reading of the pod's metrics (its rate from the last one)."""
    take_reading(endpoint, with_rate(endpoint.load, load))


def scrape_failed(endpoint: Endpoint, interval: float, now: float) -> None:
    """An unreadable metrics page keeps the last reading until it is stale."""
    last = endpoint.load
    if last is not None and now - last.at > LOAD_STALE_INTERVALS * interval:
        take_reading(endpoint, None)


# -- this sidecar's books -------------------------------------------------------------------

class FleetLoad:
    """The flush's fleet half and the pod views: per-endpoint heartbeats written and summed,
    scraped loads published for the scaler, and, per pool, following the monitor's fresh
    view (the prober leaves its endpoints alone) or probing here."""

    def __init__(self, pools: PoolSet, store: RouteStore, traffic: Traffic,
                 prober: HealthProber, telemetry: Telemetry) -> None:
        self.pools = pools
        self.store = store
        self.traffic = traffic
        self.prober = prober
        self.telemetry = telemetry
        # The fleet monitor's pod views (podview.py): while a pool's view is fresh this
        # sidecar follows it and probes none of its pods; stale or absent, it probes them.
        self.following = Following()
        self.views_unreadable = 0
        self._probing_pools: set[str] | None = None  # None: not decided yet
        self._stale_heartbeats: dict[str, list[bytes]] = {}
        store.on_view(self._view_notice)

    async def start(self) -> None:
        """Before the prober starts: where a monitor publishes fresh views, this sidecar
        starts by following them and never probes."""
        if self.store.kind == "redis" and self.monitored():
            await self.flush()
        self.follow_views()

    async def flush(self) -> None:
        """One pipelined round trip: this pod's counts since the last flush, its in-flight
        heartbeats (per pool and per endpoint), the scraped pod loads for the scaler, and
        the read of the fleet's per-endpoint heartbeats for pools without `metrics_path`
        and of the pod views (store.write keeps it within the Redis budget; an incident if
        Redis is away)."""
        inflight: dict[str, int] = {}
        endpoints: dict[str, dict[str, int]] = {}
        scraped_loads: dict[str, dict[str, PodLoad]] = {}
        for name, pool in self.pools.pools.items():
            inflight[name] = sum(e.inflight for e in pool.endpoints)
            endpoints[name] = {e.url: e.inflight for e in pool.endpoints}
            loads = {e.url: e.load for e in pool.endpoints
                     if e.load is not None and e.load.source == "metrics"}
            if loads:
                scraped_loads[name] = loads
        heartbeat_pools = [name for name, pool in self.pools.pools.items()
                           if not pool.config.metrics_path and pool.endpoints]
        view_pools = list(self.monitored()) if self.store.kind == "redis" else []
        stale, self._stale_heartbeats = self._stale_heartbeats, {}
        traffic = self.traffic
        clock = traffic.clock
        now = clock.local()
        counted = True

        def build(pipe: Any) -> None:
            nonlocal counted
            counted = traffic.write(pipe, inflight, now)  # its clock first
            if counted:
                _write_heartbeats(pipe, traffic.pod_id, endpoints, clock.to_redis(now))
            _write_pod_load_for_scaler(pipe, scraped_loads, clock)
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
                        and now - e.load.at > STALE_AFTER_S:
                    take_reading(e, None)
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
            await self.flush()  # the first flush only learned Redis's clock

    def monitored(self) -> dict[str, float]:
        """Pools whose pods are probed or scraped → their health interval."""
        return {name: pool.config.health_interval_s for name, pool in self.pools.pools.items()
                if pool.config.health_path or pool.config.metrics_path}

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
                take_reading(endpoint, heartbeat_load(totals.get(endpoint.url, 0), 0, now))

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
        """A newer view of a pool, if fresh, moves its endpoints: their state by the
        prober's own methods, their load here."""
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
            if pool.config.health_path:
                self.prober.apply_view(endpoint, entry.state)
            if pool.config.metrics_path:
                take_reading(endpoint, None if entry.load is None else
                             load_at(entry.load, view, local_now, redis_now), shared=True)
        self.following.mark_applied(view)
        self.following.keep_only(pool.name, {e.url for e in pool.endpoints})

    def follow_views(self) -> None:
        """Per pool: follow its fresh view (this sidecar probes none of the endpoints it
        covers), or probe by itself (no monitor, monitor away, Redis away). Says so when
        that changes."""
        monitored = self.monitored()
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
        for name, interval in self.monitored().items():
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


def _write_heartbeats(pipe: Any, pod_id: str, endpoints: dict[str, dict[str, int]],
                      now: float) -> None:
    """This sidecar's in-flight per endpoint (pool → URL → count), stamped `now` in
    Redis's clock."""
    for pool, counts in sorted(endpoints.items()):
        if counts:
            key = endpoint_inflight_key(pool)
            pipe.hset(key, mapping={f"{pod_id} {url}": f"{n}:{now:.3f}"
                                    for url, n in counts.items()})
            pipe.expire(key, HEARTBEAT_TTL_S)


def _write_pod_load_for_scaler(pipe: Any, scraped: dict[str, dict[str, PodLoad]],
                               clock: RedisClock) -> None:
    """The scraped loads, for the scaler, stamped in Redis's clock. Every sidecar of the
    fleet writes the same pod's latest reading; readers skip stale ones."""
    for pool, loads in sorted(scraped.items()):
        key = pod_load_key(pool)
        pipe.hset(key, mapping={url: format_pod_load(round(load.running), round(load.waiting),
                                                     load.kv_usage, clock.to_redis(load.at))
                                for url, load in loads.items()})
        pipe.expire(key, HEARTBEAT_TTL_S)
