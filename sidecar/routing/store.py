"""Where session routes live across pods: one small interface, a Redis implementation and an
in-memory one (the embedded default, for a single pod).

Records are opaque bytes here; `sessions.Route` owns their format. The Redis store never
makes a caller wait longer than SIDECAR_REDIS_TIMEOUT_MS: a failure trips it to
`unavailable` (callers then route deterministically without it) and a background task
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

from sidecar.config import Settings, redact_url
from sidecar.fleet.podview import VIEW_CHANNEL
from sidecar.fleet.traffic import CLOCK_SCRIPT
from sidecar.redisfaults import CAUGHT, Fault, classify, describe, redirect_loop
from sidecar.supervise import Supervisor

log = logging.getLogger("sidecar.store")

KEY_PREFIX = "llmsc:"
# Route changes made by one pod reach the others here: "<pod id>\0<session>\0<record>"
# (an empty record means the session was forgotten).
CHANGES_CHANNEL = "llmsc:route-changes"
# The scaler publishes the load level here and keeps it under LEVEL_KEY for late joiners.
LEVEL_CHANNEL = "llmsc:load-level"
LEVEL_KEY = "llmsc:load-level"
RECONNECT_INTERVAL_S = 0.5
# The reconnect probe's key (one per pod, expiring): `~llmsc:*` in the sidecar's ACL covers it.
PROBE_KEY_PREFIX = "llmsc:probe:"
RECONNECT_MAX_BACKOFF_S = 2.0
# The pub/sub connection carries nothing for long stretches: after this much silence the
# listener pings, and a connection silent (no pong either) for PUBSUB_DEAD_AFTER_S is
# dropped and subscribed again. A stopped Redis or a peer gone without a reset is noticed
# within PUBSUB_DEAD_AFTER_S + PUBSUB_PING_AFTER_S.
PUBSUB_PING_AFTER_S = 1.0
PUBSUB_DEAD_AFTER_S = 3.0
LISTENER_MAX_BACKOFF_S = 2.0

RouteChangeHandler = Callable[[str, bytes], None]
LevelHandler = Callable[[str], None]
GapHandler = Callable[[], None]
ViewHandler = Callable[[bytes], None]
PipelineBuilder = Callable[[Any], None]

# One round trip that returns the existing record, or stores ours and returns it: two pods
# racing on a new session both get the first writer's record. Works on Redis 6.2+ and in
# Cluster (one key).
GET_OR_CREATE = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""

# The first touch of a session that names its parent (a subagent), in one round trip: the
# child's record if it has one; else a copy of the parent's route when it may be followed
# — the request names no pool or the parent's pool, and the parent's endpoint is not
# among those without room — stamped with the child's creation time and reason; else our
# proposal. Returns {record, how}: how is found, parent or created. KEYS: child, parent.
# ARGV: proposal, ttl, named pool ('' = any), created_at, reason, endpoints without room...
# Both keys must be on one node: standalone and Sentinel only (Cluster: see RedisStore).
GET_OR_CREATE_CHILD = """
local current = redis.call('GET', KEYS[1])
if current then return {current, 'found'} end
local record, how = ARGV[1], 'created'
local parent = redis.call('GET', KEYS[2])
if parent then
  local ok, fields = pcall(cjson.decode, parent)
  if ok and type(fields) == 'table' and type(fields['endpoint']) == 'string'
      and (ARGV[3] == '' or fields['pool'] == ARGV[3]) then
    local room = true
    for i = 6, #ARGV do
      if ARGV[i] == fields['endpoint'] then room = false break end
    end
    if room then
      fields['created_at'] = tonumber(ARGV[4])
      fields['changed_at'] = tonumber(ARGV[4])
      fields['reason'] = ARGV[5]
      record, how = cjson.encode(fields), 'parent'
    end
  end
