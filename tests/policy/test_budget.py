"""The retry budget, tested directly with a controlled clock."""

from __future__ import annotations

from sidecar.policy.budget import RetryBudget


def test_retries_are_limited_to_a_percentage_of_recent_requests():
    budget = RetryBudget(percent=20, minimum=0)
    for _ in range(100):
        budget.record_request(now=1000.0)
    answers = [budget.try_retry(now=1000.5) for _ in range(50)]
    assert answers.count(True) == 20
    assert answers.count(False) == 30


def test_a_quiet_app_still_gets_the_minimum():
    budget = RetryBudget(percent=20, minimum=5)
    budget.record_request(now=10.0)
    assert [budget.try_retry(now=10.0) for _ in range(6)] == [True] * 5 + [False]


def test_the_window_slides():
    budget = RetryBudget(percent=20, minimum=1)
    budget.record_request(now=0.0)
    assert budget.try_retry(now=0.0)
    assert not budget.try_retry(now=5.0)
    # Ten seconds later the old retry has left the window.
    assert budget.try_retry(now=10.5)
    budget.record_request(now=100.0)
    assert budget.view()["requests_10s"] == 1 and budget.view()["retries_10s"] == 0
