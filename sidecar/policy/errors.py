"""Upstream outcomes and the sidecar's own errors: the one vocabulary that retries, ejection
and counters read.

    Outcome                 (what became of the work: Work)
     ├── OK                  DONE       a status the app should see
     ├── CLIENT_ERROR        DONE       4xx other than 429: the app's own mistake, passed
     │                                  through untouched
     ├── RETRYABLE_STATUS    NOT_TAKEN  429 / 503: the pod declined before doing the work
     ├── UPSTREAM_ERROR      DONE       500 / 502 / 504 and other 5xx: the pod (or a gateway
     │                                  before it) took the work and failed it; passed through
     ├── BAD_RESPONSE        DONE       the pod answered in HTTP, but not with a valid
     │                                  HTTP/1.1 response head, in a transfer coding
     │                                  other than chunked, or with a body whose framing
     │                                  breaks after a valid head (a bad chunk size): the
     │                                  app gets 502 (mid-stream: the stream ends broken);
     │                                  counts against the pod's health, but it was
     │                                  reachable. (Bytes that are not HTTP: CONNECT_ERROR)
     ├── CONNECT_ERROR       DROPPED    refused, unreachable, TLS failure, a fresh
     │                                  connection closed before any answer, or an answer
     │                                  that is not HTTP (not a model server's port): no
     │                                  pod holds it
     ├── CONNECTION_LOST     DROPPED    a reused keep-alive connection closed before any
     │                                  answer (the server's idle close racing our reuse):
     │                                  retried once on the same endpoint, never an ejection
     │                                  by itself
     ├── CONNECT_TIMEOUT     NOT_TAKEN  no TCP connection within SIDECAR_CONNECT_TIMEOUT_S
     ├── POOL_FULL           NOT_TAKEN  every connection to the endpoint stayed busy until the
     │                                  call's deadline: never sent, so another pod could
     │                                  take it, had the call time left; busy, not failing
     ├── FIRST_BYTE_TIMEOUT  HELD       a live pod did not answer within the call's deadline
     │                                  (SIDECAR_RESPONSE_TIMEOUT_S; streams: first content
     │                                  within SIDECAR_FIRST_BYTE_TIMEOUT_S; a small
     │                                  non-streamed body: all of it), or fell silent for
     │                                  SIDECAR_STREAM_IDLE_TIMEOUT_S before then: its
     │                                  connection is closed so its engine stops, and the
     │                                  app gets 504
     ├── BROKEN_BEFORE_CONTENT DROPPED  the pod broke the connection before anything reached
     │                                  the app (a body cut short, a stream that died in prefill)
     └── BROKEN_STREAM       DROPPED    the pod broke after bytes reached the app: never
                                        retried (the app holds part of the answer)

Outlier detection (outlier.py) reads `Origin`: a failure is local-origin (no connection
made, or the connection broke under the request) or the upstream's own answer; an answer
the app sees is a success, and a pod busy or slow says nothing about its health.

The retry rule reads only `Work`: a request is sent again only when no pod is doing it —
never taken (refused, not connected, declined with 429/503) or dropped with the connection
that carried it (the pod died or reset it; a server stops a request whose connection
closes, so nothing runs twice). A pod that took it and is still on it (slow but alive) or
answered it is never asked twice for the same work.

The deadline is the call's, not each attempt's: it starts when the call does, and a wait
for a busy pool, a pod that held the work and then dropped it, and every retry all spend
it. A retry that would start after the call's deadline has passed is not made: the app
gets 504. A resume (the continuation of a broken stream) is a new call with its own
deadline, and tries at most SIDECAR_MAX_ATTEMPTS pods.
"""

from __future__ import annotations

import email.utils
import time
from enum import Enum

import orjson

# Answered before any work was done: "not now", another pod may take it.
DECLINED_STATUSES = frozenset({429, 503})


class Work(Enum):
    """What became of the work an attempt carried, as far as the sidecar can know."""

    NOT_TAKEN = "not_taken"  # no pod took it: not connected, or declined (429/503)
    DROPPED = "dropped"      # the connection that carried it broke: no pod is still on it
    HELD = "held"            # a live pod took it and was still on it when the deadline came
    DONE = "done"            # a pod answered it