end
redis.call('SET', KEYS[1], record, 'EX', ARGV[2])
return {record, how}
"""

# A route change (or, with an empty record, a forgotten session) and its announcement, in
# one round trip in every mode (see RedisStore). ARGV: record, ttl, channel, announcement,
# the change's time ('' for a change made just now). A change older than the stored
# record's (`changed_at`, else its `created_at`) is not written: a move one pod made while
# Redis was away must not undo a later one another pod wrote meanwhile. Returns 1 when
# written, else the stored record.
WRITE_AND_ANNOUNCE = """
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  local current = ARGV[5] ~= '' and redis.call('GET', KEYS[1])
  if current then
    local ok, fields = pcall(cjson.decode, current)
    if ok and type(fields) == 'table' then
      local stamp = tonumber(fields['changed_at']) or tonumber(fields['created_at'])
      if stamp and stamp > tonumber(ARGV[5]) then return current end
    end
  end
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


def route_key(session: str) -> str:
    # The braces are a Cluster hash tag: every key of a session lands in one slot.
    return f"{KEY_PREFIX}{{{session}}}"


class StoreUnavailable(Exception):
    """The store cannot answer within its budget; route without it. `retry`: worth asking
    again on the session's next request (busy, or Redis away); False when Redis refused the
    command as wrong, which asking again per request would only repeat."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


# Pauses before running a command again when the Cluster redirected it in a loop (a slot
# changing hands); the operation's budget (SIDECAR_REDIS_TIMEOUT_MS) still bounds them all.
REDIRECT_LOOP_PAUSES_S = (0.005, 0.02, 0.05)


class StoreCounters:
    __slots__ = ("bugs", "busy", "created", "errors", "found", "later_kept", "redirect_loops",
                 "skipped", "timeouts")

    def __init__(self) -> None:
        self.found = 0      # first touch found an existing record
        self.created = 0    # first touch created the record
        self.errors = 0     # operations that failed because Redis was unavailable
        self.timeouts = 0   # operations past the budget
        self.skipped = 0    # operations not attempted because the store was unavailable
        self.busy = 0       # operations that waited the whole budget for a connection
        self.bugs = 0       # operations Redis refused as wrong (logged; the store stays up)
        self.redirect_loops = 0  # commands run again after the Cluster redirected in a loop
        self.later_kept = 0  # route writes not made: the stored route had changed later

    def view(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class RouteStore(Protocol):
    counters: StoreCounters

    @property
    def available(self) -> bool: ...

    @property
    def kind(self) -> str: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get_or_create(self, session: str, record: bytes) -> bytes:
        """One round trip: the stored record, or `record` after storing it."""
        ...

    async def get(self, session: str) -> bytes | None: ...

    @property
    def reads_parent_in_script(self) -> bool:
        """Whether `get_or_create_child` reads a parent in the child's round trip."""
        ...

    async def get_or_create_child(self, session: str, record: bytes, parent: str,
                                  pool: str | None, no_room: list[str], created_at: float,
                                  reason: str) -> tuple[bytes, str]:
        """One round trip: the child's stored record, else its parent's route copied (see
        GET_OR_CREATE_CHILD), else `record`; and which (found, parent, created)."""
        ...

    async def update(self, session: str, record: bytes,
                     changed_at: float | None = None) -> bytes | None:
        """Write a changed route (one round trip). With `changed_at` (wall clock: a change
        made a while ago, e.g. while Redis was away), only if the stored route did not
        change later: None when written, else the later record kept."""
        ...

    async def forget(self, session: str) -> None: ...

    async def refresh(self, sessions: list[str]) -> None:
        """Push the TTL of these sessions' records forward (one batched write)."""
        ...

    def on_change(self, handler: RouteChangeHandler) -> None:
        """Call `handler(session, record)` when another pod changes or forgets a route."""
        ...

    def on_level(self, handler: LevelHandler) -> None:
        """Call `handler(level)` when the scaler publishes a load level."""
        ...

    def on_gap(self, handler: GapHandler) -> None:
        """Call `handler()` when route changes may have been missed (pub/sub was away)."""
        ...

    def on_view(self, handler: ViewHandler) -> None:
        """Call `handler(notice)` when the fleet monitor announces a pod view (podview.py)."""
        ...

    async def write(self, build: PipelineBuilder) -> list[Any]:
        """Run the commands `build(pipeline)` queues, in one round trip (traffic flushes);
        returns their replies in order."""
        ...


