"""After a failed attempt: try the same endpoint again, the next candidate, refuse on the
retry budget, give up, or stop. A pure decision on plain values, tested without sockets.

What may be retried is the outcome's `Work` (errors.py): a request goes out again only when
no pod is doing it; a pod that took it is never asked to do it twice, nor is another."""

from __future__ import annotations

from enum import Enum

from sidecar.policy.errors import Outcome


class Step(Enum):
    SAME_ENDPOINT = "same_endpoint"  # a fresh connection to the endpoint just tried
    NEXT = "next"                    # the next candidate of the plan
    BUDGET_REFUSED = "budget_refused"
    PASS_THROUGH = "pass_through"    # no retry: the last upstream answer goes to the app
    EXHAUSTED = "exhausted"          # nothing answered: the sidecar's 503
    GAVE_UP = "gave_up"              # a live pod took the work, no usable answer came:
    #                                  504 (held past the deadline) or 502 (BAD_RESPONSE)


RETRIES = (Step.SAME_ENDPOINT, Step.NEXT)


def after_failure(outcome: Outcome, *, attempt: int, max_attempts: int, reconnected: bool,
                  has_next: bool, answered: bool, budget_allows: bool) -> Step:
    """`attempt` counts this one; `reconnected`: the same-endpoint retry was already used;
    `has_next`: the plan has another candidate; `answered`: the upstream sent a response
    that can be passed through; `budget_allows`: the retry budget would admit one more
    retry of an overload outcome."""
    if not outcome.retryable:
        # The work is (or was) a live pod's: sending it again would do it twice.
        return Step.PASS_THROUGH if answered else Step.GAVE_UP
    spent = attempt >= max_attempts
    if outcome is Outcome.CONNECTION_LOST and not reconnected and not spent:
        # Most likely a keep-alive connection the server closed as we reused it.
        return Step.SAME_ENDPOINT
    if spent or not has_next:
        return Step.PASS_THROUGH if answered else Step.EXHAUSTED
    if outcome.overload and not budget_allows:
        return Step.BUDGET_REFUSED
    return Step.NEXT
