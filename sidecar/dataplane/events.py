"""The one sink for what happens to a request: every counter, telemetry series and request
log line is written here, so `/stats`, Prometheus, DogStatsD and the log cannot disagree."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sidecar.errors import Outcome
from sidecar.telemetry import Telemetry
from sidecar.traffic import Traffic

if TYPE_CHECKING:
    from sidecar.pools import Endpoint

request_log = logging.getLogger("sidecar.requests")
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class ProxyCounters:
    __slots__ = ("bad_requests", "body_too_large", "broken_streams", "budget_refusals",
                 "client_disconnects", "completed_after_break", "fallbacks", "inflight",
                 "no_endpoint", "prefill_retries", "requests", "responses_2xx",
                 "responses_4xx", "responses_5xx", "responses_other", "resume_failures",
                 "resumes", "retries")

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

    # -- attempts ----------------------------------------------------------------------
    def attempt_failed(self, endpoint: Endpoint, outcome: Outcome, now: float) -> None:
        """Passive health, the error count, an event if it ejected the pod."""
        self.telemetry.count("upstream_errors", (endpoint.pool, outcome.value))
        if outcome.endpoint_failed and endpoint.record_failure(outcome, now):
            self.telemetry.event("endpoint ejected", f"{endpoint.url} (pool {endpoint.pool}) "
                                 f"after {outcome.value}", alert_type="warning",
                                 tags=[f"pool:{endpoint.pool}"])

    def retried(self, pool: str, outcome: Outcome) -> None:
        """Every attempt after the first, same endpoint or not: one count, everywhere."""
        self.counters.retries += 1
        self.telemetry.count("retries", (pool,))
        if outcome is Outcome.BROKEN_BEFORE_CONTENT:
            self.counters.prefill_retries += 1

    def answered(self, endpoint: Endpoint, model: str, waited: float) -> None:
        """`model`: the configured model of the endpoint's pool (never the request's)."""
        if endpoint.record_success():
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

    # -- streams -----------------------------------------------------------------------
    def stream_broken(self, endpoint: Endpoint, now: float) -> None:
        self.counters.broken_streams += 1
        self.attempt_failed(endpoint, Outcome.BROKEN_STREAM, now)

    def resumed(self) -> None:
        self.counters.resumes += 1
        self.telemetry.count("resumes", ())

    def content(self, pool: str, model: str, ttft: float) -> None:
        self.telemetry.observe("ttft", (pool, model), ttft)

    # -- the end of a request ------------------------------------------------------------
    def finished(self, method: bytes, target: bytes, status: int, pool: str, model: str,
                 elapsed: float, fields: dict[str, object] | None) -> None:
        counters = self.counters
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
