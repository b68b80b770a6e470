"""The one boundary for Redis failures: every exception redis-py (standalone, Sentinel or
Cluster), the socket layer or a timeout can raise is classified here, once, into "Redis is
unavailable: degrade and reconnect" or "a bug: log it with its context".

redis-py has two exception trees: `RedisError` and, for Cluster, `RedisClusterException`
(which is *not* a `RedisError`: `RedisClusterUnreachableError` after a full outage,
`SlotNotCoveredError` while slots move). Catching only the first lets the second kill
whatever task met it.
"""

from __future__ import annotations

import enum

from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    DataError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)


class Fault(enum.Enum):
    UNAVAILABLE = "unavailable"  # degrade (route without Redis) and reconnect in the background
    BUG = "bug"                  # our command or our data is wrong: log with context


# What Redis itself answers while it is unhealthy or moving (a replica promoted, a cluster
# slot migrating, a server loading or out of memory): transient from our side.
_TRANSIENT_REPLIES = ("READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "MOVED",
                      "ASK", "OOM", "BUSY", "NOPERM", "NOAUTH", "WRONGPASS", "NOREPLICAS",
                      "NOSCRIPT")

CAUGHT: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError,
                                          TimeoutError)
"""Everything a Redis call may raise that is about Redis (for `except CAUGHT`); anything else
escapes as the bug it is."""


def classify(exc: BaseException) -> Fault:
    """Unavailable (degrade and reconnect) or a bug (log it): one decision for every caller."""
    if isinstance(exc, (OSError, TimeoutError, RedisConnectionError, RedisTimeoutError,
                        RedisClusterException, NoScriptError)):
        # RedisClusterException covers an unreachable cluster and uncovered slots; a cluster
        # pipeline refusing a command is also one, but that is caught by tests, not here.
        return Fault.UNAVAILABLE
    if isinstance(exc, DataError):
        return Fault.BUG
    if isinstance(exc, ResponseError):
        # An ACL revoked (NOPERM) is an operator's change, not our bug: degrade and keep
        # retrying, so restoring the grant heals every pod without a restart.
        text = str(exc).lstrip("-").upper()
        return Fault.UNAVAILABLE if text.startswith(_TRANSIENT_REPLIES) else Fault.BUG
    if isinstance(exc, RedisError):
        return Fault.UNAVAILABLE
    return Fault.BUG


def describe(exc: BaseException) -> str:
    """A short, secret-free name for logs and counters (never the URL or a password)."""
    return type(exc).__name__
