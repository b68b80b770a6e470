"""Model pools, their endpoints, endpoint states and how an endpoint is picked.

An endpoint is `warming` until its first healthy probe (pools with a `health_path`),
`ready`, `ejected` after failures (exponential back-off, then one half-open request), or
`draining` once a reload removed it. Picking is rendezvous hashing over the session id,
so every pod picks the same endpoint and a removed endpoint moves only its own sessions.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping
from enum import StrEnum
from hashlib import blake2b

from sidecar.config import PoolConfig, Settings
from sidecar.errors import Outcome
from sidecar.models import model_index
from sidecar.placement import choose_new, move_budget
from sidecar.podload import GpuUsage, PodLoad

# A streak of failures that are not "the pod is gone" (5xx, timeouts) ejects at this count.
EJECT_AFTER_FAILURES = 3
EJECT_BACKOFF_BASE_S = 1.0
EJECT_BACKOFF_MAX_S = 60.0
# An upstream's Retry-After is honoured up to this long (a bad header must not park a pod).
MAX_RETRY_AFTER_S = 60.0


class EndpointState(StrEnum):
    WARMING = "warming"
    READY = "ready"
    EJECTED = "ejected"
    DRAINING = "draining"


class Endpoint:
    """One model server (pod). Shared by every route that points at it."""

    __slots__ = ("consecutive_failures", "ejections", "gpu", "held_until", "inflight",
                 "inflight_at_load", "load", "move_budget", "pool", "registered_at",
                 "retry_at", "saturated", "slots", "state", "url", "url_key")

    def __init__(self, url: str, pool: str, state: EndpointState) -> None:
        self.url = url
        self.url_key = url.encode()
        self.pool = pool
        self.state = state
        self.inflight = 0
        self.inflight_at_load = 0  # this sidecar's calls there when `load` was read
        self.consecutive_failures = 0
        self.ejections = 0
        self.retry_at = 0.0
        self.held_until = 0.0  # the upstream asked us to wait (Retry-After)
        self.registered_at = time.monotonic()
        # The pod's own load (metrics scrape or the fleet's heartbeats), set in the
        # background by `set_load`; read on the request path only as these fields.
        self.load: PodLoad | None = None
        self.saturated = False
        self.move_budget = 0  # sessions this sidecar may still move away until the next view
        # Its GPUs as Nomad reports them (the fleet monitor reads them; its view carries
        # them to every sidecar). Not read on the request path.
        self.gpu: GpuUsage | None = None
        self.slots = 0.0  # requests the pod ran the last time it queued (0: never seen)

    def set_load(self, load: PodLoad | None, saturated: bool, shared: bool = False) -> None:
        """`shared`: the fleet monitor's view, which every sidecar reads at the same time."""
        self.load = load
        self.saturated = saturated
        self.inflight_at_load = self.inflight
        if load is not None and load.waiting >= 1 and load.running > 0:
            self.slots = load.running  # a queue means every slot it runs now is taken
        # At most as many sessions leave per view as the pod has calls queued, fleet-wide:
        # moving more would only empty a pod that is about to have room again.
        self.move_budget = move_budget(load, self.inflight, shared, random.random()) \
            if saturated else 0

    def set_gpu(self, gpu: GpuUsage | None) -> None:
        self.gpu = gpu

    def usable(self, now: float) -> bool:
        """Can a request be sent here now? An ejected endpoint admits one half-open try."""
        if self.state is EndpointState.READY:
            return now >= self.held_until
        if self.state is EndpointState.EJECTED and now >= self.retry_at:
            # Hold off the rest until this try's result is known.
            self.retry_at = now + self._backoff()
            return True
        return False

    def has_room(self, now: float) -> bool:
        """Room for one more session right now: ready, not saturated, not holding off. A
        query only (unlike `usable`, it never admits an ejected endpoint's trial call)."""
        return self.state is EndpointState.READY and not self.saturated \
            and now >= self.held_until

    def record_success(self) -> bool:
        """Returns True when this success restored an ejected endpoint."""
        self.consecutive_failures = 0
        if self.state is EndpointState.EJECTED:
            self.state = EndpointState.READY
            self.ejections = 0
            return True
        return False

    def record_failure(self, outcome: Outcome, now: float) -> bool:
        """Passive outlier detection. Returns True when this failure ejected the endpoint."""
        self.consecutive_failures += 1
        if self.state not in (EndpointState.READY, EndpointState.EJECTED):
            return False
        if self.state is EndpointState.EJECTED:
            self.retry_at = now + self._backoff()
            return False
        if outcome.endpoint_unreachable or self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.eject()
            self.retry_at = now + self._backoff()
            return True
        return False

    def probe_passed(self) -> float | None:
        """A healthy active probe. Returns the cold start's duration when it ended one."""
        self.consecutive_failures = 0
        if self.state is EndpointState.WARMING:
            self.state = EndpointState.READY
            return time.monotonic() - self.registered_at
        return None

    def loading(self) -> bool:
        """The pod answers that it is loading its model. Returns True when this sends a
        ready (or ejected) endpoint back to warming: a restart in place, a cold start whose
        end its next healthy probe reports, not a failure."""
        if self.state not in (EndpointState.READY, EndpointState.EJECTED):
            return False
        self.state = EndpointState.WARMING
        self.consecutive_failures = 0
        self.registered_at = time.monotonic()
        return True

    def probe_failed(self) -> bool:
        """A failed active probe. Returns True when this one ejected a ready endpoint (only
        a healthy probe restores it)."""
        if self.state is not EndpointState.READY:
            return False
        self.consecutive_failures += 1
        if self.consecutive_failures < EJECT_AFTER_FAILURES:
            return False
        self.eject(retry_at=float("inf"))
        return True

    def drain(self) -> None:
        """Removed from the configuration: nothing new is sent; in-flight requests finish."""
        self.state = EndpointState.DRAINING

    def eject(self, retry_at: float | None = None) -> None:
        """Stop sending here. With `retry_at`, one half-open try is allowed from then;
        an active prober passes infinity, as only a healthy probe restores the endpoint."""
        self.state = EndpointState.EJECTED
        self.ejections += 1
        if retry_at is not None:
            self.retry_at = retry_at

    def hold(self, seconds: float, now: float) -> None:
        """Respect an upstream's Retry-After: send nothing new here until it has passed."""
        self.held_until = max(self.held_until, now + min(seconds, MAX_RETRY_AFTER_S))

    def _backoff(self) -> float:
        return min(EJECT_BACKOFF_MAX_S, EJECT_BACKOFF_BASE_S * 2 ** max(0, self.ejections - 1))

    def view(self) -> dict[str, object]:
        now = time.monotonic()
        view: dict[str, object] = {
            "url": self.url, "pool": self.pool, "state": self.state.value,
            "inflight": self.inflight, "consecutive_failures": self.consecutive_failures,
            "load": None if self.load is None else {**self.load.view(),
                                                   "saturated": self.saturated},
            "gpu": None if self.gpu is None else self.gpu.view()}
        if self.held_until > now:
            view["held_for_s"] = round(self.held_until - now, 3)
        if self.state is EndpointState.EJECTED and self.retry_at != float("inf"):
            view["retry_in_s"] = round(max(0.0, self.retry_at - now), 3)
        return view


