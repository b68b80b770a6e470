"""Session ids, the 4-bit selector, the route record and the in-process route cache.

A route is resolved once per session (first touch) and then served from this cache with no
I/O; the cache is bounded (least recently used routes leave first) and idle routes expire.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from hashlib import blake2b

import orjson

from sidecar.fleet.pools import Endpoint, PoolSet
from sidecar.routing.sessionkeys import valid_session_id as valid_session_id  # re-exported

# Times a route keeps (created, last seen, refreshed) are shared float objects within this
# resolution: a float is 24 bytes, and a route lives as long as its session.
STAMP_RESOLUTION_S = 0.1


class Stamps:
    """Hands out one float object for every time within STAMP_RESOLUTION_S of the last."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = float("-inf")

    def __call__(self, now: float) -> float:
        # A clock that stepped back (the wall clock can) starts a new stamp at once.
        if 0.0 <= now - self._last < STAMP_RESOLUTION_S:
            return self._last
        self._last = now
        return now


def parse_selector(value: str) -> int | None:
    """`x-sidecar-selector: N` with N in 0–15; None when invalid."""
    # isascii first: "²".isdigit() is True but int("²") fails (header bytes are latin-1).
    if value.isascii() and value.isdigit() and len(value) <= 2:
        selector = int(value)
        if selector < 16:
            return selector
    return None


def selector_for(session_id: str) -> int:
    """Stable across pods and restarts (unlike Python's hash): low 4 bits of BLAKE2b."""
    return blake2b(session_id.encode(), digest_size=8).digest()[-1] & 0x0F


class Route:
    """Where a session goes. `endpoint` is the endpoint that served it last."""

    # The fallback pool and its deadline share one slot (a tuple only while a session is
    # on a fallback): twelve slots, not thirteen.
    __slots__ = ("changed_at", "created_at", "detour", "endpoint", "inflight", "last_seen",
                 "pool", "reason", "refreshed_at", "selector", "session", "synced")

    def __init__(self, session: str, selector: int, pool: str, endpoint: Endpoint | None,
                 created_at: float, fallback: str | None = None,
                 fallback_until: float = 0.0, reason: str | None = None,
                 changed_at: float | None = None) -> None:
        self.session = session
        self.selector = selector
        self.pool = pool  # the primary pool, chosen by the selector at creation
        self.endpoint = endpoint
        # (the pool serving instead of `pool`, until when) or None
        self.detour: tuple[str, float] | None = (
            None if fallback is None else (fallback, fallback_until))
        self.created_at = created_at
        # When the route last changed (wall clock; its creation until it moves): a move
        # written late loses to a later one already stored (see store.WRITE_AND_ANNOUNCE).
        self.changed_at = created_at if changed_at is None else changed_at
        self.reason = reason  # why the route last moved (failover), for operators
        self.last_seen = 0.0
        self.refreshed_at = 0.0
        # False when resolved without the store (Redis down): re-read once it is back.
        self.synced = True
        self.inflight = 0  # the session's requests being answered now (the exchange counts)

    @property
    def fallback(self) -> str | None:
        return None if self.detour is None else self.detour[0]

    @property
    def fallback_until(self) -> float:
        return 0.0 if self.detour is None else self.detour[1]

    def record(self) -> bytes:
        """The store's representation (JSON, readable with redis-cli)."""
        # orjson's result keeps its 4 KiB working buffer as its allocation; a record may
        # live as long as the session (the embedded store keeps it), so keep a right-sized
        # copy instead. Measured: 4.5 KB → ~0.4 KB per session with the embedded store.
        return bytes(memoryview(orjson.dumps({
            "selector": self.selector,
            "pool": self.pool,
            "endpoint": self.endpoint.url if self.endpoint else None,
            "fallback": self.fallback,
            "fallback_until": self.fallback_until,
            "created_at": self.created_at,
            "changed_at": self.changed_at,
            "reason": self.reason,
        })))

    @classmethod
    def from_record(cls, session: str, data: bytes, pools: PoolSet) -> Route | None:
        """Parse a stored record; None when it is unreadable or names an unknown pool."""
        try:
            fields = orjson.loads(data)
            pool = fields["pool"]
            serving = fields.get("fallback") or pool
            url = fields.get("endpoint")
            if pools.get(pool) is None:
                return None
            endpoint = pools.endpoint(serving, url) if isinstance(url, str) else None
            reason = fields.get("reason")
            created_at = float(fields.get("created_at", 0.0))
            return cls(session, int(fields["selector"]) & 0x0F, pools.pools[pool].name,
                       endpoint, created_at,
                       fields.get("fallback") if pools.get(serving) else None,
                       float(fields.get("fallback_until") or 0.0),
                       reason if isinstance(reason, str) else None,
                       float(fields.get("changed_at") or created_at))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def view(self) -> dict[str, object]:
        return {"session": self.session, "selector": self.selector, "pool": self.pool,
                "endpoint": self.endpoint.url if self.endpoint else None,
                "fallback": self.fallback, "fallback_until": self.fallback_until,
                "created_at": self.created_at, "changed_at": self.changed_at,
                "reason": self.reason, "synced": self.synced}


class RouteCache:
    """Session id → Route, least recently used first, bounded, with idle expiry. Neither
    eviction nor expiry drops a route with calls in flight."""

    def __init__(self, max_size: int, idle_s: float) -> None:
        self.max_size = max_size
        self.idle_s = idle_s
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self.evicted = 0
        self.expired = 0
        self.stamp = Stamps()

    def get(self, session: str, now: float) -> Route | None:
        route = self._routes.get(session)
        if route is not None:
            route.last_seen = self.stamp(now)
            self._routes.move_to_end(session)
        return route

    def peek(self, session: str) -> Route | None:
        return self._routes.get(session)

    def put(self, route: Route, now: float) -> None:
        route.last_seen = self.stamp(now)
        self._routes[route.session] = route
        self._routes.move_to_end(route.session)
        routes = self._routes
        busy = 0
        while len(routes) > self.max_size and busy < len(routes):
            session, oldest = routes.popitem(last=False)
            if oldest.inflight > 0:
                # A call in flight still reports to this route: evicting it would let the
                # session's next call read a second route beside it. It goes to the back;
                # while every route is busy, the cache holds one more per call in flight.
                routes[session] = oldest
                busy += 1
                continue
            self.evicted += 1

    def pop(self, session: str) -> Route | None:
        return self._routes.pop(session, None)

    def expire_idle(self, now: float) -> int:
        """Drop routes idle longer than `idle_s`; cheap because the oldest come first. A
        route with a call in flight (a long generation) is not idle: it goes to the back."""
        cutoff = now - self.idle_s
        removed = 0
        routes = self._routes
        busy = 0
        while len(routes) > busy:
            session, route = next(iter(routes.items()))
            if route.last_seen > cutoff:
                break
            if route.inflight > 0:
                busy += 1
                route.last_seen = self.stamp(now)
                routes.move_to_end(session)
                continue
            del routes[session]
            removed += 1
        self.expired += removed
        return removed

    def sessions_per_endpoint(self) -> dict[str, int]:
        """Endpoint URL → the cached sessions whose route points there (admin views)."""
        counts: dict[str, int] = {}
        for route in self._routes.values():
            if route.endpoint is not None:
                url = route.endpoint.url
                counts[url] = counts.get(url, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._routes)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes.values())
