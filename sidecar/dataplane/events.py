"""The one sink for what happens to a request: every counter, telemetry series and request
log line is written here — the exchange's and the listener's (requests it refused before
they were whole) — so `/stats`, Prometheus, DogStatsD and the log cannot disagree."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sidecar.fleet.outlier import Change
from sidecar.fleet.traffic import Traffic
from sidecar.policy.errors import Outcome
from sidecar.telemetry import Telemetry

if TYPE_CHECKING:
    from sidecar.fleet.pools import Endpoint

request_log = logging.getLogger("sidecar.requests")
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class ProxyCounters:
    # `refused`: requests the sidecar answered itself because they were malformed or over a
    # limit (the listener's 400/408/413/414/417/431/501, a bad session or selector header);
    # `bad_requests` and `body_too_large` are the 400s and 413s among them.
    __slots__ = ("bad_requests", "body_too_large", "broken_streams", "budget_refusals",
                 "client_disconnects", "completed_after_break", "fallbacks", "inflight",
                 "internal_errors", "no_endpoint", "prefill_retries", "refused", "requests",
                 "responses_2xx", "responses_4xx", "responses_5xx", "responses_other",
                 "resume_failures", "resumes", "retries")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def view(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Events:
    def __init__(self, telemetry: Telemetry, traffic: Traffic, request_log_level: int) -> None:
        self.telemetry = telemetry
        self.traffic = traffic
        self.request_log_level = request_log_level
        self.counters = ProxyCounters()
        self.refusals: dict[str, int] = {}  # "<status> <reason>" -> count

    def view(self) -> dict[str, object]:
        """What `/stats` shows as `proxy`."""
        return {**self.counters.view(), "refused_by_reason": dict(sorted(self.refusals.items()))}

    # -- the start of a request ----------------------------------------------------------
    def started(self) -> None:
        counters = self.counters
        counters.requests += 1
        counters.inflight += 1

    def left(self) -> None:
        """The request's handler raised: no longer in flight (`finished` and
        `disconnected` say so for the other ends)."""
        self.counters.inflight -= 1

    def disconnected(self) -> None:
        """The app went away before its answer was written."""
        counters = self.counters
        counters.inflight -= 1
        counters.client_disconnects += 1
        self.telemetry.count("client_disconnects", ())

    def refused(self, status: int, reason: str) -> None:
        """A request answered by the sidecar itself, never sent upstream, because it was
        malformed or over a limit. `reason` is the error code the app got."""
        counters = self.counters
        counters.refused += 1
        if status == 400:
            counters.bad_requests += 1
        elif status == 413:
            counters.body_too_large += 1
        key = f"{status} {reason}"
        self.refusals[key] = self.refusals.get(key, 0) + 1
        self.telemetry.count("refused", (str(status), reason))

    def internal_error(self) -> None:
        """A request whose handler failed inside the sidecar (the app got a 500 or an
        aborted answer)."""
        self.counters.internal_errors += 1
        self.telemetry.count("internal_errors", ())

    # -- attempts ----------------------------------------------------------------------
    def attempt_failed(self, endpoint: Endpoint, outcome: Outcome, change: Change) -> None:
        """The error count, and an event if the report to the endpoint's outlier detector
        (`change`, what it did) ejected the pod."""
        self.telemetry.count("upstream_errors", (endpoint.pool, outcome.value))
        if change is Change.EJECTED:
            self.telemetry.event("endpoint ejected", f"{endpoint.url} (pool {endpoint.pool}) "
                                 f"after {outcome.value}", alert_type="warning",
                                 tags=[f"pool:{endpoint.pool}"])

    def retried(self, pool: str, outcome: Outcome) -> None:
        """Every attempt after the first, same endpoint or not: one count, everywhere."""
        self.counters.retries += 1
        self.telemetry.count("retries", (pool,))
        if outcome is Outcome.BROKEN_BEFORE_CONTENT:
            self.counters.prefill_retries += 1

    def answered(self, endpoint: Endpoint, model: str, waited: float, change: Change
                 ) -> None:
        """`model`: the configured model of the endpoint's pool (never the request's);
        `change`: what the success did to the endpoint's outlier detector."""
        if change is Change.RESTORED:
            self.telemetry.event("endpoint restored", f"{endpoint.url} (pool "
                                 f"{endpoint.pool}) answered again",
                                 tags=[f"pool:{endpoint.pool}"])
        self.telemetry.observe("upstream_ttfb", (endpoint.pool, model), waited)

    def fallback(self, primary: str, pool: str) -> None:
        self.counters.fallbacks += 1
        self.telemetry.count("fallbacks", (primary, pool))

    def budget_refused(self) -> None:
        self.counters.budget_refusals += 1
        self.telemetry.count("budget_refusals", ())

    def no_endpoint(self) -> None:
        """Nothing could take the request (the sidecar's 503 `no_ready_endpoint`)."""
        self.counters.no_endpoint += 1

    # -- streams -----------------------------------------------------------------------
    def stream_broken(self, endpoint: Endpoint, change: Change) -> None:
        self.counters.broken_streams += 1
        self.attempt_failed(endpoint, Outcome.BROKEN_STREAM, change)

    def resumed(self) -> None:
        self.counters.resumes += 1
        self.telemetry.count("resumes", ())

    def resume_failed(self) -> None:
        self.counters.resume_failures += 1

    def completed_after_break(self) -> None:
        """The stream broke after its last content: ended as the upstream would have."""
        self.counters.completed_after_break += 1

    def content(self, pool: str, model: str, ttft: float) -> None:
        self.telemetry.observe("ttft", (pool, model), ttft)

    # -- the end of a request ------------------------------------------------------------
    def finished(self, method: bytes, target: bytes, status: int, pool: str, model: str,
                 elapsed: float, fields: dict[str, object] | None) -> None:
        """The request was answered (after `started`): no longer in flight."""
        counters = self.counters
        counters.inflight -= 1
        if status < 300:
            counters.responses_2xx += 1
        elif status >= 500:
            counters.responses_5xx += 1
        elif status >= 400:
            counters.responses_4xx += 1
        else:
            counters.responses_other += 1
        # `model` is the configured model of the pool that served (a fallback's after a
        # rewrite; `none` when refused), never the request's: series stay bounded.
        tags = (pool, model, _STATUS_CLASS[status // 100] if status < 600 else "other")
        telemetry = self.telemetry
        telemetry.count("requests", tags)
        telemetry.observe("request_duration", tags, elapsed)
        if self.request_log_level and request_log.isEnabledFor(self.request_log_level):
            # Never the body, never credentials: what an operator needs to follow a call.
            request_log.log(self.request_log_level, "request", extra={"fields": {
                "method": method.decode(), "path": target.split(b"?", 1)[0].decode(
                    errors="replace"), "status": status, "pool": pool,
                "duration_ms": round(elapsed * 1000, 3), **(fields or {})}})

    def tokens(self, pool: str, model: str, prompt: int, completion: int,
               generation_s: float | None = None, inter_token_s: float | None = None) -> None:
        self.traffic.count(pool, prompt, completion)
        tags = (pool, model)
        self.telemetry.count("prompt_tokens", tags, prompt)
        self.telemetry.count("completion_tokens", tags, completion)
        if generation_s and completion > 1:
            self.telemetry.observe("tokens_per_second", tags, completion / generation_s)
        if inter_token_s is not None:
            self.telemetry.observe("inter_token", tags, inter_token_s)