def rendezvous_score(session_key: bytes, endpoint: Endpoint) -> int:
    return int.from_bytes(
        blake2b(session_key + b"\x00" + endpoint.url_key, digest_size=8).digest(), "big")


class Pool:
    """A set of interchangeable endpoints serving one model."""

    __slots__ = ("auth_header", "config", "endpoints", "name")

    def __init__(self, config: PoolConfig, endpoints: list[Endpoint],
                 api_key: str | None) -> None:
        self.name = config.name
        self.config = config
        self.endpoints = endpoints
        self.auth_header = f"Bearer {api_key}" if api_key else None

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def fallback(self) -> str | None:
        return self.config.fallback

    def ranked(self, session_key: bytes) -> list[Endpoint]:
        """Endpoints that take new work, best rendezvous score first."""
        live = [e for e in self.endpoints if e.state is not EndpointState.DRAINING]
        live.sort(key=lambda e: rendezvous_score(session_key, e), reverse=True)
        return live

    def pick(self, session_key: bytes, load_factor: float = 0.0) -> Endpoint | None:
        """A new session's endpoint: among its first few ready endpoints by rendezvous rank,
        the first that is unsaturated and within `load_factor` × the pool's mean load (the
        pods' own load when known, else in-flight counts: bounded-load hashing on real
        load); else the least loaded of those few (see placement.choose_new)."""
        ranked = self.ranked(session_key)
        ready = [e for e in ranked if e.state is EndpointState.READY]
        if not ready:
            return ranked[0] if ranked else None
        if len(ready) == 1:
            return ready[0]
        return ready[choose_new([e.load for e in ready], [e.inflight for e in ready],
                                load_factor, [e.inflight - e.inflight_at_load for e in ready])]

    def first_ready(self, session_key: bytes) -> Endpoint | None:
        """A new session's endpoint by rendezvous alone, whatever the loads: what every
        sidecar computes alike when they cannot share a route (the store is away)."""
        ranked = self.ranked(session_key)
        return next((e for e in ranked if e.state is EndpointState.READY),
                    ranked[0] if ranked else None)

    def has_warming(self) -> bool:
        return any(e.state is EndpointState.WARMING for e in self.endpoints)

    def has_ready(self) -> bool:
        return any(e.state is EndpointState.READY for e in self.endpoints)


