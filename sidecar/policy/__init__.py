"""Per-request decisions, pure: plain values in, a decision out (no I/O, no framework).

    errors.py      the outcome vocabulary: what became of an attempt, classified once
    failover.py    after a failed attempt: the same endpoint, the next candidate, or stop
    budget.py      the retry budget: retries stay a bounded fraction of recent requests
    models.py      which pool a request's `model` names; the `/v1/models` listing
    placement.py   sticky until saturated: a new session's pod, and when a session moves
"""
