"""The fleet monitor's pod view: what `llm-sidecar monitor` publishes per pool (each endpoint's
state and load), its Redis layout, its encoding, and when a sidecar may follow it instead of
probing the pods itself. Pure: values in, values out; the monitor and the sidecar do the I/O.

Layout (the monitor writes, every sidecar reads; both sides use only this module):

    llmsc:podview:{<pool>}    hash: version (HINCRBY, +1 per write), at (Redis `TIME` of
                              the write, "<s>.<µs>"), view (JSON: endpoint URL →
                              {"state", "load", "n", "gpu"}); PEXPIRE STALE_INTERVALS ×
                              the interval. Written after each probe round of an endpoint
                              and every interval; "n" names the round, so a sidecar
                              applies each round once however often it reads the view
    llmsc:podview             channel: "<pool>\\0<version>\\0<at>\\0<view>", published in the
                              same script as every write (a state change at once, each
                              reading as it is written), so the hash is only the backstop
    llmsc:monitor:leader      the monitor's lock (one monitor probes; the others wait)

One key per pool: on Cluster each lands in its own slot (a sidecar's pipelined read of a
few pools is one round trip per node holding one of them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from sidecar.fleet.podload import GpuUsage, PodLoad

VIEW_CHANNEL = "llmsc:podview"
MONITOR_LEADER_KEY = "llmsc:monitor:leader"
# A view older than this many of its pool's health intervals is stale: the monitor (or Redis)
# is away, and each sidecar probes the pool's pods itself until a fresh view arrives. Three:
# one interval late is jitter (±20 %) plus a slow probe; the monitor's lock lives two
# intervals, so a standby monitor takes over and writes before a view goes stale.
STALE_INTERVALS = 3
MAX_VIEW_BYTES = 1024 * 1024  # a view larger than this is refused, not parsed


def view_key(pool: str) -> str:
    # The braces are a Cluster hash tag: the view shares its pool's slot with
    # llmsc:podload:{<pool>} and the other per-pool keys.
    return f"llmsc:podview:{{{pool}}}"


class ViewState(StrEnum):
    WARMING = "warming"   # not yet healthy since it started, or loading its model again
    READY = "ready"
    FAILING = "failing"   # failed its probes in a row (ejected by the monitor)


class ViewError(ValueError):
    """A view or notice that cannot be read (another version wrote it, or it is corrupt)."""


@dataclass(frozen=True, slots=True)
class EndpointView:
    state: ViewState | None   # None: the monitor does not probe this pool's health
    load: PodLoad | None      # `at` is the age in seconds at the write, not a time
    round: str = ""           # which probe round this is ("": apply on every read)
    gpu: GpuUsage | None = None  # `at` is the age in seconds at the write; None: not read


@dataclass(frozen=True, slots=True)
class PoolView:
    pool: str
    version: int
    at: float                 # Redis's clock when the monitor wrote it
    endpoints: Mapping[str, EndpointView]

    def age(self, redis_now: float) -> float:
        return max(0.0, redis_now - self.at)

    def fresh(self, redis_now: float, interval_s: float) -> bool:
        return self.age(redis_now) <= STALE_INTERVALS * interval_s


def state_of(endpoint_state: str) -> ViewState | None:
    """An endpoint state (pools.EndpointState's value) as the view says it."""
    return {"warming": ViewState.WARMING, "ready": ViewState.READY,
            "ejected": ViewState.FAILING}.get(endpoint_state)


def encode(endpoints: Mapping[str, EndpointView], now: float) -> str:
    """The `view` field: loads carry their age at `now` (clocks differ between hosts)."""
    out: dict[str, dict[str, object]] = {}
    for url, entry in sorted(endpoints.items()):
        load = None
        if entry.load is not None:
            load = [entry.load.running, entry.load.waiting, round(entry.load.kv_usage, 4),
                    round(entry.load.rate, 3), entry.load.completed,
                    round(max(0.0, now - entry.load.at), 3)]
        gpu = None
        if entry.gpu is not None:
            gpu = [round(entry.gpu.utilization, 4), round(entry.gpu.memory, 4),
                   entry.gpu.devices, round(max(0.0, now - entry.gpu.at), 3)]
        out[url] = {"state": entry.state.value if entry.state else None, "load": load,
                    "n": entry.round, "gpu": gpu}
    return json.dumps(out, separators=(",", ":"))


def decode(pool: str, version: bytes | str | int, at: bytes | str | float,
           body: bytes | str) -> PoolView:
    """A view from the hash's fields (or a notice's parts); raises ViewError."""
    if len(body) > MAX_VIEW_BYTES:
        raise ViewError(f"view of pool {pool} is {len(body)} bytes, over the limit")
    try:
        raw = json.loads(body)
        number = int(version)
        stamp = float(at)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        endpoints: dict[str, EndpointView] = {}
        for url, item in raw.items():
            state = ViewState(item["state"]) if item.get("state") is not None else None
            load = None
            if item.get("load") is not None:
                running, waiting, kv, rate, completed, age = (float(x) for x in item["load"])
                if min(running, waiting, kv, rate, completed, age) < 0 or kv > 1:
                    raise ValueError(f"bad load for {url}")
                load = PodLoad(running, waiting, kv, age, "metrics", completed, rate)
            gpu = None
            if item.get("gpu") is not None:
                utilization, memory, devices, gpu_age = (float(x) for x in item["gpu"])
                if not (0 <= utilization <= 1 and 0 <= memory <= 1) or devices < 0 \
                        or gpu_age < 0:
                    raise ValueError(f"bad gpu reading for {url}")
                gpu = GpuUsage(utilization, memory, int(devices), gpu_age)
            endpoints[str(url)] = EndpointView(state, load, str(item.get("n") or ""), gpu)
    except (ValueError, TypeError, KeyError) as exc:
        raise ViewError(f"view of pool {pool} unreadable: {exc}") from None
    return PoolView(pool, number, stamp, endpoints)


def parse_notice(data: bytes) -> PoolView:
    """A state-change notice from VIEW_CHANNEL: the view itself, so applying it costs no read."""
    parts = data.split(b"\0", 3)
    if len(parts) != 4:
        raise ViewError("notice without its four parts")
    return decode(parts[0].decode(errors="replace"), parts[1], parts[2], parts[3])


def load_at(entry_load: PodLoad, view: PoolView, local_now: float, redis_now: float) -> PodLoad:
    """An entry's load with its observation time on this host's clock."""
    at = local_now - view.age(redis_now) - entry_load.at
    return PodLoad(entry_load.running, entry_load.waiting, entry_load.kv_usage, at,
                   entry_load.source, entry_load.completed, entry_load.rate)


def gpu_at(entry_gpu: GpuUsage, view: PoolView, local_now: float, redis_now: float
           ) -> GpuUsage:
    """An entry's GPU reading with its time on this host's clock."""
    at = local_now - view.age(redis_now) - entry_gpu.at
    return GpuUsage(entry_gpu.utilization, entry_gpu.memory, entry_gpu.devices, at)


class Action(StrEnum):
    HEALTHY = "healthy"   # as a healthy probe: ends a cold start, restores an ejected one
    LOADING = "loading"   # as a "loading model" answer: back to warming
    EJECT = "eject"       # the monitor ejected it: stop sending here until it is ready
    NONE = "none"


def action_for(view_state: ViewState | None, endpoint_state: str) -> Action:
    """What a sidecar does to its endpoint (in `endpoint_state`) when the view says
    `view_state`. A draining endpoint is left alone; a warming one the monitor has not seen
    healthy stays warming."""
    if view_state is None or endpoint_state == "draining":
        return Action.NONE
    if view_state is ViewState.READY:
        return Action.HEALTHY if endpoint_state in ("warming", "ejected") else Action.NONE
    if view_state is ViewState.WARMING:
        return Action.LOADING if endpoint_state in ("ready", "ejected") else Action.NONE
    return Action.EJECT if endpoint_state == "ready" else Action.NONE


class Following:
    """Per pool, the newest view this sidecar holds and which one it applied last."""

    def __init__(self) -> None:
        self.views: dict[str, PoolView] = {}
        self.applied: dict[str, tuple[int, float]] = {}
        self.rounds: dict[tuple[str, str], str] = {}

    def offer(self, view: PoolView) -> bool:
        """Keep `view` unless the one held is as new; True when it is still to apply. (A
        view key that expired restarts its version at 1: its later `at` still wins.)"""
        held = self.views.get(view.pool)
        if held is not None and view.version <= held.version and view.at <= held.at:
            return False
        self.views[view.pool] = view
        return (view.version, view.at) != self.applied.get(view.pool)

    def mark_applied(self, view: PoolView) -> None:
        self.applied[view.pool] = (view.version, view.at)

    def new_round(self, pool: str, url: str, entry: EndpointView) -> bool:
        """True the first time an endpoint's probe round is seen: its state and load are
        applied once, as one probe's result would be (a ready reading restores an ejected
        endpoint once per round, and a move budget is granted once per reading)."""
        key = (pool, url)
        if entry.round and self.rounds.get(key) == entry.round:
            return False
        self.rounds[key] = entry.round
        return True

    def keep_only(self, pool: str, urls: set[str]) -> None:
        """Forget the rounds of a pool's endpoints that left the configuration."""
        for key in [k for k in self.rounds if k[0] == pool and k[1] not in urls]:
            del self.rounds[key]

    def fresh_pools(self, intervals: Mapping[str, float], redis_now: float) -> set[str]:
        """The pools (of `intervals`: pool → health interval) whose view is fresh."""
        return {pool for pool, interval in intervals.items()
                if (view := self.views.get(pool)) is not None
                and view.fresh(redis_now, interval)}
