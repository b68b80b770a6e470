"""An endpoint's outlier detector, tested directly: what ejects it, the probation gate (one
permit, restored by a success, the back-off doubling per ejection up to its cap), and that
its queries change nothing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.dataplane.events import Events
from sidecar.fleet.outlier import (
    EJECT_AFTER_FAILURES,
    EJECT_BACKOFF_BASE_S,
    EJECT_BACKOFF_MAX_S,
    Change,
    EndpointState,
    Outlier,
)
from sidecar.fleet.pools import Endpoint
from sidecar.fleet.traffic import Traffic
from sidecar.policy.errors import Origin, Outcome, Work
from sidecar.telemetry import Telemetry

FIELDS = ("state", "consecutive_failures", "ejections", "retry_at", "held_until",
          "registered_at")


def fields(outlier: Outlier) -> tuple[object, ...]:
    return tuple(getattr(outlier, name) for name in FIELDS)


def ejected_at(now: float, times: int = 1) -> Outlier:
    """An outlier ejected `times` times without a restore in between (it came back through
    a cold start, which keeps the count), the last time at `now`."""
    outlier = Outlier(EndpointState.READY)
    for _ in range(times - 1):
        outlier.report(Outcome.CONNECT_ERROR, now)
        outlier.loading()
        outlier.probe_passed()
    assert outlier.report(Outcome.CONNECT_ERROR, now) is Change.EJECTED
    return outlier


def expected_backoff(ejections: int) -> float:
    return min(EJECT_BACKOFF_MAX_S, EJECT_BACKOFF_BASE_S * 2 ** (ejections - 1))


def test_connect_errors_eject_at_once_and_other_failures_after_a_streak():
    e = Outlier(EndpointState.READY)
    assert e.report(Outcome.CONNECT_ERROR, now=0) is Change.EJECTED
    assert e.state is EndpointState.EJECTED
    f = Outlier(EndpointState.READY)
    assert f.report(Outcome.RETRYABLE_STATUS, now=0) is Change.NONE
    assert f.report(Outcome.RETRYABLE_STATUS, now=0) is Change.NONE
    assert f.report(Outcome.RETRYABLE_STATUS, now=0) is Change.EJECTED
    assert f.state is EndpointState.EJECTED


def test_an_ejected_endpoint_admits_one_half_open_try_after_its_back_off():
    e = Outlier(EndpointState.READY)
    e.report(Outcome.CONNECT_ERROR, now=100)
    assert not e.admit(100.5)
    assert e.admit(101.0), "back-off of 1 s has passed: one try"
    assert not e.admit(101.0), "only one until its result is known"
    assert e.report(Outcome.OK, now=101.2) is Change.RESTORED
    assert e.state is EndpointState.READY


def test_back_off_doubles_with_repeated_ejections():
    e = Outlier(EndpointState.READY)
    waits = []
    now = 0.0
    for _ in range(4):
        e.state = EndpointState.READY
        e.report(Outcome.CONNECT_ERROR, now)
        waits.append(e.retry_at - now)
        now = e.retry_at
    assert waits == [1.0, 2.0, 4.0, 8.0]


@settings(max_examples=80, deadline=None)
@given(st.integers(min_value=1, max_value=12), st.floats(min_value=0, max_value=1e6),
       st.lists(st.floats(min_value=0, max_value=0.999), min_size=1, max_size=20))
def test_probation_hands_out_one_permit_per_back_off(times, now, offsets):
    """However many requests ask while the trial's result is not in, one is admitted."""
    outlier = ejected_at(now, times)
    backoff = outlier.retry_at - now
    start = outlier.retry_at
    admitted = [outlier.admit(start + offset * backoff) for offset in sorted(offsets)]
    assert admitted.count(True) == 1 and admitted[0]
    assert outlier.state is EndpointState.EJECTED


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=12), st.sampled_from([Outcome.OK,
                                                                Outcome.CLIENT_ERROR]))
def test_a_success_in_probation_restores_and_resets_the_back_off(times, answer):
    outlier = ejected_at(0.0, times)
    assert outlier.admit(outlier.retry_at)
    assert outlier.report(answer, outlier.retry_at) is Change.RESTORED
    assert outlier.state is EndpointState.READY and outlier.consecutive_failures == 0
    assert outlier.available(outlier.retry_at) and outlier.admit(outlier.retry_at)
    outlier.report(Outcome.CONNECT_ERROR, 1e9)
    assert outlier.retry_at - 1e9 == EJECT_BACKOFF_BASE_S, "the next ejection starts over"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=14))
