"""One request: check the session headers, resolve the route, run the attempt plan, relay
the answer (resuming a broken chat stream where the pool allows it). Engine-free: it speaks
only to the seam's `Upstream` and `Downstream`.

Nothing is retried once a response byte has reached the app; a break after that ends the
response visibly (an SSE error event, then a closed connection) instead of looking whole.
"""

from __future__ import annotations

import asyncio
import logging
import math
from time import perf_counter
from typing import TYPE_CHECKING

import orjson

from sidecar.config import Settings
from sidecar.dataplane.attempts import Answer, Attempts, Failure
from sidecar.dataplane.events import Events
from sidecar.dataplane.headers import (
    REQUEST_DROP,
    get,
    with_header,
)
from sidecar.dataplane.relay import Relay
from sidecar.dataplane.resume import ContinuationFrames, Transcript, continuation
from sidecar.dataplane.seam import Downstream, Request, Upstream
from sidecar.dataplane.usage import usage_in
from sidecar.fleet.pools import Endpoint, Pool
from sidecar.fleet.traffic import Traffic
from sidecar.policy.budget import RetryBudget
from sidecar.policy.errors import Outcome, error_body
from sidecar.policy.failover import Step
from sidecar.policy.models import listing, named_pool, needs_rewrite, requested_model
from sidecar.routing.sessionkeys import BadKey, default_sources, is_final, pick
from sidecar.routing.sessions import Route, parse_selector
from sidecar.telemetry import Telemetry

if TYPE_CHECKING:  # the router reaches the store (redis); the logic only calls it
    from sidecar.routing.router import Plan, Router

log = logging.getLogger("sidecar.proxy")
RETRY_AFTER_S = "5"


_STREAM_KEY = b'"stream"'
_TRUE = (b":true", b": true")
_FALSE = (b":false", b": false")


