"""The data path's seam: decision code imports no framework, and the retry/failover
decision and the attempt loop are tested without sockets, against a mock Upstream."""

from __future__ import annotations

import subprocess
import sys
from time import perf_counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import load_settings
from sidecar.dataplane.attempts import Attempts
from sidecar.dataplane.events import Events
from sidecar.dataplane.exchange import Proxy
from sidecar.dataplane.mock import MockUpstream
from sidecar.dataplane.seam import Request
from sidecar.fleet.pools import PoolSet
from sidecar.fleet.traffic import Traffic
from sidecar.policy.budget import RetryBudget
from sidecar.policy.errors import Outcome
from sidecar.policy.failover import Step, after_failure
from sidecar.routing.router import Router
from sidecar.routing.store import MemoryStore
from sidecar.telemetry import Telemetry

FRAMEWORK_FREE = ("sidecar.policy.errors", "sidecar.fleet.outlier", "sidecar.fleet.pools",
                  "sidecar.routing.sessions", "sidecar.policy.budget", "sidecar.dataplane.resume",
                  "sidecar.dataplane.sse", "sidecar.policy.failover", "sidecar.dataplane.headers",
                  "sidecar.dataplane.seam", "sidecar.dataplane.attempts", "sidecar.dataplane.relay",
                  "sidecar.dataplane.exchange", "sidecar.dataplane.mock")


def test_decision_code_imports_neither_aiohttp_nor_redis():
    # A fresh interpreter where importing aiohttp or redis fails outright.
    code = ("import sys\n"
            "for name in ('aiohttp', 'redis', 'httptools', 'uvloop'):\n"
            "    sys.modules[name] = None\n"
            f"for module in {FRAMEWORK_FREE!r}:\n"
            "    __import__(module)\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@given(outcome=st.sampled_from(list(Outcome)), attempt=st.integers(1, 5),
       max_attempts=st.integers(1, 5), reconnected=st.booleans(), has_next=st.booleans(),
       answered=st.booleans(), budget_allows=st.booleans())
def test_failover_decision_never_exceeds_attempts_or_budget(
        outcome, attempt, max_attempts, reconnected, has_next, answered, budget_allows):
    step = after_failure(outcome, attempt=attempt, max_attempts=max_attempts,
                         reconnected=reconnected, has_next=has_next, answered=answered,
                         budget_allows=budget_allows)
    if attempt >= max_attempts:
        assert step in (Step.PASS_THROUGH, Step.EXHAUSTED, Step.GAVE_UP)
    if step is Step.SAME_ENDPOINT:
        assert outcome is Outcome.CONNECTION_LOST and not reconnected
    if step is Step.NEXT:
        assert has_next and (budget_allows or not outcome.overload)
    if step is Step.PASS_THROUGH:
        assert answered
    if step is Step.BUDGET_REFUSED:
        assert outcome.overload and not budget_allows


def _attempts(upstream: MockUpstream, max_attempts: int = 3
              ) -> tuple[Attempts, Events, PoolSet]:
    settings = load_settings({"SIDECAR_POOLS": '{"small": {"model": "m", "endpoints": '
                              '["http://a:1", "http://b:1", "http://c:1"]}}'})
    pools = PoolSet(settings)
    events = Events(Telemetry({}), Traffic(), 0)
    return Attempts(upstream, events, RetryBudget(100, 100), max_attempts, 1.0), events, pools


@pytest.mark.parametrize(("script", "served_by", "sent", "retries"), [
    # a refused pod: the next one serves
    ({"http://a:1": [Outcome.CONNECT_ERROR], "http://b:1": [200]}, "http://b:1",
     ["http://a:1", "http://b:1"], 1),
    # a reused connection lost: the same pod again, once, then it serves
    ({"http://a:1": [Outcome.CONNECTION_LOST, 200]}, "http://a:1",
     ["http://a:1", "http://a:1"], 1),
    # 503 everywhere: the last answer is passed through after max_attempts
    ({"http://a:1": [503], "http://b:1": [503], "http://c:1": [503]}, "http://c:1",
     ["http://a:1", "http://b:1", "http://c:1"], 2),
    # a 4xx is the app's own: served at once
    ({"http://a:1": [404]}, "http://a:1", ["http://a:1"], 0),
])
async def test_attempt_loop_against_a_mock_upstream(script, served_by, sent, retries):
    upstream = MockUpstream(script)
    attempts, events, pools = _attempts(upstream)
    pool = pools.get("small")
    candidates = iter([(pool, e) for e in pool.endpoints])
    answer, _ = await attempts.run(candidates, b"POST", b"/v1/chat/completions",
                                   lambda p: (b"", b"{}"), [])
    assert answer is not None and answer.lease.endpoint.url == served_by
    assert upstream.sent == sent
    assert events.counters.retries == retries
    answer.lease.close()
    # every reply was released exactly once; nothing is left in flight
    assert [r.released for r in upstream.replies] == [1] * len(upstream.replies)
    assert all(e.inflight == 0 for e in pool.endpoints)