class PoolSet:
    """All pools, rebuilt on reload while keeping the state of endpoints that stay."""

    def __init__(self, settings: Settings) -> None:
        self.pools: dict[str, Pool] = {}
        self.models: dict[str, str] = {}  # model name or alias → the pool it names
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self.apply(settings.pools, settings.api_keys)

    def apply(self, configs: Mapping[str, PoolConfig], api_keys: Mapping[str, str]
              ) -> dict[str, list[str]]:
        """Install a configuration. Removed endpoints go `draining`; returns what changed."""
        changes: dict[str, list[str]] = {"added": [], "removed": []}
        kept: dict[tuple[str, str], Endpoint] = {}
        pools: dict[str, Pool] = {}
        for name, config in configs.items():
            endpoints = []
            for url in config.endpoints:
                endpoint = self._endpoints.get((name, url))
                if endpoint is None or endpoint.state is EndpointState.DRAINING:
                    initial = EndpointState.WARMING if config.health_path else EndpointState.READY
                    endpoint = Endpoint(url, name, initial)
                    changes["added"].append(url)
                kept[(name, url)] = endpoint
                endpoints.append(endpoint)
            pools[name] = Pool(config, endpoints, api_keys.get(name))
        for key, endpoint in self._endpoints.items():
            if key not in kept:
                endpoint.drain()
                changes["removed"].append(endpoint.url)
        self.pools = pools
        self.models = model_index(configs)
        self._endpoints = kept
        return changes

    def get(self, name: str) -> Pool | None:
        return self.pools.get(name)

    def endpoint(self, pool: str, url: str) -> Endpoint | None:
        return self._endpoints.get((pool, url))

    def fallback_chain(self, start: str) -> Iterable[Pool]:
        """The pools after `start` in its fallback chain (config guarantees no loops)."""
        pool = self.pools.get(start)
        while pool is not None and pool.fallback:
            pool = self.pools.get(pool.fallback)
            if pool is not None:
                yield pool

    def all_endpoints(self) -> list[Endpoint]:
        return [e for pool in self.pools.values() for e in pool.endpoints]
