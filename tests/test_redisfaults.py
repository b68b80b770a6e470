"""One boundary for Redis failures: what redis-py raises in every mode is judged as Redis
unavailable or as a bug, and the store turns every one of them into `StoreUnavailable`
(tripping its breaker only for the first kind)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterError,
    CrossSlotTransactionError,
    DataError,
    MaxClientsReachedError,
    MaxConnectionsError,
    RedisClusterException,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.redisfaults import CAUGHT, Fault, classify
from sidecar.routing.store import RedisStore, StoreUnavailable


def reply(text: str) -> Exception:
    """The exception redis-py raises for this error reply (its own parser)."""
    exc: Exception = BaseParser.parse_error(text)
    return exc


SCRIPT_62 = ("Error running script (call to f_95f6): @user_script:4: @user_script: 4: ")

UNAVAILABLE = [
    RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    RedisTimeoutError("Timeout reading from socket"),
    TimeoutError(),
    OSError(errno.ECONNRESET, "Connection reset by peer"),
    ConnectionResetError(),
    MaxConnectionsError("Too many connections"),
    MaxClientsReachedError("max number of clients reached"),
    AuthenticationError("invalid username-password pair"),
    BusyLoadingError("Redis is loading the dataset in memory"),
    reply("READONLY You can't write against a read only replica."),
    reply("READONLY You can't write against a read only replica. script: 95f6, on "
          "@user_script:4."),
    reply("ERR " + SCRIPT_62 + "-READONLY You can't write against a read only replica."),
    reply("NOPERM this user has no permissions to run the 'evalsha' command"),
    reply("ERR " + SCRIPT_62 + "The user executing the script can't run this command or "
          "subcommand"),
    reply("WRONGPASS invalid username-password pair or user is disabled."),
    reply("NOAUTH Authentication required."),
    reply("MOVED 3999 127.0.0.1:6381"),
    reply("ASK 3999 127.0.0.1:6381"),
    reply("TRYAGAIN Multiple keys request during rehashing of slot"),
    reply("CLUSTERDOWN The cluster is down"),
    reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
    reply("LOADING Redis is loading the dataset in memory"),
    reply("OOM command not allowed when used memory > 'maxmemory'."),
    reply("ERR " + SCRIPT_62 + "-OOM command not allowed when used memory > 'maxmemory'."),
    reply("NOSCRIPT No matching script. Please use EVAL."),
    reply("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to "
          "persist to disk. Commands that may modify the data set are disabled."),
    reply("BUSY Redis is busy running a script."),
    RedisClusterUnreachableError("Redis Cluster cannot be connected. Please provide at least "
                                 "one reachable node: Error 111"),
    SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
    RedisClusterException("Redis Cluster cannot be connected. Please provide at least one "
                          "reachable node: Timeout connecting to server"),
    RedisClusterException("All slots are not covered after query all startup_nodes."),
    ClusterError("TTL exhausted."),
]

BUGS = [
    reply("ERR unknown command 'FOO', with args beginning with: "),
    reply("WRONGTYPE Operation against a key holding the wrong kind of value"),
    reply("CROSSSLOT Keys in request don't hash to the same slot"),
    reply("ERR " + SCRIPT_62 + "Script attempted to access a non local key in a cluster node"),
    RedisClusterException("ERROR: Calling pipelined function publish is blocked when running "
                          "redis in cluster mode..."),
    RedisClusterException("No way to dispatch this command to Redis Cluster. Missing key."),
    CrossSlotTransactionError("Transaction keys must be in the same slot"),
    DataError("Invalid input of type: 'NoneType'."),
]


@pytest.mark.parametrize("exc", UNAVAILABLE, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_what_redis_raises_while_away_or_moving_is_unavailable(exc: Exception) -> None:
    assert isinstance(exc, CAUGHT)
    assert classify(exc) is Fault.UNAVAILABLE


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_a_command_redis_refuses_as_wrong_is_a_bug(exc: Exception) -> None:
    assert isinstance(exc, CAUGHT)
    assert classify(exc) is Fault.BUG


def test_an_exception_from_outside_redis_is_a_bug() -> None:
    assert classify(ValueError("x")) is Fault.BUG
    assert not isinstance(ValueError("x"), CAUGHT)


class RaisingClient:
    """A redis-py stand-in whose every command raises `error`."""

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("unset")

    def register_script(self, script: str) -> Any:
        async def run(keys: list[str], args: list[Any]) -> Any:
            raise self.error
        return run

    async def get(self, key: str) -> Any:
        raise self.error

    async def script_load(self, script: str) -> Any:
        raise self.error

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("exc", UNAVAILABLE + BUGS,
                         ids=lambda e: f"{type(e).__name__}:{e}"[:60])
async def test_every_store_call_turns_any_redis_exception_into_store_unavailable(
        exc: Exception) -> None:
    client = RaisingClient()
    client.error = exc
    store = RedisStore(client, 60, 1.0, "test")
    try:
        for call in (lambda: store.get("s"), lambda: store.get_or_create("s", b"r"),
                     lambda: store.update("s", b"r"), lambda: store.forget("s")):
            store._available = True  # each call meets the exception, not the open breaker
            with pytest.raises(StoreUnavailable):
                await call()
            if classify(exc) is Fault.UNAVAILABLE:
                assert not store.available, "Redis away trips the breaker"
            else:
                assert store.available, "a bug is logged, not taken for an outage"
        if classify(exc) is Fault.BUG:
            assert store.counters.bugs == 4 and store.incidents == 0
        else:
            assert store.counters.errors + store.counters.timeouts == 4
    finally:
        await store.close()


async def test_waiting_for_a_busy_pool_is_not_an_outage() -> None:
    class SlowClient(RaisingClient):
        async def get(self, key: str) -> Any:
            await asyncio.sleep(1.6)  # within the 2 s budget, but most of it
            return b"r"

    store = RedisStore(SlowClient(), 60, 2.0, "test", max_connections=1)
    try:
        results = await asyncio.gather(*(store.get("s") for _ in range(3)),
                                       return_exceptions=True)
        # One permit: the first call answers; the others spent their budget waiting.
        assert results[0] == b"r"
        assert all(isinstance(r, StoreUnavailable) for r in results[1:])
        assert store.counters.busy == 2 and store.counters.timeouts == 0
        assert store.available and store.incidents == 0
    finally:
        await store.close()


async def test_a_redirect_loop_while_a_slot_changes_hands_is_run_again_not_an_outage() -> None:
    """The Cluster client gives up ("TTL exhausted") while a slot's old owner already points
    at the new one and the new one does not know yet; the command never ran. It is run
    again after a short pause; only a loop that outlasts the pauses trips the breaker."""
    class SettlingClient(RaisingClient):
        def __init__(self, loops: int) -> None:
            super().__init__()
            self.loops = loops

        async def get(self, key: str) -> Any:
            if self.loops:
                self.loops -= 1
                raise ClusterError("TTL exhausted.")
            return b"r"

    store = RedisStore(SettlingClient(loops=2), 60, 1.0, "test")
    try:
        assert await store.get("s") == b"r"
        assert store.counters.redirect_loops == 2 and store.counters.errors == 0
        assert store.available and store.incidents == 0
    finally:
        await store.close()
    store = RedisStore(SettlingClient(loops=10), 60, 1.0, "test")
    try:
        with pytest.raises(StoreUnavailable):
            await store.get("s")
        assert store.counters.redirect_loops == 3 and store.counters.errors == 1
        assert not store.available
    finally:
        await store.close()
