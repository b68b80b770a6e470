"""Traffic the scaler sees: per-pool counters kept in memory by each sidecar and flushed to
Redis in one pipelined write every few seconds (never per request), and the reader the
scaler uses.

Layout (both sides live here so they cannot drift). Every time in it is Redis's: a sidecar
learns the offset between its clock and Redis's at each flush (`RedisClock`), so a sidecar
whose clock is off still writes where the scaler reads.

    llmsc:traffic:clock:{llmsc:scaler:leader}
                                      never written: a script keyed on it returns Redis's
                                      `TIME` at each flush (RedisClock)
    llmsc:traffic:{<pool>}:<bucket>   hash: requests, prompt_tokens, completion_tokens
                                      (bucket = Redis unix time // 5; every sidecar
                                      HINCRBYs the same key, so the sum is made by Redis;
                                      expires)
    llmsc:inflight:{<pool>}           hash: <pod id> → "<in-flight>:<unix time>" (heartbeat;
                                      stale fields are ignored and pruned)

The same heartbeat per endpoint, and each model pod's own load, are loads.py's
(`llmsc:epinflight:{<pool>}`, `llmsc:podload:{<pool>}`), written in the same flush.

A tick reads `buckets + 2` keys per pool in two pipelined round trips, however many
sidecars there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sidecar.supervise import Supervisor, cancel_and_wait

log = logging.getLogger("sidecar.traffic")

BUCKET_S = 5
BUCKET_TTL_S = 900
HEARTBEAT_TTL_S = 60
STALE_AFTER_S = 20.0
FLUSH_INTERVAL_S = 2.0
# RedisClock's key: in the slot of the scaler's lock (hash tag), see RedisClock.
CLOCK_KEY = "llmsc:traffic:clock:{llmsc:scaler:leader}"
# Keyed so that it pipelines and routes on every topology; read-only, so Redis 6.2 runs it
# even though TIME is not deterministic. Sent by its SHA (the store loads it with its own
# scripts, and again after Redis comes back), so the sidecar's ACL needs no `EVAL`.
CLOCK_SCRIPT = "return redis.call('TIME')"
CLOCK_SHA = hashlib.sha1(CLOCK_SCRIPT.encode()).hexdigest()


def traffic_key(pool: str, bucket: int) -> str:
    return f"llmsc:traffic:{{{pool}}}:{bucket}"


def inflight_key(pool: str) -> str:
    return f"llmsc:inflight:{{{pool}}}"


class RedisClock:
    """Redis's clock as this process sees it: its own clock plus the offset learned at every
    flush (the midpoint of send and receipt is taken as the moment Redis answered, so the
    error is at most half a round trip).

    Why Redis's clock and not each sidecar's: every sidecar adds into the same 5-second
    buckets and the scaler reads the ones that closed, so they must agree on when a bucket
    closes; a fleet's hosts drift apart, the one Redis they share is one clock.

    How it is read: each flush runs `TIME` inside a script keyed on CLOCK_KEY. Unlike a bare
    `TIME` this is keyed, so it pipelines on every topology, and on Cluster it lands on one
    node for the whole fleet: the node of the scaler's lock, whose `TIME` the scaler reads.
    (A stream entry's ID would also carry the clock, but it never goes below the stream's
    last ID: after Redis's clock stepped back, every sidecar would learn a wrong offset.)"""

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self.local = local
        self.offset: float | None = None   # Redis time − local time; None until learned

    @property
    def synced(self) -> bool:
        return self.offset is not None

    def to_redis(self, local: float) -> float:
        return local + (self.offset or 0.0)

    def now(self) -> float:
        return self.to_redis(self.local())

    def observe(self, reply: Any, sent_at: float, received_at: float) -> None:
        """Learn the offset from a `TIME` reply (`[seconds, microseconds]`) sent at `sent_at`
        and received at `received_at` (local clock); a reply not in that form is ignored."""
        try:
            seconds, micros = (int(part) for part in reply)
        except (TypeError, ValueError):
            return
        self.offset = seconds + micros / 1e6 - (sent_at + received_at) / 2


class PoolCounters:
    __slots__ = ("completion_tokens", "prompt_tokens", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0


class Traffic:
    """This pod's counts since the last flush; the flush adds them to the shared buckets."""

    def __init__(self, pod_id: str | None = None, clock: RedisClock | None = None) -> None:
        self.pod_id = pod_id or os.urandom(6).hex()
        self.clock = clock or RedisClock()
        self.counts: dict[str, PoolCounters] = {}
        self.totals: dict[str, PoolCounters] = {}
        self.flushes = 0
        self._task: asyncio.Task[None] | None = None

    def count(self, pool: str, prompt_tokens: int, completion_tokens: int) -> None:
        counters = self.counts.get(pool)
        if counters is None:
            counters = self.counts[pool] = PoolCounters()
        counters.requests += 1
        counters.prompt_tokens += prompt_tokens
        counters.completion_tokens += completion_tokens

    def take(self) -> dict[str, PoolCounters]:
        counts, self.counts = self.counts, {}
        for pool, c in counts.items():
            total = self.totals.setdefault(pool, PoolCounters())
            total.requests += c.requests
            total.prompt_tokens += c.prompt_tokens
            total.completion_tokens += c.completion_tokens
        return counts

    def write(self, pipe: Any, inflight: dict[str, int], now: float) -> bool:
        """Queue this flush's commands on a Redis pipeline (one round trip for all pools).

        The first command always reads Redis's clock: hand its reply to `clock.observe`.
        `now` is this process's clock; buckets and stamps are written in Redis's. Until the
        offset is known, only that read is queued and the counts wait (returns False: flush
        again once the reply is in)."""
        pipe.evalsha(CLOCK_SHA, 1, CLOCK_KEY)
        if not self.clock.synced:
            return False
        now = self.clock.to_redis(now)
        bucket = int(now // BUCKET_S)
        counts = self.take()
        for pool in sorted(set(counts) | set(inflight)):
            c = counts.get(pool)
            if c is not None and c.requests:
                key = traffic_key(pool, bucket)
                pipe.hincrby(key, "requests", c.requests)
                pipe.hincrby(key, "prompt_tokens", c.prompt_tokens)
                pipe.hincrby(key, "completion_tokens", c.completion_tokens)
                pipe.expire(key, BUCKET_TTL_S)
            heartbeat = inflight_key(pool)
            pipe.hset(heartbeat, self.pod_id, f"{inflight.get(pool, 0)}:{now:.3f}")
            pipe.expire(heartbeat, HEARTBEAT_TTL_S)
        self.flushes += 1
        return True

    def start(self, flush: Any, supervisor: Supervisor | None = None) -> None:
        """Run `await flush()` every FLUSH_INTERVAL_S until `stop()`; a flush that raises
        restarts the loop after a backoff (counted by the supervisor)."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_S)
                await flush()
        self._task = (supervisor or Supervisor()).start("traffic flush", loop)

    async def stop(self, flush: Any) -> None:
        if self._task is not None:
            await cancel_and_wait((self._task,))
        with contextlib.suppress(Exception):
            await flush()  # the last counts are not lost on a graceful stop

    def view(self) -> dict[str, dict[str, int]]:
        pools = set(self.totals) | set(self.counts)
        out = {}
        for pool in sorted(pools):
            t = self.totals.get(pool, PoolCounters())
            c = self.counts.get(pool, PoolCounters())
            out[pool] = {"requests": t.requests + c.requests,
                         "prompt_tokens": t.prompt_tokens + c.prompt_tokens,
                         "completion_tokens": t.completion_tokens + c.completion_tokens}
        return out


@dataclass(frozen=True, slots=True)
class PoolTraffic:
    """The global view of one pool over the last few complete buckets."""

    reporting_pods: int          # sidecars with a fresh heartbeat (0: metrics are missing)
    inflight: int
    requests: int
    tokens_per_s: list[float]    # one rate per complete bucket, oldest first

    @property
    def missing(self) -> bool:
        return self.reporting_pods == 0


async def read_traffic(client: Any, pools: Iterable[str], now: float, buckets: int
                       ) -> dict[str, PoolTraffic]:
    """One pipelined read of `buckets` complete buckets and the heartbeats of each pool."""
    pools = list(pools)
    last = int(now // BUCKET_S) - 1  # the current bucket is still filling
    wanted = list(range(last - buckets + 1, last + 1))
    async with client.pipeline(transaction=False) as pipe:
        for pool in pools:
            for bucket in wanted:
                pipe.hgetall(traffic_key(pool, bucket))
            pipe.hgetall(inflight_key(pool))
        replies = await pipe.execute()
    view: dict[str, PoolTraffic] = {}
    stale: dict[str, list[bytes]] = {}
    for i, pool in enumerate(pools):
        chunk = replies[i * (buckets + 1):(i + 1) * (buckets + 1)]
        rates = []
        requests = 0
        for bucket in chunk[:-1]:
            tokens = int(bucket.get(b"prompt_tokens", 0)) + int(bucket.get(b"completion_tokens", 0))
            requests += int(bucket.get(b"requests", 0))
            rates.append(tokens / BUCKET_S)
        pods = inflight = 0
        for pod, value in chunk[-1].items():
            count, _, stamp = value.partition(b":")
            if now - float(stamp or 0) > STALE_AFTER_S:
                stale.setdefault(pool, []).append(pod)
                continue
            pods += 1
            inflight += int(count)
        view[pool] = PoolTraffic(pods, inflight, requests, rates)
    await prune(client, inflight_key, stale)
    return view


async def prune(client: Any, key_of: Callable[[str], str], stale: dict[str, list[bytes]]
                 ) -> None:
    """Delete stale report fields (per pool) in one pipelined write."""
    if not stale:
        return
    async with client.pipeline(transaction=False) as pipe:
        for pool, fields in stale.items():
            pipe.hdel(key_of(pool), *fields)
        await pipe.execute()