def test_each_ejection_without_a_restore_doubles_the_back_off_up_to_the_cap(times):
    outlier = ejected_at(1000.0, times)
    assert outlier.ejections == times
    assert outlier.retry_at - 1000.0 == expected_backoff(times)
    assert outlier.retry_at - 1000.0 <= EJECT_BACKOFF_MAX_S


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=8),
       st.sampled_from([o for o in Outcome if o.origin is not None]))
def test_a_failed_trial_shuts_the_gate_for_the_same_back_off_again(times, failure):
    outlier = ejected_at(0.0, times)
    trial = outlier.retry_at
    assert outlier.admit(trial)
    assert outlier.report(failure, trial + 0.25) is Change.NONE
    assert outlier.state is EndpointState.EJECTED
    assert outlier.retry_at == trial + 0.25 + expected_backoff(times)
    assert not outlier.admit(outlier.retry_at - 1e-6)
    assert outlier.admit(outlier.retry_at)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(Outcome)), max_size=12))
def test_local_origin_and_answer_failures_count_as_one_streak(outcomes):
    """A ready endpoint is ejected by its first failure of CONNECT origin, or by the
    third failure in a row of any origin (a local break or a failed answer alike); an
    answer the app sees ends the streak; a busy or slow pod says nothing."""
    outlier = Outlier(EndpointState.READY)
    streak = 0
    for i, outcome in enumerate(outcomes):
        change = outlier.report(outcome, float(i))
        if outcome.origin is None:
            streak = 0 if outcome.work is Work.DONE else streak
            assert change is Change.NONE and outlier.state is EndpointState.READY
        else:
            streak += 1
            ejects = outcome.origin is Origin.CONNECT or streak >= EJECT_AFTER_FAILURES
            assert (change is Change.EJECTED) is ejects
            if ejects:
                assert outlier.state is EndpointState.EJECTED
                assert outlier.retry_at == i + EJECT_BACKOFF_BASE_S
                break
        assert outlier.consecutive_failures == streak


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(list(EndpointState)), st.floats(min_value=0, max_value=1e6),
       st.floats(min_value=0, max_value=1e6), st.floats(min_value=0, max_value=100))
def test_queries_change_nothing(state, retry_at, now, hold):
    outlier = Outlier(state)
    outlier.retry_at = retry_at
    outlier.hold(hold, 0.0)
    before = fields(outlier)
    for _ in range(3):
        outlier.available(now)
        outlier.backoff()
    assert fields(outlier) == before
    # Only an ejected endpoint's probation moves anything on admission.
    outlier.admit(now)
    if state is not EndpointState.EJECTED:
        assert fields(outlier) == before


def test_an_active_probers_ejection_has_no_probation():
    outlier = Outlier(EndpointState.READY)
    for _ in range(EJECT_AFTER_FAILURES - 1):
        assert outlier.probe_failed() is False
    assert outlier.probe_failed() is True
    assert not outlier.admit(1e12), "only a healthy probe restores it"
    assert outlier.restore() is Change.RESTORED and outlier.available(0.0)


def test_a_retry_after_holds_a_ready_endpoint_and_is_capped():
    outlier = Outlier(EndpointState.READY)
    outlier.hold(3600, now=10.0)
    assert not outlier.admit(69.9) and not outlier.available(69.9)
    assert outlier.admit(70.0), "a Retry-After counts for at most a minute"


def test_a_draining_endpoint_takes_nothing_and_stays_draining():
    outlier = Outlier(EndpointState.READY)
    outlier.drain()
    for outcome in Outcome:
        outlier.report(outcome, 0.0)
    assert not outlier.admit(1e12) and outlier.state is EndpointState.DRAINING


def test_the_event_sink_only_counts_what_the_detector_did():
    """Reports go to the detector; the sink counts and tells, and never ejects itself."""
    telemetry = Telemetry({})
    events = Events(telemetry, Traffic(), 0)
    endpoint = Endpoint("http://a:1", "p", EndpointState.READY)
    for _ in range(EJECT_AFTER_FAILURES + 1):
        events.attempt_failed(endpoint, Outcome.CONNECT_ERROR, Change.NONE)
    assert endpoint.state is EndpointState.READY
    assert endpoint.outlier.consecutive_failures == 0
    assert telemetry.counter_total("upstream_errors") == EJECT_AFTER_FAILURES + 1
    assert telemetry.events_sent == []
    change = endpoint.outlier.report(Outcome.CONNECT_ERROR, 0.0)
    events.attempt_failed(endpoint, Outcome.CONNECT_ERROR, change)
    events.answered(endpoint, "m", 0.1, endpoint.outlier.report(Outcome.OK, 2.0))
    assert [e["title"] for e in telemetry.events_sent] == ["endpoint ejected",
                                                           "endpoint restored"]
