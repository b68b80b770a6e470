"""The retry rule, as pure decisions: a request goes out again only when no pod is doing
it. Never taken (refused, not connected, declined with 429/503) or dropped with its
connection → retry; taken by a live pod (answered, or still working when the deadline
came) → never sent again, to that pod or any other."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.dataplane.exchange import asks_to_stream
from sidecar.dataplane.mock import MockUpstream
from sidecar.policy.errors import Outcome, Work, classify_status
from sidecar.policy.failover import RETRIES, Step, after_failure
from tests.dataplane.test_seam import _attempts

decisions = st.fixed_dictionaries({
    "attempt": st.integers(1, 6), "max_attempts": st.integers(1, 6),
    "reconnected": st.booleans(), "has_next": st.booleans(), "answered": st.booleans(),
    "budget_allows": st.booleans()})


@given(outcome=st.sampled_from(list(Outcome)), facts=decisions)
def test_work_a_live_pod_took_is_never_sent_again(outcome, facts):
    step = after_failure(outcome, **facts)
    if outcome.work in (Work.HELD, Work.DONE):
        assert step not in RETRIES
    if step in RETRIES:
        assert outcome.work in (Work.NOT_TAKEN, Work.DROPPED)
        assert outcome is not Outcome.BROKEN_STREAM, "the app already holds part of it"
        assert facts["attempt"] < facts["max_attempts"]


@given(status=st.integers(100, 599), facts=decisions)
def test_an_answered_status_is_retried_only_when_the_pod_declined_it(status, facts):
    step = after_failure(classify_status(status), **facts)
    if step in RETRIES:
        assert status in (429, 503)


@given(facts=decisions)
def test_a_deadline_passed_on_a_live_pod_gives_up_without_a_retry(facts):
    step = after_failure(Outcome.FIRST_BYTE_TIMEOUT, **{**facts, "answered": False})
    assert step is Step.GAVE_UP
    assert not Outcome.FIRST_BYTE_TIMEOUT.endpoint_failed, "slow is not failed"


@given(outcome=st.sampled_from([o for o in Outcome if o.work in (Work.NOT_TAKEN,
                                                                  Work.DROPPED)
                                and o is not Outcome.BROKEN_STREAM]),
       max_attempts=st.integers(2, 6))
def test_a_request_no_pod_is_doing_moves_on_while_attempts_and_candidates_last(
        outcome, max_attempts):
    step = after_failure(outcome, attempt=1, max_attempts=max_attempts, reconnected=True,
                         has_next=True, answered=False, budget_allows=True)
    assert step is Step.NEXT


def test_every_outcome_says_what_became_of_the_work():
    assert {o: o.work for o in Outcome}  # total: a new outcome must be placed
    assert Outcome.CONNECT_ERROR.retryable and Outcome.CONNECTION_LOST.retryable
    assert Outcome.RETRYABLE_STATUS.retryable and not Outcome.UPSTREAM_ERROR.retryable
    assert [classify_status(s) for s in (200, 404, 429, 500, 502, 503, 504)] == [
        Outcome.OK, Outcome.CLIENT_ERROR, Outcome.RETRYABLE_STATUS, Outcome.UPSTREAM_ERROR,
        Outcome.UPSTREAM_ERROR, Outcome.RETRYABLE_STATUS, Outcome.UPSTREAM_ERROR]


@given(stream=st.sampled_from([True, False, None]), spaced=st.booleans(),
       pad=st.text(max_size=20), nested=st.booleans())
def test_a_stream_is_recognised_however_the_body_is_written(stream, spaced, pad, nested):
    import json
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user",
                                                           "content": pad + '"stream":true'}]}
    if nested:
        body["metadata"] = {"stream": False}
    if stream is not None:
        body["stream"] = stream
    raw = json.dumps(body, separators=(", ", ": ") if spaced else (",", ":")).encode()
    assert asks_to_stream(raw) is (stream is True)


@pytest.mark.parametrize(("script", "sent", "step"), [
    # a live pod past the deadline: nobody else is asked
    ({"http://a:1": [Outcome.FIRST_BYTE_TIMEOUT], "http://b:1": [200]}, ["http://a:1"],
     Step.GAVE_UP),
    # a pod's own 500: its answer, passed through
    ({"http://a:1": [500], "http://b:1": [200]}, ["http://a:1"], Step.PASS_THROUGH),
    # declined, then dropped with the connection: both move on
    ({"http://a:1": [429], "http://b:1": [Outcome.BROKEN_BEFORE_CONTENT],
      "http://c:1": [200]}, ["http://a:1", "http://b:1", "http://c:1"], Step.NEXT),
])
async def test_the_attempt_loop_sends_only_what_the_rule_allows(script, sent, step):
    upstream = MockUpstream(script)
    attempts, _, pools = _attempts(upstream)
    pool = pools.get("small")
    answer, ended = await attempts.run(iter([(pool, e) for e in pool.endpoints]), b"POST",
                                       b"/v1/chat/completions", lambda p: (b"", b"{}"), [])
    assert upstream.sent == sent and ended is step
    if answer is not None:
        answer.lease.close()
    assert all(e.inflight == 0 for e in pool.endpoints)


@pytest.mark.parametrize(("raw", "streamed"), [
    (b'{"model":"m","messages":[],"metadata":{"stream":true}}', False),
    (b'{"metadata":{"stream":true},"model":"m"}', False),
    (b'{"tools":[{"parameters":{"properties":{"stream":true}}}],"model":"m"}', False),
    (b'{"metadata":{"stream":true},"stream":false}', False),
    (b'{"messages":[{"content":"}"}],"metadata":{"stream":true}}', False),
    (b'[{"stream":true}]', False),
    (b'{"\\u0073tream":true,"model":"m"}', True),
    (b'{"model":"m","messages":[{"role":"user"}],"stream":true,"n":1}', True),
    (b'{"stream":true,"messages":[{"role":"user"}],"metadata":{}}', True),
    (b'{"stream":true', False),  # not JSON: no stream
], ids=["nested-last", "nested-first", "tool-schema", "nested-and-top", "brace-in-string",
        "array", "escaped-key", "sdk-order", "key-first", "not-json"])
def test_only_the_top_level_stream_key_asks_for_a_stream(raw, streamed):
    assert asks_to_stream(raw) is streamed


async def test_a_resume_tries_no_more_pods_than_max_attempts():
    upstream = MockUpstream({u: [Outcome.CONNECT_ERROR] for u in
                             ("http://a:1", "http://b:1", "http://c:1")})
    attempts, _, pools = _attempts(upstream, max_attempts=2)
    pool = pools.get("small")
    answer, ended = await attempts.run(iter([(pool, e) for e in pool.endpoints]), b"POST",
                                       b"/v1/chat/completions", lambda p: (b"", b"{}"), [],
                                       streamed=True, strict=True)
    assert answer is None and ended is Step.EXHAUSTED
    assert upstream.sent == ["http://a:1", "http://b:1"], "SIDECAR_MAX_ATTEMPTS=2"
    assert all(e.inflight == 0 for e in pool.endpoints)


class _SlowUpstream(MockUpstream):
    """Each send takes `delay` s of the call's time before its scripted answer."""

    def __init__(self, script: dict[str, list[Outcome | int]], delay: float) -> None:
        super().__init__(script)
        self.delay = delay

    async def send(self, base_url, method, target, headers, body, deadline):
        await asyncio.sleep(self.delay)
        return await super().send(base_url, method, target, headers, body, deadline)


@pytest.mark.parametrize("strict", [False, True])
async def test_no_attempt_starts_once_the_calls_deadline_has_passed(strict):
    # Each failure uses more than the whole deadline (a stream's first content: 1 s): a
    # retry would get a window the call no longer has.
    upstream = _SlowUpstream({u: [Outcome.POOL_FULL] for u in
                              ("http://a:1", "http://b:1", "http://c:1")}, 1.1)
    attempts, _, pools = _attempts(upstream)
    pool = pools.get("small")
    answer, ended = await attempts.run(iter([(pool, e) for e in pool.endpoints]), b"POST",
                                       b"/v1/chat/completions", lambda p: (b"", b"{}"), [],
                                       streamed=True, strict=strict)
    assert answer is None and ended is Step.GAVE_UP
    assert upstream.sent == ["http://a:1"]
    assert all(e.inflight == 0 for e in pool.endpoints)
