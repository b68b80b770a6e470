"""An endpoint's health state and its outlier detection: the one owner of whether a request
may go to a pod. The attempt loop reports each attempt's outcome, probes and the monitor's
view report theirs, and only this object moves the state; its queries never do.

    warming   until its first healthy probe (pools with a health path): then ready
    ready     takes requests (unless an upstream's Retry-After holds it)
    ejected   after failures; a healthy probe or a success in probation: ready
    draining  removed by a reload (final); a pod loading its model again: warming

Passive detection (a gate, as linkerd's `ConsecutiveFailures`): a ready endpoint is open;
a failure whose origin is CONNECT (the pod is not there) shuts it at once, any other
failure (a local-origin break or the upstream's failed answer) after a streak of
EJECT_AFTER_FAILURES. Shut, it waits a back-off that doubles with each ejection since the
last restore (base EJECT_BACKOFF_BASE_S, at most EJECT_BACKOFF_MAX_S); then it is in
probation: `admit` hands out one permit and re-arms the wait, so one trial request goes
out at a time (and a trial whose result never comes does not keep the gate shut). A
success restores it; a failure in probation waits the same back-off again. An ejection by
the active prober or the monitor has no probation: only a healthy probe restores it.

Pure: plain values in and out, no I/O.
"""

from __future__ import annotations

import time
from enum import Enum, StrEnum

from sidecar.policy.errors import Origin, Outcome, Work

# A streak of failures that are not "the pod is gone" (5xx, resets) ejects at this count.
EJECT_AFTER_FAILURES = 3
EJECT_BACKOFF_BASE_S = 1.0
EJECT_BACKOFF_MAX_S = 60.0
# An upstream's Retry-After is honoured up to this long (a bad header must not park a pod).
MAX_RETRY_AFTER_S = 60.0


class EndpointState(StrEnum):
    WARMING = "warming"
    READY = "ready"
    EJECTED = "ejected"
    DRAINING = "draining"


class Change(Enum):
    """What a report did to the endpoint (the caller tells the operator)."""

    NONE = "none"
    EJECTED = "ejected"
    RESTORED = "restored"


_OK = Outcome.OK
_UNCHANGED = Change.NONE
_READY = EndpointState.READY
_EJECTED = EndpointState.EJECTED


class Outlier:
    """One endpoint's health: its state, failure streak, ejections and holds."""

    __slots__ = ("consecutive_failures", "ejections", "held_until", "registered_at",
                 "retry_at", "state")

    def __init__(self, state: EndpointState) -> None:
        self.state = state
        self.consecutive_failures = 0
        self.ejections = 0   # since the last restore: each one doubles the back-off
        self.retry_at = 0.0  # ejected: when probation starts (infinity: probes restore)
        self.held_until = 0.0  # the upstream asked us to wait (Retry-After)
        self.registered_at = time.monotonic()  # the cold start's beginning

    # -- queries: never change anything ---------------------------------------------------
    def available(self, now: float) -> bool:
        """Ready and not holding off: takes requests now (no probation permit involved)."""
        return self.state is _READY and now >= self.held_until

    # -- the request path -----------------------------------------------------------------
    def admit(self, now: float) -> bool:
        """May a request be sent here now? The only thing that spends probation's permit:
        an ejected endpoint past its back-off admits one trial, and the next only after
        the back-off again (its result normally comes first)."""
        if self.state is _READY:
            return now >= self.held_until
        if self.state is _EJECTED and now >= self.retry_at:
            self.retry_at = now + self.backoff()
            return True
        return False

    def report(self, outcome: Outcome, now: float) -> Change:
        """One attempt's outcome. An answer the app sees (a 4xx too) is a success; a
        failure counts by its origin (errors.Origin); busy or slow says nothing."""
        if outcome is _OK:  # the common case, first and inline (once per request)
            self.consecutive_failures = 0
            return self.restore() if self.state is _EJECTED else _UNCHANGED
        origin = outcome.origin
        if origin is None:
            if outcome.work is Work.DONE:
                return self.restore()
            return Change.NONE
        self.consecutive_failures += 1
        state = self.state
        if state is _EJECTED:
            self.retry_at = now + self.backoff()  # a failed trial: probation waits again
            return Change.NONE
        if state is not _READY:
            return Change.NONE
        if origin is Origin.CONNECT or self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.eject(now + self.backoff(ejections=self.ejections + 1))
            return Change.EJECTED
        return Change.NONE

    def hold(self, seconds: float, now: float) -> None:
        """Respect an upstream's Retry-After: send nothing new here until it has passed."""
        self.held_until = max(self.held_until, now + min(seconds, MAX_RETRY_AFTER_S))

    # -- active probes and the monitor's view -------------------------------------------
    def restore(self) -> Change:
        """A success (an answer, or a healthy probe of an ejected endpoint): the streak
        ends, and an ejected endpoint is ready again with its back-off reset."""
        self.consecutive_failures = 0
        if self.state is _EJECTED:
            self.state = _READY
            self.ejections = 0
            return Change.RESTORED
        return Change.NONE

    def probe_passed(self) -> float | None:
        """A healthy active probe. Returns the cold start's duration when it ended one."""
        self.consecutive_failures = 0
        if self.state is EndpointState.WARMING:
            self.state = _READY
            return time.monotonic() - self.registered_at
        return None

    def loading(self) -> bool:
        """The pod answers that it is loading its model. Returns True when this sends a
        ready (or ejected) endpoint back to warming: a restart in place, a cold start whose
        end its next healthy probe reports, not a failure."""
        if self.state not in (_READY, _EJECTED):
            return False
        self.state = EndpointState.WARMING
        self.consecutive_failures = 0
        self.registered_at = time.monotonic()
        return True

    def probe_failed(self) -> bool:
        """A failed active probe. Returns True when this one ejected a ready endpoint (only
        a healthy probe restores it)."""
        if self.state is not _READY:
            return False
        self.consecutive_failures += 1
        if self.consecutive_failures < EJECT_AFTER_FAILURES:
            return False
        self.eject(retry_at=float("inf"))
        return True

    def eject(self, retry_at: float | None = None) -> None:
        """Stop sending here. With `retry_at`, probation starts then; the active prober
        and the monitor pass infinity, as only a healthy probe restores the endpoint."""
        self.state = _EJECTED
        self.ejections += 1
        if retry_at is not None:
            self.retry_at = retry_at

    def drain(self) -> None:
        """Removed from the configuration: nothing new is sent; in-flight requests finish."""
        self.state = EndpointState.DRAINING

    def backoff(self, ejections: int | None = None) -> float:
        """The wait before probation after the `ejections`-th ejection (default: the
        current one): the base, doubled per ejection since the last restore, capped."""
        n = self.ejections if ejections is None else ejections
        return min(EJECT_BACKOFF_MAX_S, EJECT_BACKOFF_BASE_S * 2 ** max(0, n - 1))
