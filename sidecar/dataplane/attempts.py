"""The attempt loop every try shares — first tries, retries, fallbacks and resumes: send to
each candidate in turn, read up to the point of no return, and let `failover.after_failure`
say what follows a failure. Each attempt's outcome is reported to its endpoint's outlier
detector (outlier.py), which alone ejects and restores. An endpoint `Lease` owns its
in-flight count and the reply's connection from the send to the end of the relay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from sidecar.dataplane.events import Events
from sidecar.dataplane.flow import has_body
from sidecar.dataplane.headers import get
from sidecar.dataplane.relay import Preamble
from sidecar.dataplane.seam import Broken, Reply, Upstream
from sidecar.fleet.pools import Endpoint, Pool
from sidecar.policy.budget import RetryBudget
from sidecar.policy.errors import Outcome, Work, classify_status, parse_retry_after
from sidecar.policy.failover import RETRIES, Step, after_failure

# A Content-Length body up to this size is read whole before the app sees a byte (so a
# cut-short body is still retryable); a larger one is streamed as it arrives.
WHOLE_BODY_MAX = 1024 * 1024


class Lease:
    """An endpoint in use by one request: counted in flight until closed, and the reply's
    connection released (reused only if complete) with it."""

    __slots__ = ("endpoint", "reply")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.reply: Reply | None = None
        endpoint.inflight += 1

    def close(self) -> None:
        if self.reply is not None:
            self.reply.release()
            self.reply = None
        if self.endpoint is not None:
            self.endpoint.inflight -= 1
            self.endpoint = None  # type: ignore[assignment]

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Answer:
    """What an attempt got before the point of no return."""

    __slots__ = ("attempt", "body", "held", "lease", "payload", "pool", "ready_at", "reply",
                 "sent_at", "sse")

    def __init__(self, pool: Pool, lease: Lease, reply: Reply, payload: bytes,
                 sent_at: float) -> None:
        self.pool = pool
        self.payload = payload  # the request body as sent (model rewritten for a fallback)
        self.lease = lease
        self.reply = reply
        self.sent_at = sent_at
        self.ready_at = sent_at
        self.body: bytes | None = None  # a whole body, read before answering
        self.held = b""  # a stream's preamble and first content
        self.sse = False
        self.attempt = 1  # which attempt of the loop got it


class Failure:
    __slots__ = ("endpoint", "outcome", "pool", "retry_after", "status")

    def __init__(self, pool: str, endpoint: str, outcome: Outcome, status: int | None,
                 retry_after: float | None) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.outcome = outcome
        self.status = status
        self.retry_after = retry_after

    def view(self) -> dict[str, object]:
        view: dict[str, object] = {"endpoint": self.endpoint, "pool": self.pool,
                                   "outcome": self.outcome.value}
        if self.status is not None:
            view["status"] = self.status
        return view


class Attempts:
    def __init__(self, upstream: Upstream, events: Events, budget: RetryBudget,
                 max_attempts: int, first_byte_timeout: float,
                 response_timeout: float = 600.0) -> None:
        self.upstream = upstream
        self.events = events
        self.budget = budget
        self.max_attempts = max_attempts
        # How long a live pod may take: a stream until its first content, any other call
        # until its head (a server sends it when the whole answer is ready).
        self.first_byte_timeout = first_byte_timeout
        self.response_timeout = response_timeout
        self.loop = asyncio.get_running_loop()

    async def run(self, candidates: Iterator[tuple[Pool, Endpoint]], method: bytes,
                  target: bytes, request_for: Callable[[Pool], tuple[bytes, bytes]],
                  failures: list[Failure], *, streamed: bool = False, strict: bool = False
                  ) -> tuple[Answer | None, Step]:
        """Try candidates until one answers. `request_for(pool)` gives (headers, body) for
        that pool; `streamed`: the call asked for a stream (its deadline is the first
        content's). `strict` (resumes): only a 200 counts, nothing is passed through and no
        retry budget applies. Returns the answer (its lease open) and how the loop ended;
        every lease but the answer's is closed, on every path.

        The deadline is the call's, not each attempt's: a wait for a busy pool, a pod that
        held the work and then dropped it, and every retry spend the same window; a retry
        that would start after it has passed ends the loop instead (GAVE_UP: a 504)."""
        timeout = self.first_byte_timeout if streamed else self.response_timeout
        deadline = self.loop.time() + timeout
        candidate = next(candidates, None)
        attempt = 0
        reconnected = False
        events = self.events
        while candidate is not None:
            pool, endpoint = candidate
            attempt += 1
            headers, body = request_for(pool)
            lease = Lease(endpoint)
            try:
                answer, outcome = await self._once(pool, lease, method, target, headers, body,
                                                   deadline)
            except BaseException:
                lease.close()
                raise
            if answer is not None:
                answer.attempt = attempt
                if outcome.work is Work.DONE and (not strict or answer.reply.status == 200):
                    change = endpoint.outlier.report(outcome, self.loop.time())
                    if outcome is Outcome.UPSTREAM_ERROR:  # its own 5xx: the app sees it
                        events.attempt_failed(endpoint, outcome, change)
                        return answer, Step.PASS_THROUGH
                    events.answered(endpoint, pool.model, answer.ready_at - answer.sent_at,
                                    change)
                    return answer, Step.NEXT
            now = self.loop.time()
            if strict:
                lease.close()
                if outcome not in (Outcome.OK, Outcome.CLIENT_ERROR):
                    events.attempt_failed(endpoint, outcome,
                                          endpoint.outlier.report(outcome, now))
                if not outcome.retryable or now >= deadline:
                    return None, Step.GAVE_UP  # a live pod took the continuation
                if attempt >= self.max_attempts:
                    return None, Step.EXHAUSTED
                candidate = next(candidates, None)
                continue
            events.attempt_failed(endpoint, outcome, endpoint.outlier.report(outcome, now))
            status = answer.reply.status if answer is not None else None
            wait = parse_retry_after(get(answer.reply.headers, b"retry-after")) \
                if answer is not None else None
            if wait:
                endpoint.outlier.hold(wait, now)
            failures.append(Failure(pool.name, endpoint.url, outcome, status, wait))
            late = now >= deadline
            has_next = attempt < self.max_attempts and (nxt := next(candidates, None)) \
                is not None
            step = after_failure(
                outcome, attempt=attempt, max_attempts=self.max_attempts,
                reconnected=reconnected, has_next=has_next, answered=answer is not None,
                budget_allows=not outcome.overload or not has_next or late
                or self.budget.try_retry(now))
            if late and step in RETRIES:
                step = Step.GAVE_UP  # the call's deadline passed: no attempt starts
            if step is Step.PASS_THROUGH:
                assert answer is not None
                return answer, step  # attempts spent: the last upstream answer goes out
            lease.close()
            if step is Step.SAME_ENDPOINT:
                reconnected = True
                if has_next:  # the candidate drawn stays first in line
                    candidates = _prepend(nxt, candidates)
                events.retried(pool.name, outcome)
                continue
            if step is not Step.NEXT:
                if step is Step.BUDGET_REFUSED:
                    events.budget_refused()
                return None, step
            events.retried(pool.name, outcome)
            candidate = nxt
        return None, Step.EXHAUSTED

    def stream_broken(self, endpoint: Endpoint) -> None:
        """A relayed stream broke after bytes reached the app: reported as that attempt's
        outcome (never retried; exchange.py may resume it as a new call)."""
        self.events.stream_broken(
            endpoint, endpoint.outlier.report(Outcome.BROKEN_STREAM, self.loop.time()))

    async def _once(self, pool: Pool, lease: Lease, method: bytes, target: bytes,
                    headers: bytes, body: bytes, deadline: float
                    ) -> tuple[Answer | None, Outcome]:
        """Send once and read up to the point of no return: a whole (small) body, or a
        stream's preamble plus its first content. Nothing has reached the app yet; whether
        a failure here may be retried is the outcome's `Work`."""
        # One deadline for the head and, for a stream, its first content; the upstream's
        # tick checks it (no timer per request) and closes the connection when it passes.
        reply = await self.upstream.send(lease.endpoint.url, method, target, headers, body,
                                         deadline)
        if isinstance(reply, Outcome):
            return None, reply
        lease.reply = reply
        answer = Answer(pool, lease, reply, body, reply.sent_at)
        answer.ready_at = reply.arrived_at
        outcome = classify_status(reply.status)
        if outcome is Outcome.RETRYABLE_STATUS:
            reply.settle()
            return answer, outcome
        sse = answer.sse = reply.event_stream
        if not sse and reply.length is not None and reply.length <= WHOLE_BODY_MAX:
            # The call's deadline stays armed until the whole body is here: a pod slow
            # after its head is still a live pod on the work (HELD), never a dropped one.
            try:
                answer.body = await reply.read()
            except Broken as broken:
                return None, _before_content(broken.outcome)
            finally:
                reply.settle()
            answer.ready_at = reply.arrived_at
            return answer, outcome
        if reply.length == 0 or not has_body(reply.status):
            reply.settle()
            return answer, outcome
        # Hold a stream until its first bytes (SSE: its preamble until the first content),
        # or its end: the first-byte deadline stays armed until then, and a break before
        # it is still retryable.
        preamble = Preamble(self.loop, sse)
        ended = reply.pipe(preamble.feed)
        ended.add_done_callback(preamble.ended)
        await preamble.ready
        reply.settle()
        if ended.done() and (broke := ended.result()) is not None:
            return None, _before_content(broke)
        answer.held = preamble.take()
        answer.ready_at = reply.arrived_at
        return answer, outcome


def _before_content(broke: Outcome) -> Outcome:
    """What a body that did not arrive whole, before anything reached the app, says about
    the work: held past the deadline (a live pod, 504) and malformed (the pod answered,
    502) are the pod's; only a connection that broke under it leaves the work to no pod."""
    if broke in (Outcome.FIRST_BYTE_TIMEOUT, Outcome.BAD_RESPONSE):
        return broke
    return Outcome.BROKEN_BEFORE_CONTENT


def _prepend(first: tuple[Pool, Endpoint] | None, rest: Iterator[tuple[Pool, Endpoint]]
             ) -> Iterator[tuple[Pool, Endpoint]]:
    if first is not None:
        yield first
    yield from rest