async def test_attempt_loop_exhausted_without_an_answer_leaks_nothing():
    upstream = MockUpstream({u: [Outcome.CONNECT_ERROR] for u in
                             ("http://a:1", "http://b:1", "http://c:1")})
    attempts, _, pools = _attempts(upstream)
    pool = pools.get("small")
    failures: list = []
    answer, step = await attempts.run(iter([(pool, e) for e in pool.endpoints]), b"GET",
                                      b"/", lambda p: (b"", b""), failures)
    assert answer is None and step is Step.EXHAUSTED
    assert [f.outcome for f in failures] == [Outcome.CONNECT_ERROR] * 3
    assert all(e.inflight == 0 for e in pool.endpoints)


class RecordingDownstream:
    """The app's side of one request, recorded: the seam's `Downstream` without a socket."""

    head_only = False

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.ended = False

    def start(self, status: int, reason: bytes, headers: bytes, length: int | None) -> None:
        self.status = status

    def send(self, status: int, reason: bytes, headers: bytes, length: int | None,
             body: bytes) -> None:
        self.status, self.body, self.ended = status, body, True

    def write(self, data: bytes) -> None:
        self.body += data

    def end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        self.ended = True

    def respond(self, status: int, body: bytes, headers: bytes = b"") -> None:
        self.send(status, b"", headers, len(body), body)

    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def follow(self, reply: object) -> None: ...


async def _exchange(upstream: MockUpstream, session: bytes = b"s1"
                    ) -> tuple[Proxy, RecordingDownstream]:
    settings = load_settings({"SIDECAR_POOLS": '{"small": {"model": "m", "endpoints": '
                              '["http://a:1", "http://b:1"]}}'})
    router = Router(settings, PoolSet(settings), MemoryStore(86400))
    proxy = Proxy(settings, router, upstream, Traffic())
    down = RecordingDownstream()
    body = b'{"model":"m","messages":[]}'
    await proxy.handle(Request(b"POST", b"/v1/chat/completions", (1, 1), [], b"", body,
                               {b"x-session-id": session}, None, "conn:test",
                               perf_counter()), down)
    return proxy, down


@pytest.mark.parametrize(("answers", "status", "counts"), [
    # a 503 from the first pod, the other serves: one retry, one 2xx
    ([503, 200], 200, {"requests": 1, "retries": 1, "responses_2xx": 1, "no_endpoint": 0}),
    # nothing accepts a connection: the sidecar's own 503, counted once as no endpoint
    ([Outcome.CONNECT_ERROR, Outcome.CONNECT_ERROR], 503,
     {"requests": 1, "retries": 1, "responses_5xx": 1, "no_endpoint": 1}),
])
async def test_the_exchange_against_the_packaged_mock_upstream(answers, status, counts):
    # Answered in order, whichever pod the session's route tries first.
    queue = iter(answers)
    upstream = MockUpstream(handler=lambda sent: next(queue))
    proxy, down = await _exchange(upstream)
    assert down.status == status and down.ended
    assert len({sent.base_url for sent in upstream.received}) == 2
    view = proxy.events.view()
    assert {name: view[name] for name in counts} == counts
    assert view["inflight"] == 0
    assert upstream.in_use() == 0, "every reply was released"
    assert [r.released for r in upstream.replies] == [1] * len(upstream.replies)


async def test_a_bad_session_header_is_refused_once_without_an_upstream():
    upstream = MockUpstream()
    proxy, down = await _exchange(upstream, session=b"bad session \x01")
    assert down.status == 400 and upstream.received == []
    view = proxy.events.view()
    assert view["refused"] == view["bad_requests"] == 1
    assert view["refused_by_reason"] == {"400 invalid_session_id": 1}
