"""Upstream outcomes and the sidecar's own errors: the one vocabulary that retries, ejection
and counters read.

    Outcome
     ├── OK                  response headers arrived with a status the app should see
     ├── CLIENT_ERROR        4xx other than 429: the app's own mistake, passed through untouched
     ├── RETRYABLE_STATUS    429 / 500 / 502 / 503 / 504 before any byte reached the app
     ├── CONNECT_ERROR       refused, unreachable, TLS failure: the pod is not there
     ├── CONNECTION_LOST     a reused keep-alive connection closed before any response (the
     │                       server's idle close racing our reuse): retried once on the
     │                       same endpoint, never an ejection by itself
     ├── CONNECT_TIMEOUT     no TCP connection within SIDECAR_CONNECT_TIMEOUT_S
     ├── FIRST_BYTE_TIMEOUT  no response headers (streams: no generated content) within
     │                       SIDECAR_FIRST_BYTE_TIMEOUT_S
     ├── BROKEN_BEFORE_CONTENT  upstream broke before anything reached the app (a non-streamed
     │                       body cut short, a stream that died during prefill): retried
     └── BROKEN_STREAM       upstream broke after bytes reached the app: never retried
"""

from __future__ import annotations

import email.utils
import time
from enum import Enum

import orjson

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class Outcome(Enum):
    OK = "ok"
    CLIENT_ERROR = "client_error"
    RETRYABLE_STATUS = "retryable_status"
    CONNECT_ERROR = "connect_error"
    CONNECTION_LOST = "connection_lost"
    CONNECT_TIMEOUT = "connect_timeout"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    BROKEN_BEFORE_CONTENT = "broken_before_content"
    BROKEN_STREAM = "broken_stream"

    @property
    def retryable(self) -> bool:
        """May the request be sent again elsewhere (nothing has reached the app yet)?"""
        return self in _RETRYABLE

    @property
    def endpoint_failed(self) -> bool:
        """Does this outcome count against the endpoint's health?"""
        return self in _ENDPOINT_FAILURES

    @property
    def overload(self) -> bool:
        """Does this outcome suggest an overloaded upstream? Only these retries draw on the
        retry budget: retrying them multiplies load on a pool that is already struggling.
        A pod that is gone (refused, reset, cut off) is ejected at once and its work moves
        to a healthy pod instead, bounded by SIDECAR_MAX_ATTEMPTS."""
        return self in (Outcome.RETRYABLE_STATUS, Outcome.FIRST_BYTE_TIMEOUT,
                        Outcome.CONNECT_TIMEOUT)

    @property
    def endpoint_unreachable(self) -> bool:
        """The pod is not there at all: eject at once rather than after a streak."""
        return self in (Outcome.CONNECT_ERROR, Outcome.CONNECT_TIMEOUT)


_RETRYABLE = frozenset({Outcome.RETRYABLE_STATUS, Outcome.CONNECT_ERROR, Outcome.CONNECTION_LOST,
                        Outcome.CONNECT_TIMEOUT, Outcome.FIRST_BYTE_TIMEOUT,
                        Outcome.BROKEN_BEFORE_CONTENT})
_ENDPOINT_FAILURES = _RETRYABLE | {Outcome.BROKEN_STREAM}


def classify_status(status: int) -> Outcome:
    if status in RETRYABLE_STATUSES:
        return Outcome.RETRYABLE_STATUS
    if 400 <= status < 500:
        return Outcome.CLIENT_ERROR
    return Outcome.OK


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def error_body(message: str, code: str, **extra: object) -> bytes:
    """A sidecar error in the OpenAI error shape."""
    error: dict[str, object] = {"message": message, "type": "sidecar_error", "code": code}
    error.update(extra)
    return orjson.dumps({"error": error})
