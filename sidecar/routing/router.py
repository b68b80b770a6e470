"""Session → route: the routing table per load level, first touch through the store, each
request's plan (its candidates in order, decided before the first send), and keeping routes
current after a failover moved a session.

The exchange comes in once (`Router.open` → a `Plan`) and reports what served once
(`Plan.served`); every change to a `Route` is made here. After first touch a session is
served from the route cache with no I/O; the only store writes that follow are a route
change (failover) and a TTL refresh at most once per 10 % of the TTL, batched in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from sidecar.config import Settings
from sidecar.fleet.pools import Endpoint, EndpointState, Pool, PoolSet, prefix_key
from sidecar.policy.placement import (
    BYTES_PER_TOKEN,
    SEED_CHOICES,
    SpillPod,
    choose_move,
    choose_seed,
    choose_spill,
    full_now,
    worth_waiting,
)
from sidecar.routing.sessions import STAMP_RESOLUTION_S, Route, RouteCache, Stamps, selector_for
from sidecar.routing.store import RouteStore, StoreUnavailable
from sidecar.supervise import Supervisor, cancel_and_wait
from sidecar.telemetry import Telemetry

log = logging.getLogger("sidecar.routing")

SWEEP_INTERVAL_S = 5.0
REFRESH_FLUSH_INTERVAL_S = 1.0
MAX_BACKGROUND_WRITES = 1024
# Moves made while Redis was away, written once it is back: bounded like the write-behind.
MAX_UNWRITTEN_MOVES = 4096
# A route write that fails with an exception the store did not expect is tried this often.
WRITE_ATTEMPTS = 3


class RouterCounters:
    __slots__ = ("cache_hits", "cache_misses", "coalesced", "cold_start_fallbacks",
                 "remote_changes", "resolved_without_store", "route_changes",
                 "seeded_from_parent", "session_moves", "sessions_ended", "spills",
                 "writes_dropped")

    def __init__(self) -> None:
        self.cache_hits = 0
        self.cache_misses = 0
        self.coalesced = 0             # first touches that waited on one already in flight
        self.cold_start_fallbacks = 0  # sessions sent to a fallback while their pool warms
        self.remote_changes = 0        # cached routes updated by another pod's failover
        self.resolved_without_store = 0
        self.route_changes = 0         # failovers that moved a session
        self.session_moves = 0         # sessions moved off a saturated pod (placement)
        self.spills = 0                # parallel calls sent past their session's busy pod
        self.seeded_from_parent = 0    # new sessions started on their parent's pod
        self.sessions_ended = 0        # sessions ended by their last call (x-session-final)
        self.writes_dropped = 0        # route writes skipped because too many were queued

    def view(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Router:
    def __init__(self, settings: Settings, pools: PoolSet, store: RouteStore,
                 telemetry: Telemetry | None = None,
                 supervisor: Supervisor | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry if telemetry is not None else Telemetry({})
        self.pools = pools
        self.store = store
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.level = settings.load_level
        self.cache = RouteCache(settings.route_cache_size, settings.session_idle_s)
        self._wall_stamp = Stamps()  # creation times (wall clock), shared like the cache's
        self.counters = RouterCounters()
        # Refresh a route's TTL at most once per tenth of it. refreshed_at is a shared stamp
        # up to STAMP_RESOLUTION_S older than the refresh it marks; waiting that much longer
        # keeps refreshes at least a tenth of the TTL apart.
        self._refresh_after = settings.session_ttl_s * 0.1 + STAMP_RESOLUTION_S
        self._first_touch: dict[str, asyncio.Future[Route]] = {}
        # session → the pod its pending first touch proposes, and how many of the
        # session's other calls wait on that first touch (they will go there too).
        self._heading: dict[str, Endpoint] = {}
        self._waiting: dict[str, int] = {}
        self._taken_over: set[asyncio.Task[Route]] = set()  # first touches a waiter took on
        self._pending_refresh: set[str] = set()
        self._writes: set[asyncio.Task[None]] = set()
        # session → a moved route's record Redis has not confirmed yet (its write is on the
        # way, or Redis was away): written by the refresh loop once Redis is back, and on
        # the session's next first touch instead of reading Redis's older record over it.
        self._unwritten: dict[str, bytes] = {}
        self._tasks: list[asyncio.Task[None]] = []
        store.on_change(self._remote_change)
        store.on_level(self.set_level)
        store.on_gap(self._changes_missed)
        self.level_changes = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [self.supervisor.start("route cache sweep", self._sweep_forever),
                       self.supervisor.start("route TTL refresh", self._refresh_forever)]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        with contextlib.suppress(Exception):  # logged by the store; shutting down anyway
            await self._flush_refresh()
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)
        for task in list(self._writes):  # still retrying after a second: Redis is away
            task.cancel()

    # -- the door: one request comes in -------------------------------------------------

    async def open(self, session: str, now: float, *, local: bool,
                   selector: int | None = None, named: str | None = None,
                   parent: str | None = None, body: bytes = b"") -> Plan:
        """One request's plan: its session's route (from the cache, else first touch), the
        pool its model names, and where it goes first (home, the pod a saturated home's
        session moves to, or the pod this parallel call spills to), all decided now, before
        the first send. The request counts as in flight on its session until `Plan.close`.
        `body`: the request's (its size weighs a move; its start tells where its prefix was
        spilled before)."""
        route = self.lookup(session, now)
        if route is None:
            route = await self.resolve(session, selector, local=local, pool=named,
                                       parent=parent, body=body)
        serving = self.for_model(route, named)
        # Counted on the session's own route: idle expiry never drops a route mid-call.
        route.inflight += 1
        # A per-request route (another pool named) is never written back to the store.
        return self.plan(serving, now, body, session_route=route,
                         local=local or serving is not route)

    def plan(self, serving: Route, now: float, body: bytes = b"", *,
             session_route: Route | None = None, local: bool = False) -> Plan:
        """The plan of one request taking `serving` (the session's route, or a per-request
        one): its first pod chosen now; the rest of its candidates in order, lazily."""
        pool = serving.pool if serving.detour is None else \
            self.serving_pool(serving, time.time())
        start = self.pools.get(pool) or self.pools.get(serving.pool)
        spill = self.spill(serving, now, body)
        first = serving.endpoint
        ahead, moved = spill, None
        if ahead is None and start is not None and first is not None and first.saturated \
                and first.move_budget > 0:
            move = self._move_target(serving, start, first, len(body), now)
            if move is not None:
                ahead, moved = move
        return Plan(self, serving, session_route or serving, start, ahead, spill, moved,
                    local)

    # -- the hot path --------------------------------------------------------------------

    def lookup(self, session: str, now: float) -> Route | None:
        """The cached route, or None when first touch (or a re-sync with the store) is due."""
        route = self.cache.get(session, now)
        if route is None:
            self.counters.cache_misses += 1
            return None
        if not route.synced and self.store.available:
            self.counters.cache_misses += 1
            return None
        self.counters.cache_hits += 1
        if now - route.refreshed_at > self._refresh_after and route.synced:
            route.refreshed_at = route.last_seen
            self._pending_refresh.add(session)
        return route

    async def resolve(self, session: str, selector: int | None, *, local: bool,
                      pool: str | None = None, parent: str | None = None,
                      body: bytes = b"") -> Route:
        """First touch: one store round trip (shared by concurrent requests of the session).
        `pool` is the pool the request's model names; without one the table chooses. A new
        session naming a `parent` starts on or beside the parent's route (see `_seeded`;
        `body`, the first request's, weighs its prefill elsewhere against the wait there).

        The first request runs it inline (no task: its pick must count toward the next
        request's bounded load); the others wait on a shielded future. Should the first
        request's app go away mid-way, the round trip starts again as a task of its own for
        the others: a waiter's cancellation never becomes theirs."""
        pending = self._first_touch.get(session)
        if pending is not None:
            self.counters.coalesced += 1
            heading = self._heading.get(session)
            if heading is not None:
                # An agent's parallel calls arrive together: the next session placed
                # while they wait must see all of them, not one call.
                heading.expect_calls(1)
                self._waiting[session] = self._waiting.get(session, 0) + 1
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Route] = loop.create_future()
        self._first_touch[session] = future
        try:
            route = await self._resolve(session, selector, local=local, pool=pool,
                                        parent=parent, body=body)
        except asyncio.CancelledError:
            task = loop.create_task(self._resolve(session, selector, local=local, pool=pool,
                                                  parent=parent, body=body))
            self._taken_over.add(task)
            task.add_done_callback(self._taken_over.discard)
            task.add_done_callback(lambda done: self._touched(session, future, done))
            raise
        except BaseException as exc:
            self._touched(session, future, None, exc)
            raise
        self._touched(session, future, None, None, route)
        return route

    def _touched(self, session: str, future: asyncio.Future[Route],
                 task: asyncio.Task[Route] | None, exc: BaseException | None = None,
                 route: Route | None = None) -> None:
        """The first touch ended (inline, or in the task that took over): every waiter
        gets its route or its error."""
        if task is not None:
            exc = None if task.cancelled() else task.exception()
            route = None if task.cancelled() or exc is not None else task.result()
        if self._first_touch.get(session) is future:
            del self._first_touch[session]
            self._settle_heading(session, route)
        if task is not None and task.cancelled():
            future.cancel()
            return
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody may be waiting
        else:
            assert route is not None
            future.set_result(route)

    def _head(self, session: str, endpoint: Endpoint) -> None:
        """The pending first touch now proposes `endpoint`: the calls waiting on it count
        there (a first touch taken over, or a child seeded elsewhere, proposes again)."""
        self._recount_waiting(session, endpoint)
        self._heading[session] = endpoint

    def _settle_heading(self, session: str, route: Route | None) -> None:
        """The first touch ended: its waiters' calls go to `route`'s pod (Redis may have
        held another pod's route), or nowhere (it failed)."""
        self._recount_waiting(session, route.endpoint if route is not None else None)
        self._heading.pop(session, None)
        self._waiting.pop(session, None)

    def _recount_waiting(self, session: str, going: Endpoint | None) -> None:
        """The calls waiting on `session`'s first touch go to `going` (None: nowhere), not
        to the pod it proposed so far: they count there instead."""
        counted = self._heading.get(session)
        waiting = self._waiting.get(session, 0)
        if counted is not None and waiting and going is not counted:
            counted.expect_calls(-waiting)
            if going is not None:
                going.expect_calls(waiting)

    async def _resolve(self, session: str, selector: int | None, *, local: bool,
                       pool: str | None = None, parent: str | None = None,
                       body: bytes = b"") -> Route:
        now = self.cache.stamp(asyncio.get_running_loop().time())
        current = self.cache.peek(session)
        proposal = current if current is not None else self.propose(session, selector, pool)
        proposal.refreshed_at = now
        if current is None and proposal.endpoint is not None:
            self._head(session, proposal.endpoint)
        if current is None and parent is not None and not local:
            return await self._seeded(session, proposal, parent, pool, now, body)
        if local:
            # A connection-lifetime session can never reach another pod: no store needed.
            self.cache.put(proposal, now)
            return proposal
        record = proposal.record()
        if self._unwritten.get(session) == record:
            # This pod moved the session while Redis was away: its move is the news, so it is
            # written, not overwritten by the record Redis kept from before — unless another
            # pod moved it later, which wins.
            try:
                later = await self.store.update(session, record, proposal.changed_at)
            except StoreUnavailable:
                self.counters.resolved_without_store += 1
                self.cache.put(proposal, now)
                return proposal
            self.cache.put(proposal, now)
            if later is not None:
                self._later_kept(session, record, later)
                return self.cache.peek(session) or proposal
            self._written(session, record)
            proposal.synced = True
            return proposal
        return (await self._stored(session, proposal, now, record, named=pool,
                                   fresh=current is None))[0]

    # -- subagents start warm --------------------------------------------------------------

    def _not_worth_waiting(self, now: float, prompt_tokens: int) -> list[str]:
        """Endpoints the first-touch script must not seed a child onto: not ready, holding
        off, or full with a wait longer than prefilling the child's prompt on a pod with
        room (placement.worth_waiting)."""
        return [e.url for p in self.pools.pools.values() for e in p.endpoints
                if not worth_waiting(_seed_pod(e, now), prompt_tokens)]

    def _follow(self, session: str, parent: Route, named: str | None, now: float,
                prompt_tokens: int, prefix: bytes) -> Route | None:
        """The child's route on its parent's pod, or beside it — the parent session's next
        choice, or a pod a sibling took the prompt (`prefix`, see `prefix_key`) to — when
        waiting at the parent's costs more than starting there (placement.choose_seed: the
        wait against the prompt's prefill); same pool as the request's model names, when it
        names one."""
        home = parent.endpoint
        pool = self.pools.get(parent.pool)
        if home is None or pool is None or home.pool != pool.name or (
                named is not None and parent.pool != named):
            return None
        ranked = [e for e in pool.ranked(parent.session.encode()) if e is not home]
        # The parent's pod, its session's next choice, then wherever a sibling took the
        # prompt before (a cold start of its own, a spill).
        candidates = [home, *ranked[:SEED_CHOICES - 1],
                      *(e for e in ranked[SEED_CHOICES - 1:] if prefix in e.prefixes)]
        # A saturated pod stays a candidate: its wait is weighed against a cold prefill.
        index = choose_seed([_seed_pod(e, now) for e in candidates], prompt_tokens,
                            [prefix in e.prefixes for e in candidates])
        if index is None:
            return None
        candidates[index].take_session()
        self._head(session, candidates[index])
        if index > 0:  # its siblings that follow find the parent's prompt cached there
            candidates[index].sent_prefix(prefix)
        why = (f"started on its parent session's pod ({parent.session})" if index == 0 else
               f"started beside its parent session's pod ({parent.session}): waiting there "
               "cost more")
        return Route(session, parent.selector, parent.pool, candidates[index],
                     self._wall_stamp(time.time()), parent.fallback, parent.fallback_until,
                     why)

    async def _seeded(self, session: str, proposal: Route, parent: str, named: str | None,
                      now: float, body: bytes = b"") -> Route:
        """First touch of a session that names its parent. The parent's route is read from
        this sidecar's cache when it holds it (no extra round trip), else with the child's
        get-or-create in one script (standalone, Sentinel); Cluster keeps the two keys in
        different slots, so there the parent is read first (a second round trip, on a
        child's first touch only). An existing child record always wins."""
        loop_now = asyncio.get_running_loop().time()
        cached = self.cache.peek(parent)
        if cached is not None or not self.store.reads_parent_in_script:
            parent_route = cached
            if parent_route is None:
                try:
                    record = await self.store.get(parent)
                except StoreUnavailable:
                    record = None
                parent_route = Route.from_record(parent, record, self.pools) if record else None
            prefix = prefix_key(body)
            followed = (self._follow(session, parent_route, named, loop_now,
                                     len(body) // BYTES_PER_TOKEN, prefix)
                        if parent_route is not None else None)
            if followed is None and parent_route is not None and proposal.endpoint is not None:
                # A cold start of its own: the siblings that follow find the prompt there.
                proposal.endpoint.sent_prefix(prefix)
            route, created = await self._stored(session, followed or proposal, now,
                                                named=named, fresh=followed is None)
            if created and followed is not None:
                self.counters.seeded_from_parent += 1
            return route
        record = proposal.record()
        try:
            asked_at = time.perf_counter()
            stored, how = await self.store.get_or_create_child(
                session, record, parent, named,
                self._not_worth_waiting(loop_now, len(body) // BYTES_PER_TOKEN),
                self._wall_stamp(time.time()),
                f"started on its parent session's pod ({parent})")
            self.telemetry.observe("redis_latency", (), time.perf_counter() - asked_at)
        except StoreUnavailable as exc:
            return self._unstored(session, proposal, now, exc, named, fresh=True)
        if how == "parent":
            self.counters.seeded_from_parent += 1
        return self._taken(session, proposal, record, stored, now)

    async def _stored(self, session: str, proposal: Route, now: float,
                      record: bytes | None = None, *, named: str | None = None,
                      fresh: bool = False) -> tuple[Route, bool]:
        """The usual get-or-create of a proposal (one round trip); whether it was created."""
        if record is None:
            record = proposal.record()
        try:
            asked_at = time.perf_counter()
            stored = await self.store.get_or_create(session, record)
            if self.store.kind == "redis":
                self.telemetry.observe("redis_latency", (), time.perf_counter() - asked_at)
        except StoreUnavailable as exc:
            return self._unstored(session, proposal, now, exc, named, fresh), False
        return self._taken(session, proposal, record, stored, now), stored == record

    def _unstored(self, session: str, proposal: Route, now: float, exc: StoreUnavailable,
                  named: str | None, fresh: bool) -> Route:
        """A first touch Redis did not answer: the route is this pod's own until it does.
        `fresh`: no route was held here, so none is shared to agree on."""
        self.counters.resolved_without_store += 1
        if fresh:
            # The pick every sidecar computes alike, not one weighed by this sidecar's own
            # view of the load (its calls in flight, a fleet view read before Redis went
            # away), which another sidecar does not see.
            proposal = self.propose(session, proposal.selector, named, alike=True)
            proposal.refreshed_at = now
        # Asked again on the next request only when that can help (Redis away or busy);
        # a command Redis refused as wrong would be refused again on every request.
        proposal.synced = not exc.retry
        self.cache.put(proposal, now)
        return proposal

    def _taken(self, session: str, proposal: Route, record: bytes, stored: bytes,
               now: float) -> Route:
        """The store's answer becomes the cached route (another pod's record wins)."""
        route = proposal
        if stored != record:
            route = Route.from_record(session, stored, self.pools) or proposal
            route.refreshed_at = now
        route.synced = True
        self.cache.put(route, now)
        return route

    def propose(self, session: str, selector: int | None, named: str | None = None, *,
                alike: bool = False) -> Route:
        """A new session's route: the pool the request's model names, else the table slot
        of the selector; then rendezvous in that pool, bounded by the loads this sidecar
        sees, or with `alike` rendezvous alone (the same on every pod)."""
        if selector is None:
            selector = selector_for(session)
        pool = self.pools.get(named) if named is not None else None
        if pool is None:
            pool = self.pools.get(self.settings.routes[self.level][selector])
        if pool is None:  # the pool was removed by a reload; use any configured pool
            pool = next(iter(self.pools.pools.values()))
        endpoint = (pool.first_ready(session.encode()) if alike else
                    pool.pick(session.encode(), self.settings.bounded_load_factor))
        return Route(session, selector, pool.name, endpoint, self._wall_stamp(time.time()))

    def for_model(self, route: Route, named: str | None) -> Route:
        """The route one request takes when its model names a pool other than the session's:
        a per-request route to that pool (rendezvous on the session id, so the session
        keeps one pod there too), never cached or stored; the session's own route stays."""
        if named is None or named == route.pool or self.pools.get(named) is None:
            return route
        pool = self.pools.pools[named]
        endpoint = pool.pick(route.session.encode(), self.settings.bounded_load_factor)
        return Route(route.session, route.selector, named, endpoint, route.created_at)

    # -- failover ------------------------------------------------------------------------

    def serving_pool(self, route: Route, wall: float) -> str:
        detour = route.detour
        if detour is not None and wall < detour[1]:
            return detour[0]
        return route.pool

    def spill(self, route: Route, now: float, body: bytes = b"") -> Endpoint | None:
        """The pod one parallel call of the session goes to instead of its saturated pod
        (placement.choose_spill), or None. For that call only: the route stays as it is.
        `route.inflight` counts this call too; `body`: the call's, whose start tells where
        its prefix was sent before."""
        home = route.endpoint
        if route.inflight < 2 or home is None or home.load is None or route.detour is not None:
            return None
        here = _spill_pod(home)
        if not full_now(here):
            return None  # the common case: no ranking computed
        pool = self.pools.get(route.pool)
        if pool is None or home.pool != pool.name:
            return None
        choices = [e for e in pool.ranked(route.session.encode()) if e is not home]
        prefix = prefix_key(body)
        index = choose_spill(here, route.inflight - 1, [_spill_pod(e, now) for e in choices],
                             len(body) // BYTES_PER_TOKEN,
                             [prefix in e.prefixes for e in choices])
        if index is None:
            return None
        choices[index].sent_prefix(prefix)
        self.counters.spills += 1
        self.telemetry.count("spills", (pool.name,))
        return choices[index]

    def _move_target(self, route: Route, pool: Pool, current: Endpoint, body_bytes: int,
                     now: float) -> tuple[Endpoint, str] | None:
        """Sticky until saturated: the pod this call moves to, if moving pays (placement),
        and why."""
        if current.pool != pool.name:
            return None
        others = [e for e in pool.ranked(route.session.encode())
                  if e is not current and e.state is EndpointState.READY]
        index = choose_move(_spill_pod(current, now), [_spill_pod(e, now) for e in others],
                            body_bytes // BYTES_PER_TOKEN)
        if index is None:
            return None
        current.take_move()
        return others[index], (f"moved from {current.url}: saturated "
                               f"(waiting {current.load.waiting:g})"
                               if current.load is not None else "moved")

    def _served(self, route: Route, pool: Pool, endpoint: Endpoint, *, local: bool,
                reason: str | None = None, moved: str | None = None) -> None:
        """Remember who served the session; write the route through when it moved (the
        exchange reports through its `Plan`). `moved`: why the plan moved the session off
        its saturated pod, if it did."""
        if route.endpoint is endpoint and route.detour is None and pool.name == route.pool:
            return
        if moved is not None and reason is None and pool.name == route.pool:
            reason = moved
            self.counters.session_moves += 1
            self.telemetry.count("session_moves", (pool.name,))
        wall = time.time()
        changed = route.endpoint is not endpoint
        if pool.name == route.pool:
            changed = changed or route.detour is not None
            route.detour = None
        elif route.fallback != pool.name or wall >= route.fallback_until:
            route.detour = (pool.name, wall + self.settings.fallback_hold_s)
            changed = True
            primary = self.pools.get(route.pool)
            if primary is not None and not primary.has_ready() and primary.has_warming():
                self.counters.cold_start_fallbacks += 1
                self.telemetry.count("cold_start_fallbacks", (route.pool,))
                reason = reason or f"pool {route.pool} is warming (cold start)"
        route.endpoint = endpoint
        if not changed:
            return
        route.reason = reason
        route.changed_at = wall  # exact, not a shared stamp: two moves 0.1 s apart are ordered
        self.counters.route_changes += 1
        # A route that left the cache while this call was in flight (its session ended or
        # was deleted, or another pod's move replaced it) is no longer the session's: its
        # write would bring back what was dropped.
        if not local and self.cache.peek(route.session) is route:
            self._write_behind(route.session, route.record())

    def _remote_change(self, session: str, record: bytes) -> None:
        """Another pod moved (or forgot) a session: follow it if this pod holds the route."""
        current = self.cache.peek(session)
        if current is None:
            return  # read on first touch, if it ever comes here
        self.counters.remote_changes += 1
        self._unwritten.pop(session, None)  # another pod's later move wins over ours
        if not record:
            self.cache.pop(session)
            return
        route = Route.from_record(session, record, self.pools)
        if route is None:
            self.cache.pop(session)
            return
        route.last_seen = current.last_seen
        route.refreshed_at = current.refreshed_at
        self.cache.put(route, current.last_seen)

    def _later_kept(self, session: str, record: bytes, later: bytes) -> None:
        """Redis kept another pod's later change instead of writing this pod's `record`:
        the later one wins here too, unless this pod's route changed again since (that
        change is its own write, and its own news)."""
        route = self.cache.peek(session)
        if route is not None and route.record() == record:
            self._remote_change(session, later)
        elif self._unwritten.get(session) == record:
            del self._unwritten[session]

    def _write_behind(self, session: str, record: bytes) -> None:
        # Noted before the write is tried: a re-read racing the write (after a pub/sub gap)
        # must write this move, not take Redis's older record back.
        if session in self._unwritten or len(self._unwritten) < MAX_UNWRITTEN_MOVES:
            self._unwritten[session] = record
        if len(self._writes) >= MAX_BACKGROUND_WRITES:
            self.counters.writes_dropped += 1
            return
        task = self.supervisor.start("route write-behind",
                                     lambda: self._update(session, record),
                                     attempts=WRITE_ATTEMPTS)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _update(self, session: str, record: bytes) -> None:
        try:
            # Written as the latest change (it is, give or take the write's own delay):
            # were it weighed by the pods' clocks, one running ahead would refuse a live
            # failover until the others caught up.
            await self.store.update(session, record)
        except StoreUnavailable:
            # Redis away (counted by the store): the move stays noted and is written once
            # Redis is back, so none is lost to an outage; other pods keep the old route
            # until then.
            return
        self._written(session, record)

    @property
    def unwritten_moves(self) -> int:
        """Moves this pod made that Redis has not confirmed yet."""
        return len(self._unwritten)

    def _written(self, session: str, record: bytes) -> None:
        if self._unwritten.get(session) == record:
            del self._unwritten[session]

    async def _write_unwritten(self) -> None:
        """Write the moves Redis missed, oldest first, while it answers; a route that changed
        again or left the cache since is its own news (or none)."""
        for session, record in list(self._unwritten.items()):
            route = self.cache.peek(session)
            if route is None or route.record() != record:
                self._unwritten.pop(session, None)
                continue
            try:
                later = await self.store.update(session, record, route.changed_at)
            except StoreUnavailable:
                return
            if later is not None:
                self._later_kept(session, record, later)
                continue
            self._written(session, record)
            route.synced = True

    def _changes_missed(self) -> None:
        """The store's pub/sub was away: another pod may have moved a cached session. Each
        cached route is re-read (get-or-create, one round trip) on its next use."""
        for route in self.cache:
            route.synced = False

    def set_level(self, level: str) -> None:
        """The scaler's load level: new sessions use its table; existing routes keep their
        pool (a conversation does not switch models mid-way)."""
        if level == self.level:
            return
        if level not in self.settings.routes:
            log.warning("ignoring unknown load level %r from the scaler", level)
            return
        log.info("load level %s → %s", self.level, level)
        self.level = level
        self.level_changes += 1

    # -- admin ---------------------------------------------------------------------------

    async def end(self, session: str, *, local: bool) -> None:
        """The session's last call was answered: its route leaves this pod and the store
        (the other pods drop theirs on the announcement)."""
        self.counters.sessions_ended += 1
        if local:
            self.cache.pop(session)
            return
        await self.forget(session)

    async def forget(self, session: str) -> tuple[bool, str | None]:
        """Forget the session here and in the store: whether this pod had it cached, and
        why the store could not forget it (None: it did)."""
        had = self.cache.pop(session) is not None
        self._unwritten.pop(session, None)
        try:
            await self.store.forget(session)
        except StoreUnavailable as exc:
            return had, str(exc)
        return had, None

    # -- background ----------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = min(SWEEP_INTERVAL_S, max(0.05, self.settings.session_idle_s / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.cache.expire_idle(loop.time())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_FLUSH_INTERVAL_S)
            if self._unwritten and self.store.available:
                await self._write_unwritten()
            await self._flush_refresh()

    async def _flush_refresh(self) -> None:
        if not self._pending_refresh:
            return
        sessions = list(self._pending_refresh)
        self._pending_refresh.clear()
        try:
            await self.store.refresh(sessions)
        except StoreUnavailable:
            pass  # counted by the store; the TTL has 90 % left, the next use asks again
        except Exception:
            self._pending_refresh.update(sessions)  # the supervisor's retry includes them
            raise


class Plan:
    """One request's way through the fleet, from `Router.open`: where it goes first (decided
    before any send), then the rest of its pool by rendezvous rank, then each fallback
    pool's endpoints; `resume_candidates` for a broken stream. What served is reported to
    `served`, and `close` ends the request's count on its session.

    Candidates are admitted lazily (`outlier.admit`): an ejected pod's one probation permit
    is spent only by the attempt that makes it."""

    __slots__ = ("_router", "ahead", "answered", "local", "moved", "route", "serving", "spill",
                 "start")

    def __init__(self, router: Router, serving: Route, route: Route, start: Pool | None,
                 ahead: Endpoint | None, spill: Endpoint | None, moved: str | None,
                 local: bool) -> None:
        self._router = router
        self.serving = serving   # the route this request takes (its model's pool)
        self.route = route       # the session's own route
        self.start = start       # the pool tried first (a detour's while it lasts)
        self.ahead = ahead       # tried before home: the spill or move target, if any
        self.spill = spill       # set when this parallel call spills past a full home
        self.moved = moved       # set when the session moves off its saturated home: why
        self.local = local       # a route this request must not write to the store
        self.answered: Endpoint | None = None  # who answered first

    def candidates(self, now: float) -> Iterator[tuple[Pool, Endpoint]]:
        start = self.start
        if start is None:
            return
        ahead, first = self.ahead, self.serving.endpoint
        if ahead is not None and ahead.pool == start.name and ahead.outlier.admit(now):
            yield start, ahead
        if first is not None and first.pool == start.name and first.outlier.admit(now):
            yield start, first
        key = self.serving.session.encode()
        for endpoint in start.ranked(key):
            if endpoint is not first and endpoint is not ahead and endpoint.outlier.admit(now):
                yield start, endpoint
        for pool in self._router.pools.fallback_chain(start.name):
            for endpoint in pool.ranked(key):
                if endpoint.outlier.admit(now):
                    yield pool, endpoint

    def resume_candidates(self, pool: Pool, broken: Endpoint, now: float
                          ) -> Iterator[tuple[Pool, Endpoint]]:
        """Where a broken stream of `pool` may continue: the pool's other endpoints by the
        session's rendezvous rank."""
        for endpoint in pool.ranked(self.serving.session.encode()):
            if endpoint is not broken and endpoint.outlier.admit(now):
                yield pool, endpoint

    def served(self, pool: Pool, endpoint: Endpoint, reason: str | None = None) -> None:
        """`endpoint` answered (or took over a broken stream): the session follows it,
        unless this call was answered where it spilled (then neither it nor its resumes
        move the route)."""
        moved = None
        if self.answered is None:
            self.answered = endpoint
            if endpoint is self.spill:
                return
            moved = self.moved  # the first answer ends the move the plan decided
        elif self.answered is self.spill:
            return
        self._router._served(self.serving, pool, endpoint, local=self.local, reason=reason,
                             moved=moved)

    def close(self) -> None:
        self.route.inflight -= 1


def _spill_pod(endpoint: Endpoint, now: float = 0.0) -> SpillPod:
    # Ready and not holding off (Retry-After): `admit` would also spend an ejected pod's
    # probation permit, which a spill must not spend.
    return SpillPod(endpoint.load, endpoint.inflight,
                    endpoint.inflight - endpoint.inflight_at_load, endpoint.slots,
                    endpoint.outlier.available(now))


def _seed_pod(endpoint: Endpoint, now: float) -> SpillPod:
    """The pod as a new session's placement sees it: since the reading, this sidecar's
    calls there and the sessions it started there (which will bring their calls)."""
    return _spill_pod(endpoint, now)._replace(since_view=endpoint.since_load())
