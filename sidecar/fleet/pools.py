"""Model pools, their endpoints and how an endpoint is picked.

An endpoint's state (`warming`, `ready`, `ejected`, `draining`) belongs to its outlier
detector (outlier.py); its load is set by loads.py. Picking is rendezvous hashing over
the session id, so every pod picks the same endpoint and a removed endpoint moves only its
own sessions.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from hashlib import blake2b

from sidecar.config import PoolConfig, Settings
from sidecar.fleet.outlier import EndpointState, Outlier
from sidecar.fleet.podload import GpuUsage, PodLoad
from sidecar.policy.models import model_index
from sidecar.policy.placement import PREFIX_BYTES, choose_new, move_budget

# Prompt prefixes (fingerprints) this sidecar sent to a pod past their session's own pod,
# remembered per pod: the most recent first to stay. A pod's prefix cache holds thousands of
# conversations; this many keeps the memory to ~100 KB per pod.
PREFIXES_REMEMBERED = 1024


def prefix_key(body: bytes) -> bytes:
    """A call's prompt prefix as a pod's memory keeps it: a digest of the body's first
    PREFIX_BYTES (model and options, then the messages in order)."""
    return blake2b(body[:PREFIX_BYTES], digest_size=8).digest()


class Endpoint:
    """One model server (pod). Shared by every route that points at it."""

    __slots__ = ("gpu", "inflight", "inflight_at_load", "load", "move_budget", "outlier",
                 "placed", "pool", "prefixes", "saturated", "slots", "url", "url_key")

    def __init__(self, url: str, pool: str, state: EndpointState) -> None:
        self.url = url
        self.url_key = url.encode()
        self.pool = pool
        # Its health state, failure streak, ejections and holds: the outlier detector owns
        # them; everything else reports to it or asks it.
        self.outlier = Outlier(state)
        self.inflight = 0  # owned by the attempt loop's lease
        self.inflight_at_load = 0  # this sidecar's calls there when `load` was read
        # New sessions this sidecar started here since `load` was read: sessions that start
        # in one burst are placed before any of their calls is in flight.
        self.placed = 0
        # The pod's own load (metrics scrape or the fleet's heartbeats), set in the
        # background by loads.py through `set_load`; read on the request path only as
        # these fields.
        self.load: PodLoad | None = None
        self.saturated = False
        self.move_budget = 0  # sessions this sidecar may still move away until the next view
        # Its GPUs as Nomad reports them (the fleet monitor reads them; its view carries
        # them to every sidecar). Not read on the request path.
        self.gpu: GpuUsage | None = None
        self.slots = 0.0  # requests the pod ran the last time it queued (0: never seen)
        self.prefixes: OrderedDict[bytes, None] = OrderedDict()  # see `sent_prefix`

    @property
    def state(self) -> EndpointState:
        return self.outlier.state

    def set_load(self, load: PodLoad | None, saturated: bool, shared: bool = False) -> None:
        """Only loads.py calls this (it judges `saturated` once for every source).
        `shared`: the fleet monitor's view, which every sidecar reads at the same time."""
        self.load = load
        self.saturated = saturated
        self.inflight_at_load = self.inflight
        self.placed = 0
        if load is not None and load.waiting >= 1 and load.running > 0:
            self.slots = load.running  # a queue means every slot it runs now is taken
        # At most as many sessions leave per view as the pod has calls queued, fleet-wide:
        # moving more would only empty a pod that is about to have room again.
        self.move_budget = move_budget(load, self.inflight, shared, random.random()) \
            if saturated else 0

    def set_gpu(self, gpu: GpuUsage | None) -> None:
        self.gpu = gpu

    def take_session(self) -> None:
        """A new session starts here (counted until the next reading: `since_load`)."""
        self.placed += 1

    def expect_calls(self, calls: int) -> None:
        """Calls of a session whose first touch is under way will come here with it
        (counted like a new session, until the next reading); negative: they went
        elsewhere after all."""
        self.placed = max(0, self.placed + calls)

    def since_load(self) -> int:
        """This sidecar's news the reading lacks, for placing a new session: its calls
        there since (net of those that ended) plus the sessions it started there since and
        the calls waiting on their first touch."""
        return self.inflight - self.inflight_at_load + self.placed

    def sent_prefix(self, prefix: bytes) -> None:
        """A call whose prompt starts with `prefix` (`prefix_key`) was sent here past its
        session's own pod: the pod's prefix cache holds it for a while."""
        self.prefixes[prefix] = None
        self.prefixes.move_to_end(prefix)
        if len(self.prefixes) > PREFIXES_REMEMBERED:
            self.prefixes.popitem(last=False)

    def take_move(self) -> None:
        """One session of this saturated pod is moving away (spends the move budget)."""
        self.move_budget -= 1

    def view(self) -> dict[str, object]:
        now = time.monotonic()
        health = self.outlier
        view: dict[str, object] = {
            "url": self.url, "pool": self.pool, "state": health.state.value,
            "inflight": self.inflight, "consecutive_failures": health.consecutive_failures,
            "load": None if self.load is None else {**self.load.view(),
                                                   "saturated": self.saturated},
            "gpu": None if self.gpu is None else self.gpu.view()}
        if health.held_until > now:
            view["held_for_s"] = round(health.held_until - now, 3)
        if health.state is EndpointState.EJECTED and health.retry_at != float("inf"):
            view["retry_in_s"] = round(max(0.0, health.retry_at - now), 3)
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
        chosen = ready[choose_new([e.load for e in ready], [e.inflight for e in ready],
                                  load_factor, [e.since_load() for e in ready],
                                  [e.slots for e in ready])]
        chosen.take_session()
        return chosen

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
                endpoint.outlier.drain()
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
