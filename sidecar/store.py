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
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from sidecar.config import Settings, redact_url

log = logging.getLogger("sidecar.store")

KEY_PREFIX = "llmsc:"
# Route changes made by one pod reach the others here: "<pod id>\0<session>\0<record>"
# (an empty record means the session was forgotten).
CHANGES_CHANNEL = "llmsc:route-changes"
# The scaler publishes the load level here and keeps it under LEVEL_KEY for late joiners.
LEVEL_CHANNEL = "llmsc:load-level"
LEVEL_KEY = "llmsc:load-level"
RECONNECT_INTERVAL_S = 0.5

RouteChangeHandler = Callable[[str, bytes], None]
LevelHandler = Callable[[str], None]
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


def route_key(session: str) -> str:
    # The braces are a Cluster hash tag: every key of a session lands in one slot.
    return f"{KEY_PREFIX}{{{session}}}"


class StoreUnavailable(Exception):
    """The store cannot answer within its budget; route without it."""


class StoreCounters:
    __slots__ = ("created", "errors", "found", "skipped", "timeouts")

    def __init__(self) -> None:
        self.found = 0      # first touch found an existing record
        self.created = 0    # first touch created the record
        self.errors = 0     # operations that failed (connection, server error)
        self.timeouts = 0   # operations past the budget
        self.skipped = 0    # operations not attempted because the store was unavailable

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

    async def update(self, session: str, record: bytes) -> None: ...

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

    async def update(self, session: str, record: bytes) -> None:
        self._records[session] = (record, time.monotonic() + self.ttl_s)

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

    async def write(self, build: PipelineBuilder) -> list[Any]:
        return []  # no global view to feed

    def __len__(self) -> int:
        return len(self._records)