class Origin(Enum):
    """Whose failure an outcome is, for outlier detection (as Envoy splits local-origin
    failures from the upstream's own answers)."""

    CONNECT = "connect"  # local origin, no connection made (refused, unreachable, connect
                         # timeout): the pod is not there, ejected at once
    LOCAL = "local"      # local origin, the connection broke under the request (reset,
                         # closed, cut short): counts towards a streak
    ANSWER = "answer"    # the upstream's answer: 5xx, 429/503, not valid HTTP: a streak


class Outcome(Enum):
    OK = "ok"
    CLIENT_ERROR = "client_error"
    RETRYABLE_STATUS = "retryable_status"
    UPSTREAM_ERROR = "upstream_error"
    BAD_RESPONSE = "bad_response"
    CONNECT_ERROR = "connect_error"
    CONNECTION_LOST = "connection_lost"
    CONNECT_TIMEOUT = "connect_timeout"
    POOL_FULL = "pool_full"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    BROKEN_BEFORE_CONTENT = "broken_before_content"
    BROKEN_STREAM = "broken_stream"

    @property
    def work(self) -> Work:
        return _WORK[self]

    @property
    def retryable(self) -> bool:
        """May the request be sent again elsewhere? Only when no pod is doing it and
        nothing has reached the app yet."""
        return self.work in (Work.NOT_TAKEN, Work.DROPPED) and self is not Outcome.BROKEN_STREAM

    @property
    def origin(self) -> Origin | None:
        """Whose failure this is; None when it says nothing against the pod's health (an
        answer the app should see, a pod busy or slow: a timeout alone never ejects it)."""
        return _ORIGIN.get(self)

    @property
    def endpoint_failed(self) -> bool:
        """Does this outcome count against the endpoint's health?"""
        return self in _ORIGIN

    @property
    def overload(self) -> bool:
        """Does this outcome suggest an overloaded upstream? Only these retries draw on the
        retry budget: retrying them multiplies load on a pool that is already struggling.
        A pod that is gone (refused, reset, cut off) is ejected at once and its work moves
        to a healthy pod instead, bounded by SIDECAR_MAX_ATTEMPTS."""
        return self in (Outcome.RETRYABLE_STATUS, Outcome.CONNECT_TIMEOUT, Outcome.POOL_FULL)


_WORK = {
    Outcome.OK: Work.DONE,
    Outcome.CLIENT_ERROR: Work.DONE,
    Outcome.RETRYABLE_STATUS: Work.NOT_TAKEN,
    Outcome.UPSTREAM_ERROR: Work.DONE,
    Outcome.BAD_RESPONSE: Work.DONE,
    Outcome.CONNECT_ERROR: Work.DROPPED,
    Outcome.CONNECTION_LOST: Work.DROPPED,
    Outcome.CONNECT_TIMEOUT: Work.NOT_TAKEN,
    Outcome.POOL_FULL: Work.NOT_TAKEN,
    Outcome.FIRST_BYTE_TIMEOUT: Work.HELD,
    Outcome.BROKEN_BEFORE_CONTENT: Work.DROPPED,
    Outcome.BROKEN_STREAM: Work.DROPPED,
}
_ORIGIN = {
    Outcome.RETRYABLE_STATUS: Origin.ANSWER,
    Outcome.UPSTREAM_ERROR: Origin.ANSWER,
    Outcome.BAD_RESPONSE: Origin.ANSWER,
    Outcome.CONNECT_ERROR: Origin.CONNECT,
    Outcome.CONNECT_TIMEOUT: Origin.CONNECT,
    Outcome.CONNECTION_LOST: Origin.LOCAL,
    Outcome.BROKEN_BEFORE_CONTENT: Origin.LOCAL,
    Outcome.BROKEN_STREAM: Origin.LOCAL,
}


def classify_status(status: int) -> Outcome:
    if status in DECLINED_STATUSES:
        return Outcome.RETRYABLE_STATUS
    if status >= 500:
        return Outcome.UPSTREAM_ERROR
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