class MemoryStore:
    """The embedded store: one pod only, records expire after the session TTL."""

    kind = "memory"

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.counters = StoreCounters()
        self._records: dict[str, tuple[bytes, float]] = {}

    @property
    def available(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()

    def _live(self, session: str) -> bytes | None:
        entry = self._records.get(session)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._records[session]
            return None
        return entry[0]

    async def get_or_create(self, session: str, record: bytes) -> bytes:
        current = self._live(session)
        if current is not None:
            self.counters.found += 1
            return current
        self._records[session] = (record, time.monotonic() + self.ttl_s)
        self.counters.created += 1
        return record

    async def get(self, session: str) -> bytes | None:
        return self._live(session)

    reads_parent_in_script = False  # reading the parent costs nothing here

    async def get_or_create_child(self, session: str, record: bytes, parent: str,
                                  pool: str | None, no_room: list[str], created_at: float,
                                  reason: str) -> tuple[bytes, str]:
        raise NotImplementedError("the router reads the parent with `get`")

    async def update(self, session: str, record: bytes,
                     changed_at: float | None = None) -> bytes | None:
        self._records[session] = (record, time.monotonic() + self.ttl_s)
        return None  # one pod only: no other pod's later change to keep

    async def forget(self, session: str) -> None:
        self._records.pop(session, None)

    async def refresh(self, sessions: list[str]) -> None:
        deadline = time.monotonic() + self.ttl_s
        for session in sessions:
            entry = self._records.get(session)
            if entry is not None:
                self._records[session] = (entry[0], deadline)

    def on_change(self, handler: RouteChangeHandler) -> None:
        return None  # one pod only: nobody else changes routes

    def on_level(self, handler: LevelHandler) -> None:
        return None  # no scaler without Redis: the configured level stays

    def on_gap(self, handler: GapHandler) -> None:
        return None  # nothing is ever missed

    def on_view(self, handler: ViewHandler) -> None:
        return None  # no monitor without Redis: the sidecar probes by itself

    async def write(self, build: PipelineBuilder) -> list[Any]:
        return []  # no global view to feed

    def __len__(self) -> int:
        return len(self._records)


class RedisSilent(TimeoutError):
    """Redis stopped answering on the pub/sub connection (no message, no pong)."""


class RedisStore:
    """Routes in Redis, with a per-operation budget and a circuit breaker.

    Every call goes through `_call`: it waits for one of `max_connections` permits and runs
    within SIDECAR_REDIS_TIMEOUT_MS, and every exception redis-py can raise is judged by
    `redisfaults.classify`. Redis unavailable trips the breaker (callers route without the
    store; a supervised task reconnects); a bug is logged with the operation and leaves the
    breaker alone. Waiting for a permit is never a Redis failure: in every mode (standalone,
    Sentinel, Cluster) a burst waits its turn within the budget, so the pool bound cannot
    trip the breaker. The client's pool holds one connection more than the permits: the
    pub/sub listener's.

    A route change and its announcement are one script (`WRITE_AND_ANNOUNCE`, SET or DEL
    then PUBLISH), so they reach Redis in one round trip in every mode: Cluster refuses a
    keyless PUBLISH in a pipeline, but runs a script on the node owning the route key, and
    a PUBLISH there reaches subscribers on every node (classic pub/sub is broadcast over the
    cluster bus; route changes are rare, so the broadcast costs nothing that matters).
    Sharded pub/sub (SPUBLISH) would avoid the broadcast but needs Redis 7 and a
    subscription per shard.

    The listener pings Redis after PUBSUB_PING_AFTER_S of silence and drops a connection
    silent for PUBSUB_DEAD_AFTER_S (a Redis that stopped, or a peer gone without a reset);
    each (re)subscription re-reads the load level, and a resubscription tells the router
    that route changes may have been missed (it re-validates each cached route on its next
    use, one round trip per session that is still in use).
    """

    def __init__(self, client: Any, ttl_s: int, timeout_s: float, label: str,
                 max_connections: int = 32, supervisor: Supervisor | None = None) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.label = label
        self.kind = "redis"
        self.counters = StoreCounters()
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self._available = True
        self._permits = asyncio.Semaphore(max_connections)
        self._script = client.register_script(GET_OR_CREATE)
        self._child_script = client.register_script(GET_OR_CREATE_CHILD)
        # Cluster: a child's key and its parent's hash to different slots (each session's
        # keys share one tag, its id), so no script may read both.
        self.reads_parent_in_script = not isinstance(client, RedisCluster)
        self._announce = client.register_script(WRITE_AND_ANNOUNCE)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._handler: RouteChangeHandler | None = None
        self._level_handler: LevelHandler | None = None
        self._gap_handler: GapHandler | None = None
        self._view_handler: ViewHandler | None = None
        self.views_received = 0
        self._bugs_logged: set[tuple[str, str]] = set()
        self.pod_id = os.urandom(8).hex().encode()
        self.incidents = 0
        self.down_since: float | None = None
        self.changes_received = 0
        self.subscriptions = 0  # pub/sub subscriptions made (1 + resubscriptions)
        self._first_subscription = asyncio.Event()
        self.ping_after_s = PUBSUB_PING_AFTER_S
        self.dead_after_s = PUBSUB_DEAD_AFTER_S

    @property
    def available(self) -> bool:
        return self._available

    @property
    def _setup_budget_s(self) -> float:
        # Connecting, loading scripts, subscribing: more than one command's budget.
        return max(self.timeout_s, 1.0)

    async def start(self) -> None:
        # Load the scripts now so a session's first touch is one EVALSHA, not EVAL + retry.
        try:
            await self._probe()
        except CAUGHT as exc:
            log.warning("redis %s is not reachable at start (%s): routing without it (each "
                        "pod computes the same routes) and reconnecting in the background. "
                        "Check SIDECAR_REDIS_URL and that Redis is running and reachable.",
                        self.label, describe(exc))
            self._trip()
        if self._handler is None and self._level_handler is None:
            return
        if not hasattr(self.client, "pubsub"):
            log.warning("this Redis client has no pub/sub: other pods learn a moved route "
                        "only on their own failover or first touch")
            if self._level_handler is not None and self._available:
                with contextlib.suppress(*CAUGHT):
                    await self._read_level()
            return
        self._listener = self.supervisor.start("redis pub/sub listener", self._listen,
                                               max_backoff_s=LISTENER_MAX_BACKOFF_S)
        if self._available:
            # Serve once subscribed (the subscription reads the published level), so the
            # first sessions already use the level and no change is missed in between.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._setup_budget_s * 2):
                    await self._first_subscription.wait()

    async def close(self) -> None:
        await self.supervisor.stop(self._reconnect_task)
        await self.supervisor.stop(self._listener)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._setup_budget_s):
                await self.client.aclose()

    async def _held(self, make: Callable[[], Awaitable[Any]], budget_s: float) -> Any:
        """`make()` on a permit, all within `budget_s`; raises what redis-py raises."""
        async with asyncio.timeout(budget_s), self._permits:
            return await make()

    async def _probe(self) -> None:
        async def load() -> None:
            await self.client.script_load(GET_OR_CREATE)
            await self.client.script_load(GET_OR_CREATE_CHILD)
            await self.client.script_load(WRITE_AND_ANNOUNCE)
            await self.client.script_load(CLOCK_SCRIPT)  # the traffic flush's clock read
            # A write, as the store's own calls are: a server that answers but refuses writes
            # (a replica behind a standalone URL, a full disk, OOM) is not back.
            await self.client.set(PROBE_KEY_PREFIX + self.pod_id.decode(), b"1", px=5000)
        await self._held(load, self._setup_budget_s)

    async def _read_level(self) -> None:
        level = await self._held(lambda: self.client.get(LEVEL_KEY), self._setup_budget_s)
        if level and self._level_handler is not None:
            self._level_handler(bytes(level).decode())

    def _trip(self, why: str = "") -> None:
        """`why`: what failed (empty when the caller has said it already)."""
        if self._available:
            self._available = False
            self.incidents += 1
            self.down_since = time.time()
            log.warning("redis %s is unavailable%s: routing without it (each pod computes "
                        "the same routes) until it answers again", self.label,
                        f" ({why})" if why else "")
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self.supervisor.start(
                "redis reconnect", self._reconnect, initial_backoff_s=RECONNECT_INTERVAL_S,
                max_backoff_s=RECONNECT_MAX_BACKOFF_S)

    async def _reconnect(self) -> None:
        """One probe after a pause; an exception makes the supervisor try again (backoff)."""
        await asyncio.sleep(RECONNECT_INTERVAL_S)
        await self._probe()
        log.info("redis %s is back after %.1f s", self.label,
                 time.time() - (self.down_since or time.time()))
        self._available = True
        self.down_since = None

    async def _call(self, op: str, make: Callable[[], Awaitable[Any]]) -> Any:
        if not self._available:
            self.counters.skipped += 1
            raise StoreUnavailable("redis unavailable")
        loop = asyncio.get_running_loop()
        started = loop.time()
        acquired: float | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._permits:
                    acquired = loop.time()
                    return await self._settled(make)
        except CAUGHT as exc:
            if isinstance(exc, TimeoutError) and (
                    acquired is None or acquired - started > self.timeout_s / 2):
                # The budget went on waiting for a connection: a burst, not an outage (a
                # command that had half the budget to itself and did not answer is one).
                self.counters.busy += 1
                raise StoreUnavailable("redis connections busy") from exc
            if classify(exc) is Fault.BUG:
                self.counters.bugs += 1
                self._log_bug(op, exc)
                raise StoreUnavailable(f"redis {op} failed: {describe(exc)}",
                                       retry=False) from exc
            if isinstance(exc, TimeoutError):
                self.counters.timeouts += 1
            else:
                self.counters.errors += 1
            self._trip(f"{op}: {describe(exc)}")
            raise StoreUnavailable(f"redis {op}: {describe(exc)}") from exc

    async def _settled(self, make: Callable[[], Awaitable[Any]]) -> Any:
        """`make()`, run again after a short pause while the Cluster redirects it in a loop
        (a slot changing hands, which settles within milliseconds): not an outage until
        the pauses are spent, and the caller's budget bounds them."""
        for pause in REDIRECT_LOOP_PAUSES_S:
            try:
                return await make()
            except CAUGHT as exc:
                if not redirect_loop(exc):
                    raise
            self.counters.redirect_loops += 1
            await asyncio.sleep(pause)
        return await make()

    def _log_bug(self, op: str, exc: BaseException) -> None:
        """Once per operation and exception type: the traceback says what to fix."""
        key = (op, describe(exc))
        if key in self._bugs_logged:
            return
        self._bugs_logged.add(key)
        log.error("redis %s %s failed with %s: a command or data bug, not an outage (the "
                  "store stays in use; further %s errors are counted in /stats as `bugs`)",
                  self.label, op, describe(exc), describe(exc), exc_info=exc)

    async def get_or_create(self, session: str, record: bytes) -> bytes:
        stored = await self._call("get_or_create", lambda: self._script(
            keys=[route_key(session)], args=[record, self.ttl_s]))
        if stored == record:
            self.counters.created += 1
        else:
            self.counters.found += 1
        return bytes(stored)

    async def get(self, session: str) -> bytes | None:
        return await self._call("get", lambda: self.client.get(route_key(session)))

    async def get_or_create_child(self, session: str, record: bytes, parent: str,
                                  pool: str | None, no_room: list[str], created_at: float,
                                  reason: str) -> tuple[bytes, str]:
        stored, how = await self._call("get_or_create_child", lambda: self._child_script(
            keys=[route_key(session), route_key(parent)],
            args=[record, self.ttl_s, pool or "", repr(created_at), reason, *no_room]))
        how = bytes(how).decode()
        if how == "found":
            self.counters.found += 1
        else:
            self.counters.created += 1
        return bytes(stored), how

    def on_change(self, handler: RouteChangeHandler) -> None:
        self._handler = handler

    def on_level(self, handler: LevelHandler) -> None:
        self._level_handler = handler

    def on_gap(self, handler: GapHandler) -> None:
        self._gap_handler = handler

    def on_view(self, handler: ViewHandler) -> None:
        self._view_handler = handler

    async def write(self, build: PipelineBuilder) -> list[Any]:
        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                build(pipe)
                return list(await pipe.execute())
        result: list[Any] = await self._call("write", run)
        return result

    def _announcement(self, session: str, record: bytes) -> bytes:
        return self.pod_id + b"\0" + session.encode() + b"\0" + record

    async def update(self, session: str, record: bytes,
                     changed_at: float | None = None) -> bytes | None:
        """Write a changed route and tell the other pods, in one round trip — unless it
        changed at `changed_at` and the stored route changed later: then nothing is
        written and that record comes back."""
        written = await self._call("update", lambda: self._announce(
            keys=[route_key(session)],
            args=[record, self.ttl_s, CHANGES_CHANNEL, self._announcement(session, record),
                  "" if changed_at is None else repr(changed_at)]))
        if written != 1:
            self.counters.later_kept += 1
            return bytes(written)
        return None

    async def forget(self, session: str) -> None:
        await self._call("forget", lambda: self._announce(
            keys=[route_key(session)],
            args=[b"", self.ttl_s, CHANGES_CHANNEL, self._announcement(session, b""), ""]))

    async def _listen(self) -> None:
        """One subscription, for as long as its connection lives: other pods' route changes
        and the scaler's load level. Raises when the connection breaks or goes silent; the
        supervisor then subscribes again."""
        loop = asyncio.get_running_loop()
        pubsub = self.client.pubsub()
        try:
            async with asyncio.timeout(self._setup_budget_s):
                await pubsub.subscribe(*self._channels)
            heard = pinged = loop.time()
            unconfirmed = len(self._channels)
            while True:
                async with asyncio.timeout(self.ping_after_s + self._setup_budget_s):
                    message = await pubsub.get_message(timeout=self.ping_after_s)
                now = loop.time()
                if message is None:
                    if now - heard > self.dead_after_s:
                        raise RedisSilent(f"nothing on the pub/sub connection for "
                                          f"{now - heard:.1f} s, not even a pong")
                    if now - pinged >= self.ping_after_s:
                        async with asyncio.timeout(self._setup_budget_s):
                            await pubsub.ping()
                        pinged = now
                    continue
                heard = now
                kind = message.get("type")
                if kind == "message":
                    self._receive(message)
                elif kind == "subscribe":
                    unconfirmed -= 1
                    if unconfirmed == 0:
                        await self._subscribed()
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()

    @property
    def _channels(self) -> tuple[str, ...]:
        return (CHANGES_CHANNEL, LEVEL_CHANNEL) + \
            ((VIEW_CHANNEL,) if self._view_handler is not None else ())

    async def _subscribed(self) -> None:
        """Catch up on what may have been published while no subscription was listening."""
        if self._level_handler is not None:
            await self._read_level()
        self.subscriptions += 1
        self._first_subscription.set()
        if self.subscriptions > 1:
            log.info("redis %s: pub/sub subscribed again; cached routes are re-read on "
                     "their next use", self.label)
            if self._gap_handler is not None:
                self._gap_handler()

    def _receive(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        try:
            if channel in (LEVEL_CHANNEL, LEVEL_CHANNEL.encode()):
                if self._level_handler is not None:
                    self._level_handler(bytes(message["data"]).decode())
            elif channel in (VIEW_CHANNEL, VIEW_CHANNEL.encode()):
                if self._view_handler is not None:
                    self.views_received += 1
                    self._view_handler(bytes(message["data"]))
            else:
                self._dispatch(message["data"])
        except Exception:  # a bad message must not stop the listener
            log.exception("could not apply a message from %s", channel)

    def _dispatch(self, data: bytes) -> None:
        pod, _, rest = data.partition(b"\0")
        if pod == self.pod_id or self._handler is None:
            return
        session, _, record = rest.partition(b"\0")
        self.changes_received += 1
        self._handler(session.decode(), record)

    async def refresh(self, sessions: list[str]) -> None:
        async def expire_all() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for session in sessions:
                    pipe.expire(route_key(session), self.ttl_s)
                await pipe.execute()
        await self._call("refresh", expire_all)


def _no_client_setinfo() -> dict[str, Any]:
    try:
        import redis.driver_info  # noqa: F401  (redis-py 7+: driver_info=None disables it)
    except ImportError:
        return {"lib_name": None, "lib_version": None}
    return {"driver_info": None}


_NO_CLIENT_SETINFO = _no_client_setinfo()


def connect_redis(url: str, mode: str = "standalone", timeout_s: float = 0.05,
                  max_connections: int = 32, sentinel_master: str | None = None,
                  ca_file: str | None = None) -> Any:
    """Build the redis-py asyncio client for a URL and mode (no I/O yet). Its pool holds
    `max_connections` for commands (RedisStore's permits) plus one for the pub/sub listener:
    per node in Cluster, towards the current primary with Sentinel."""
    # A new connection costs only the TCP handshake: RESP2 needs no HELLO, no CLIENT
    # SETINFO, and no health-check PING (a dead connection fails its command, which trips
    # the store and reconnects in the background instead; the listener pings on its own).
    pooled = max_connections + 1
    common: dict[str, Any] = {
        "socket_connect_timeout": max(timeout_s, 0.5),
        "health_check_interval": 0,
        "protocol": 2,
        **_NO_CLIENT_SETINFO,
    }
    tls = url.startswith("rediss://")
    if tls:
        # redis-py's own defaults already verify; spelled out because a proxy holding
        # session routes must never fall back to an unverified server.
        common.update(ssl_cert_reqs="required", ssl_check_hostname=True, ssl_ca_certs=ca_file)
    if mode == "cluster":
        return RedisCluster.from_url(url, max_connections=pooled, **common)
    if mode == "sentinel":
        parts = urlsplit(url)
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port) if port.isdigit() else 26379))
        db = int(parts.path.strip("/") or 0)
        # With rediss:// the sentinels and the servers they name all speak TLS.
        sentinel_kwargs = {k: v for k, v in common.items()
                           if k.startswith(("socket_", "ssl_"))} | ({"ssl": True} if tls else {})
        sentinel = Sentinel(hosts, password=parts.password, username=parts.username,
                            db=db, sentinel_kwargs=sentinel_kwargs, ssl=tls, **common)
        return sentinel.master_for(sentinel_master or "mymaster", max_connections=pooled)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pooled, timeout=None, **common)
    return aioredis.Redis(connection_pool=pool)


def make_store(settings: Settings, supervisor: Supervisor | None = None) -> RouteStore:
    if settings.redis_url is None:
        return MemoryStore(settings.session_ttl_s)
    client = connect_redis(settings.redis_url, settings.redis_mode, settings.redis_timeout_s,
                           settings.redis_max_connections, settings.redis_sentinel_master,
                           settings.redis_ca_file)
    return RedisStore(client, settings.session_ttl_s, settings.redis_timeout_s,
                      redact_url(settings.redis_url), settings.redis_max_connections,
                      supervisor)