class RedisStore:
    """Routes in Redis, with a per-operation budget and a circuit breaker."""

    def __init__(self, client: Any, ttl_s: int, timeout_s: float, label: str) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.label = label
        self.kind = "redis"
        self.counters = StoreCounters()
        self._available = True
        self._script = client.register_script(GET_OR_CREATE)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._handler: RouteChangeHandler | None = None
        self._level_handler: LevelHandler | None = None
        self.pod_id = os.urandom(8).hex().encode()
        self.incidents = 0
        self.down_since: float | None = None
        self.changes_received = 0

    @property
    def available(self) -> bool:
        return self._available

    async def start(self) -> None:
        # Load the script now so a session's first touch is one EVALSHA, not EVAL + retry.
        try:
            async with asyncio.timeout(max(self.timeout_s, 1.0)):
                await self.client.script_load(GET_OR_CREATE)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("redis %s is not reachable at start (%s): routing without it (each "
                        "pod computes the same routes) and reconnecting in the background. "
                        "Check SIDECAR_REDIS_URL and that Redis is running and reachable.",
                        self.label, type(exc).__name__)
            self._trip()
        if self._level_handler is not None and self._available:
            # Before serving, so the first sessions already use the published level.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(max(self.timeout_s, 1.0)):
                    level = await self.client.get(LEVEL_KEY)
                if level:
                    self._level_handler(level.decode())
        if self._handler is not None or self._level_handler is not None:
            if hasattr(self.client, "pubsub"):
                self._listener = asyncio.get_running_loop().create_task(self._listen())
            else:
                log.warning("this Redis client has no pub/sub: other pods learn a moved route "
                            "only on their own failover or first touch")

    async def close(self) -> None:
        for task in (self._reconnect_task, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await self.client.aclose()

    def _trip(self) -> None:
        if self._available:
            self._available = False
            self.incidents += 1
            self.down_since = time.time()
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                async with asyncio.timeout(max(self.timeout_s, 1.0)):
                    await self.client.script_load(GET_OR_CREATE)
            except (RedisError, OSError, TimeoutError):
                continue
            log.info("redis %s is back after %.1f s", self.label,
                     time.time() - (self.down_since or time.time()))
            self._available = True
            self.down_since = None
            return

    async def _call(self, make: Any) -> Any:
        if not self._available:
            self.counters.skipped += 1
            raise StoreUnavailable("redis unavailable")
        try:
            async with asyncio.timeout(self.timeout_s):
                return await make()
        except TimeoutError as exc:
            self.counters.timeouts += 1
            self._trip()
            raise StoreUnavailable("redis timed out") from exc
        except (RedisError, OSError) as exc:
            self.counters.errors += 1
            self._trip()
            raise StoreUnavailable(f"redis error: {type(exc).__name__}") from exc

    async def get_or_create(self, session: str, record: bytes) -> bytes:
        stored = await self._call(
            lambda: self._script(keys=[route_key(session)], args=[record, self.ttl_s]))
        if stored == record:
            self.counters.created += 1
        else:
            self.counters.found += 1
        return bytes(stored)

    async def get(self, session: str) -> bytes | None:
        return await self._call(lambda: self.client.get(route_key(session)))

    def on_change(self, handler: RouteChangeHandler) -> None:
        self._handler = handler

    def on_level(self, handler: LevelHandler) -> None:
        self._level_handler = handler

    async def write(self, build: PipelineBuilder) -> list[Any]:
        async def run() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                build(pipe)
                return list(await pipe.execute())
        result: list[Any] = await self._call(run)
        return result

    def _announcement(self, session: str, record: bytes) -> bytes:
        return self.pod_id + b"\0" + session.encode() + b"\0" + record

    async def update(self, session: str, record: bytes) -> None:
        """Write a changed route and tell the other pods, in one round trip."""
        async def write() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(route_key(session), record, ex=self.ttl_s)
                pipe.publish(CHANGES_CHANNEL, self._announcement(session, record))
                await pipe.execute()
        await self._call(write)

    async def forget(self, session: str) -> None:
        async def delete() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(route_key(session))
                pipe.publish(CHANGES_CHANNEL, self._announcement(session, b""))
                await pipe.execute()
        await self._call(delete)

    async def _listen(self) -> None:
        """Receive other pods' route changes and the scaler's load level; resubscribes by
        itself after a Redis outage (and re-reads the level it may have missed)."""
        resubscribing = False
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(CHANGES_CHANNEL, LEVEL_CHANNEL)
                if resubscribing and self._level_handler is not None:
                    level = await self.client.get(LEVEL_KEY)
                    if level:
                        self._level_handler(level.decode())
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    if message.get("channel") in (LEVEL_CHANNEL, LEVEL_CHANNEL.encode()):
                        if self._level_handler is not None:
                            self._level_handler(bytes(message["data"]).decode())
                    else:
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                log.debug("pub/sub listener lost redis (%s)", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            resubscribing = True
            await asyncio.sleep(RECONNECT_INTERVAL_S)

    def _dispatch(self, data: bytes) -> None:
        pod, _, rest = data.partition(b"\0")
        if pod == self.pod_id or self._handler is None:
            return
        session, _, record = rest.partition(b"\0")
        self.changes_received += 1
        try:
            self._handler(session.decode(), record)
        except Exception:  # a bad message must not stop the listener
            log.exception("could not apply a route change from another pod")

    async def refresh(self, sessions: list[str]) -> None:
        async def expire_all() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for session in sessions:
                    pipe.expire(route_key(session), self.ttl_s)
                await pipe.execute()
        await self._call(expire_all)


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
    """Build the redis-py asyncio client for a URL and mode (no I/O yet)."""
    # A new connection costs only the TCP handshake: RESP2 needs no HELLO, no CLIENT
    # SETINFO, and no health-check PING (a dead connection fails its command, which trips
    # the store and reconnects in the background instead).
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
        return RedisCluster.from_url(url, max_connections=max_connections, **common)
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
        return sentinel.master_for(sentinel_master or "mymaster",
                                   max_connections=max_connections)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, **common)
    return aioredis.Redis(connection_pool=pool)


def make_store(settings: Settings) -> RouteStore:
    if settings.redis_url is None:
        return MemoryStore(settings.session_ttl_s)
    client = connect_redis(settings.redis_url, settings.redis_mode, settings.redis_timeout_s,
                           settings.redis_max_connections, settings.redis_sentinel_master,
                           settings.redis_ca_file)
    return RedisStore(client, settings.session_ttl_s, settings.redis_timeout_s,
                      redact_url(settings.redis_url))