def asks_to_stream(body: bytes) -> bool:
    """Does a JSON request ask for a stream (top-level `"stream": true`)? Decided in C
    scans when the key occurs once and the braces around it show it is the top object's (a
    quote inside a JSON string is escaped, so those bytes can only be a key); any other body
    is parsed, so a `stream` key nested in `metadata` or a tool schema, or an escaped key,
    reads right. A body that is not JSON asks for no stream."""
    at = body.find(_STREAM_KEY)
    if at < 0:
        # No escape that could spell the key (a one-byte scan first: memchr is ~10x faster)
        if b"\\" not in body or b"\\u" not in body:
            return False
    else:
        after = at + len(_STREAM_KEY)
        # In an object, only one `}` after the key or one `{` before it: the key's object
        # is the top one (braces inside strings only add to those counts).
        if body[:1] == b"{" and body[-1:] == b"}" and body.find(_STREAM_KEY, after) < 0 and (
                body.count(b"}", after) == 1 if at > len(body) - after
                else body.count(b"{", 0, at) == 1):
            if body.startswith(_TRUE, after):
                return True
            if body.startswith(_FALSE, after):
                return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def rewrite_model(body: bytes, model: str) -> bytes:
    """Swap the `model` of a JSON request for the serving pool's; anything else untouched."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict) or "model" not in data:
        return body
    data["model"] = model
    return orjson.dumps(data)


class Proxy:
    """The request logic of one sidecar (what `/stats` calls `proxy`)."""

    def __init__(self, settings: Settings, router: Router, upstream: Upstream,
                 traffic: Traffic, telemetry: Telemetry | None = None) -> None:
        self.router = router
        self.events = Events(telemetry if telemetry is not None else Telemetry({}), traffic,
                             settings.request_log_level)
        self.counters = self.events.counters
        self.sources = settings.session_keys or default_sources(settings.session_header)
        self.max_attempts = settings.max_attempts
        self.budget = RetryBudget(settings.retry_budget_percent, settings.retry_budget_min)
        self.attempts = Attempts(upstream, self.events, self.budget, settings.max_attempts,
                                 settings.first_byte_timeout_s, settings.response_timeout_s)
        self.stream_idle_timeout = settings.stream_idle_timeout_s
        self.loop = asyncio.get_running_loop()

    async def handle(self, request: Request, down: Downstream) -> None:
        self.events.started()
        fields: dict[str, object] = {}
        try:
            status, pool, model = await self._handle(request, down, fields)
        except asyncio.CancelledError:
            self.events.disconnected()
            raise
        except BaseException:
            self.events.left()
            raise
        self.events.finished(request.method, request.target, status, pool, model,
                             perf_counter() - request.received_at, fields)

    def _refuse(self, down: Downstream, status: int, message: str, code: str,
                headers: bytes = b"", attempts: int = 0, **extra: object
                ) -> tuple[int, str, str]:
        down.respond(status, error_body(message, code, **extra),
                     headers + b"x-sidecar-attempts: %d\r\n" % attempts)
        return status, "none", "none"

    async def _handle(self, request: Request, down: Downstream, fields: dict[str, object]
                      ) -> tuple[int, str, str]:
        if request.method == b"GET" and request.target.split(b"?", 1)[0] == b"/v1/models":
            # What the app may name is what the sidecar can serve, not what one pod serves.
            down.respond(200, orjson.dumps(listing(self.router.settings.pools)),
                         b"x-sidecar-attempts: 0\r\n")
            return 200, "none", "none"
        try:
            key = pick(self.sources, request.keys, request.body)
        except BadKey as bad:
            self.events.refused(400, "invalid_session_id")
            return self._refuse(down, 400, f"header {bad.header} must be 1-256 printable "
                                "ASCII characters", "invalid_session_id")
        local = key is None
        if key is None:
            session, parent = request.connection, None
            fields["session_source"] = "connection"
        else:
            session, parent = key.session, key.parent
            fields["session_source"] = key.source
            if parent is not None and parent != session:
                fields["parent"] = parent
            else:
                parent = None
        selector = None
        if request.selector is not None:
            selector = parse_selector(request.selector.decode("latin-1").strip())
            if selector is None:
                self.events.refused(400, "invalid_selector")
                return self._refuse(down, 400, "header x-sidecar-selector must be an integer "
                                    "0-15", "invalid_selector")
        requested = key.model if key is not None and key.read_body \
            else requested_model(request.body)
        named = named_pool(self.router.pools.models, requested)
        plan = await self.router.open(session, self.loop.time(), local=local,
                                      selector=selector, named=named, parent=parent,
                                      body=request.body)
        fields["session"] = plan.route.session
        try:
            result = await self._forward(request, down, plan, fields, requested)
        finally:
            plan.close()
        if is_final(request.keys):
            # The answer is complete: the session ends here and in the store (as
            # DELETE /sessions/{id} does), so its pod's count falls now, not at idle expiry.
            await self.router.end(plan.route.session, local=local)
            fields["session_ended"] = True
        return result

    async def _forward(self, request: Request, down: Downstream, plan: Plan,
                       fields: dict[str, object], requested: str | None = None
                       ) -> tuple[int, str, str]:
        route = plan.serving
        now = self.loop.time()
        self.budget.record_request(now)
        failures: list[Failure] = []  # only grows on failures
        body = request.body

        def request_for(pool: Pool) -> tuple[bytes, bytes]:
            payload = rewrite_model(body, pool.model) if needs_rewrite(requested, pool.model) \
                else body
            return _headers_for(request, pool), payload

        streamed = asks_to_stream(body)
        answer, step = await self.attempts.run(plan.candidates(now), request.method,
                                               request.target, request_for, failures,
                                               streamed=streamed)
        fields["attempts"] = answer.attempt if answer is not None else len(failures)
        if answer is None:
            sent = len(failures)
            tried = [f.view() for f in failures]
            if step is Step.GAVE_UP and failures[-1].outcome is Outcome.BAD_RESPONSE:
                last = failures[-1]
                return self._refuse(
                    down, 502, f"the model server at {last.endpoint} (pool {last.pool}) "
                    "answered with a malformed HTTP response (an invalid status line, header "
                    "or chunked body, or a transfer coding other than chunked); the request "
                    "was not sent elsewhere, since that server took it", "upstream_error",
                    attempts=sent, tried=tried)
            if step is Step.GAVE_UP:
                return self._refuse(down, 504, self._timeout_message(failures[-1], streamed),
                                    "upstream_timeout", attempts=sent, tried=tried)
            retry_after = _seconds(min((f.retry_after for f in failures if f.retry_after),
                                       default=None)).encode()
            if step is Step.BUDGET_REFUSED:
                return self._refuse(
                    down, 503, "retry budget exhausted: too many retries in the last 10 s; "
                    "not retrying to avoid multiplying load", "retry_budget_exhausted",
                    b"Retry-After: " + retry_after + b"\r\n", sent, tried=tried)
            self.events.no_endpoint()
            return self._refuse(down, 503, self._no_endpoint_message(route, failures),
                                "no_ready_endpoint", b"Retry-After: " + retry_after + b"\r\n",
                                sent, tried=tried)
        with answer.lease:
            pool, endpoint = answer.pool, answer.lease.endpoint
            if pool.name != route.pool:
                self.events.fallback(route.pool, pool.name)
                fields["fallback"] = route.pool
            reason = None
            if failures:
                last = failures[-1]
                reason = f"{last.outcome.value} from {last.endpoint} (pool {last.pool})"
            if endpoint is plan.spill:
                fields["spilled_from"] = route.endpoint.url if route.endpoint else None
            plan.served(pool, endpoint, reason)
            fields["endpoint"] = endpoint.url
            reply, payload = answer.reply, answer.payload
            head = self._head(request, route, answer, fields)
            if answer.body is not None:
                # One write for the whole answer; reply.length, not len(body): a HEAD
                # answer keeps the upstream's Content-Length.
                down.send(reply.status, reply.reason, head, reply.length, answer.body)
                usage = usage_in(answer.body) if answer.body else None
                prompt, completion = usage or (len(payload) // 4, len(answer.body) // 4)
                self.events.tokens(pool.name, pool.model, prompt, completion)
                return reply.status, pool.name, pool.model
            relay = Relay(down, self.events, pool.name, pool.model, request.received_at,
                          _transcript(request, answer))
            await self._relay(request, down, plan, answer, relay, head)
            prompt, completion = relay.tokens(len(payload))
            self.events.tokens(pool.name, pool.model, prompt, completion,
                               relay.generation_s(), relay.inter_token_s())
            return reply.status, pool.name, pool.model

    def _head(self, request: Request, route: Route, answer: Answer,
              fields: dict[str, object]) -> bytes:
        reply, pool = answer.reply, answer.pool
        # The sidecar's own time: request received → upstream request sent, plus upstream
        # answer ready → our head written; the waits on upstreams are theirs.
        overhead = (answer.sent_at - request.received_at) + (perf_counter() - answer.ready_at)
        self.events.telemetry.observe("overhead", (pool.name,), overhead)
        fields["overhead_ms"] = round(overhead * 1000, 3)
        extra = [b"x-sidecar-overhead-ms: %.3f\r\n" % (overhead * 1000),
                 b"x-sidecar-session: %s\r\n" % route.session.encode(),
                 b"x-sidecar-session-source: %s\r\n" % str(fields["session_source"]).encode(),
                 b"x-sidecar-pool: %s\r\n" % pool.name.encode(),
                 b"x-sidecar-model: %s\r\n" % pool.model.encode(),
                 b"x-sidecar-endpoint: %s\r\n" % answer.lease.endpoint.url_key,
                 b"x-sidecar-attempts: %d\r\n" % answer.attempt]
        if pool.name != route.pool:
            extra.append(b"x-sidecar-fallback: %s\r\n" % route.pool.encode())
        return reply.forward + b"".join(extra)

    async def _relay(self, request: Request, down: Downstream, plan: Plan, answer: Answer,
                     relay: Relay, head: bytes) -> None:
        reply, payload = answer.reply, answer.payload
        pool = answer.pool
        transcript = relay.transcript
        # The head, what was held and (when the whole body is already here) the end leave
        # in one write; later chunks go out as they arrive.
        down.cork()
        down.start(reply.status, reply.reason, head,
                   reply.length if transcript is None else None)
        down.follow(reply)
        source, source_lease = reply, answer.lease
        held = answer.held
        resumed = 0
        try:
            while True:
                if held:
                    relay.feed(held)
                ended = source.pipe(relay.feed)
                if not ended.done():
                    down.uncork()
                broke = await ended
                if broke is None:
                    relay.finish()
                    return
                self.attempts.stream_broken(source_lease.endpoint)
                log.warning("upstream %s broke mid-stream", source_lease.endpoint.url)
                if transcript is not None and transcript.finished:
                    # The answer was complete (finish_reason arrived); only the end of the
                    # stream was lost. End it as the upstream would have.
                    self.events.completed_after_break()
                    relay.feed(b"data: [DONE]\n\n")
                    relay.finish()
                    return
                nxt = None
                if transcript is not None and resumed < self.max_attempts - 1:
                    nxt = await self._resume(request, plan, pool, source_lease.endpoint,
                                             transcript, payload)
                    if nxt is None:
                        self.events.resume_failed()
                if nxt is None:
                    relay.end_broken(answer.sse)
                    return
                if source_lease is not answer.lease:
                    source_lease.close()
                resumed += 1
                continued, relay.frames = nxt
                source, source_lease, held = continued.reply, continued.lease, continued.held
                down.follow(source)
                plan.served(pool, source_lease.endpoint, "resumed after a break mid-stream")
        finally:
            down.uncork()
            down.follow(None)
            if source_lease is not answer.lease:
                source_lease.close()

    async def _resume(self, request: Request, plan: Plan, pool: Pool, broken: Endpoint,
                      transcript: Transcript, payload: bytes
                      ) -> tuple[Answer, ContinuationFrames] | None:
        """Start the continuation of a broken chat stream on another endpoint of the pool
        (see resume.py), through the same attempt loop; None when it cannot be resumed."""
        answer = transcript.answer()
        if answer is None:
            return None
        text, content_frames, stream_id, created = answer
        body = continuation(payload, text, content_frames)
        if body is None:
            return None
        continued, _ = await self.attempts.run(
            plan.resume_candidates(pool, broken, self.loop.time()), b"POST", request.target,
            lambda p: (_headers_for(request, p), body), [],
            streamed=True, strict=True)
        if continued is None:
            return None
        self.events.resumed()
        log.info("resuming a stream of session %s on %s after %s broke", plan.route.session,
                 continued.lease.endpoint.url, broken.url)
        return continued, ContinuationFrames(stream_id, created)

    def _timeout_message(self, failure: Failure, streamed: bool) -> str:
        if streamed:
            deadline = self.attempts.first_byte_timeout
            waited = f"sent no content within SIDECAR_FIRST_BYTE_TIMEOUT_S={deadline:g} s"
        else:
            deadline = self.attempts.response_timeout
            waited = f"did not answer within SIDECAR_RESPONSE_TIMEOUT_S={deadline:g} s"
        if self.stream_idle_timeout < deadline:
            waited += (f" (or fell silent for SIDECAR_STREAM_IDLE_TIMEOUT_S="
                       f"{self.stream_idle_timeout:g} s after its head)")
        return (f"the model server at {failure.endpoint} (pool {failure.pool}) took the "
                f"request but {waited}; its connection was closed so it stops generating, "
                "and the request was not sent elsewhere (that would start the same work "
                "over). Raise the timeout if calls this long are expected")

    def _no_endpoint_message(self, route: Route, failures: list[Failure]) -> str:
        """Say what went wrong and what to check: this is the first error a new user meets."""
        if failures and all(f.outcome is Outcome.CONNECT_ERROR for f in failures):
            urls = ", ".join(sorted({f.endpoint for f in failures}))
            return (f"no endpoint could serve the request: nothing accepted a connection at "
                    f"{urls}. Is the model server running there, and does SIDECAR_POOLS "
                    "list the right endpoints?")
        if failures:
            return "no endpoint could serve the request (see `tried`)"
        pools = [route.pool, *(p.name for p in self.router.pools.fallback_chain(route.pool))]
        states = {e.url: e.state.value for name in pools
                  if (pool := self.router.pools.get(name)) for e in pool.endpoints}
        if not states:
            return (f"pool {route.pool!r} has no endpoints configured (nor its fallbacks); "
                    "list them in SIDECAR_POOLS")
        return (f"no ready endpoint in pool {route.pool!r} or its fallback chain {pools[1:]} "
                f"({states}): pods may still be starting (a cold start) or were ejected "
                "after failures; GET /endpoints on the admin listener shows their states")


def _headers_for(request: Request, pool: Pool) -> bytes:
    """The header lines every send to `pool` carries (first tries, retries, resumes alike):
    the app's, with the pool's key in place of the app's Authorization when it has one."""
    if pool.auth_header is None:
        return request.forward
    return with_header(request.headers, b"Authorization", pool.auth_header.encode(),
                       REQUEST_DROP, get(request.headers, b"connection"))


def _transcript(request: Request, answer: Answer) -> Transcript | None:
    """A transcript for a stream that may be resumed: a chat stream of a `resume` pool."""
    if answer.pool.config.resume and answer.sse and answer.reply.status == 200 and \
            request.method == b"POST" and \
            request.target.split(b"?", 1)[0].endswith(b"/chat/completions"):
        return Transcript()
    return None


def _seconds(value: float | None) -> str:
    return str(max(1, math.ceil(value))) if value else RETRY_AFTER_S

