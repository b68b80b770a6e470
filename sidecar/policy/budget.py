"""The retry budget: retries stay a bounded fraction of recent requests, so an outage
cannot multiply load.

Like Envoy's `retry_budget` (a percentage plus a floor), but over a sliding window of
requests rather than concurrency: a sidecar often serves one app at concurrency 1, where a
concurrency bound would allow every request to retry. The floor lets a quiet app still
retry its occasional failure.
"""

from __future__ import annotations

WINDOW_S = 10
_BUCKETS = WINDOW_S  # one bucket per second


class RetryBudget:
    __slots__ = ("_requests", "_retries", "_second", "minimum", "percent")

    def __init__(self, percent: float, minimum: int) -> None:
        self.percent = percent
        self.minimum = minimum
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._second = 0

    def _advance(self, now: float) -> int:
        """Move the window to `now`, zeroing the buckets it passed (in place)."""
        second = int(now)
        gap = second - self._second
        if gap:
            steps = range(1, _BUCKETS + 1) if gap >= _BUCKETS or gap < 0 else range(1, gap + 1)
            for step in steps:
                slot = (self._second + step) % _BUCKETS
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._second = second
        return second % _BUCKETS

    def record_request(self, now: float) -> None:
        slot = self._advance(now)
        self._requests[slot] += 1

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget; False when it is spent (the caller reports the
        refusal: events.py counts it, once)."""
        slot = self._advance(now)
        allowed = max(self.minimum, sum(self._requests) * self.percent / 100.0)
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def view(self) -> dict[str, float]:
        return {"requests_10s": sum(self._requests), "retries_10s": sum(self._retries),
                "percent": self.percent, "minimum": self.minimum}
