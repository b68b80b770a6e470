"""The one boundary for Redis failures: every exception redis-py (standalone, Sentinel or
Cluster), the socket layer or a timeout can raise is classified here, once, into "Redis is
unavailable: degrade and reconnect" or "a bug: log it with its context".

redis-py has two exception trees: `RedisError` and, for Cluster, `RedisClusterException`
(which is *not* a `RedisError`: `RedisClusterUnreachableError` after a full outage,
`SlotNotCoveredError` while slots move, and plain `RedisClusterException`s that are either
"cannot be connected" or a command the cluster client refuses). Catching only the first lets
the second kill whatever task met it.
"""

from __future__ import annotations

import enum
import re

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    CrossSlotTransactionError,
    DataError,
    InvalidPipelineStack,
    InvalidResponse,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisClusterUnreachableError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)


class Fault(enum.Enum):
    UNAVAILABLE = "unavailable"  # degrade (route without Redis) and reconnect in the background
    BUG = "bug"                  # our command or our data is wrong: log with context


# What Redis itself answers while it is unhealthy or moving (a replica promoted, a cluster
# slot migrating, a server loading or out of memory, an ACL changed): transient from our
# side. redis-py strips the code from the message of the replies it maps to a class
# (READONLY → ReadOnlyError), so the class is checked first, then `status_code`, then text.
_TRANSIENT_REPLIES = frozenset({"READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
                                "MOVED", "ASK", "OOM", "BUSY", "NOPERM", "NOAUTH", "WRONGPASS",
                                "NOREPLICAS", "NOSCRIPT", "UNBLOCKED",
                                # writes refused while snapshots fail (a full disk): Redis's state
                                "MISCONF"})
_TRANSIENT_CLASSES: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, RedisConnectionError, RedisTimeoutError,  # sockets, deadlines,
    # pool exhaustion (MaxConnectionsError) and AUTH failures are ConnectionErrors
    InvalidResponse,  # a garbled reply: the connection is what is broken
    BusyLoadingError, NoScriptError, ReadOnlyError, NoPermissionError, OutOfMemoryError,
    ClusterDownError, TryAgainError, AskError,  # AskError covers MovedError
    RedisClusterUnreachableError, SlotNotCoveredError)
# Redis 6.2 wraps a reply met inside a script: "ERR Error running script (...): @user_script:4:
# @user_script: 4: -READONLY You can't write...", and words an ACL denial there (6.2 and 7)
# without a code.
_INNER_REPLY = re.compile(r"(?:^|\s)-([A-Z]+)\b")
_ACL_IN_SCRIPT = "executing the script can't run this command"
# A plain RedisClusterException is a refused command (no key, keys across slots: our bug)
# unless its text says the cluster could not be reached or has no owner for a slot.
_CLUSTER_UNREACHABLE_TEXT = ("cannot be connected", "not covered", "could not agree",
                             "no targets were found", "doesn't exist in the cluster")

CAUGHT: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError,
                                          TimeoutError)
"""Everything a Redis call may raise that is about Redis (for `except CAUGHT`); anything else
escapes as the bug it is."""


def classify(exc: BaseException) -> Fault:
    """Unavailable (degrade and reconnect) or a bug (log it): one decision for every caller."""
    if isinstance(exc, _TRANSIENT_CLASSES):
        return Fault.UNAVAILABLE
    if isinstance(exc, (CrossSlotTransactionError, InvalidPipelineStack, DataError)):
        return Fault.BUG
    if isinstance(exc, RedisClusterException):
        text = str(exc).lower()
        return Fault.UNAVAILABLE if any(t in text for t in _CLUSTER_UNREACHABLE_TEXT) \
            else Fault.BUG
    if isinstance(exc, ResponseError):
        # An ACL revoked (NOPERM) is an operator's change, not our bug: degrade and keep
        # retrying, so restoring the grant heals every pod without a restart.
        code = getattr(exc, "status_code", None) or ""
        text = str(exc).lstrip("-")
        words = {code.upper(), text.split(" ", 1)[0].upper(), *_INNER_REPLY.findall(text)}
        if words & _TRANSIENT_REPLIES or _ACL_IN_SCRIPT in text:
            return Fault.UNAVAILABLE
        return Fault.BUG
    if isinstance(exc, ClusterError):
        return Fault.UNAVAILABLE  # "TTL exhausted": the cluster kept redirecting us
    if isinstance(exc, RedisError):
        return Fault.BUG  # InvalidResponse, PubSubError, WatchError...: a client misuse
    return Fault.BUG


def redirect_loop(exc: BaseException) -> bool:
    """The Cluster client gave up after its redirections went round (redis-py's "TTL
    exhausted"): a slot changing hands, its new owner not told yet while its old one already
    points there. It settles within milliseconds; the command never ran."""
    return isinstance(exc, ClusterError) and "TTL exhausted" in str(exc)


def describe(exc: BaseException) -> str:
    """A short, secret-free name for logs and counters (never the URL or a password)."""
    return type(exc).__name__
