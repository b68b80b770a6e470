"""One request: resolve the session's route, try endpoints in plan order, stream back.

The body is buffered (bounded) so it can be replayed on failover. Nothing is retried once a
response byte has reached the app; a break after that ends the response visibly (an SSE
error event, then an aborted connection) instead of looking like a complete answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from time import perf_counter

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from sidecar.budget import RetryBudget
from sidecar.config import Settings
from sidecar.errors import (
    UPSTREAM_ERRORS,
    Outcome,
    classify_exception,
    classify_status,
    error_body,
    parse_retry_after,
)
from sidecar.pools import Endpoint, Pool
from sidecar.resume import ContinuationFrames, Transcript, continuation
from sidecar.routing import Router
from sidecar.sessions import Route, parse_selector, valid_session_id
from sidecar.sse import MAX_HELD_BYTES, is_preamble, split_frames
from sidecar.telemetry import Telemetry
from sidecar.traffic import Traffic, usage_in

log = logging.getLogger("sidecar.proxy")
request_log = logging.getLogger("sidecar.requests")
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

SELECTOR_HEADER = "x-sidecar-selector"
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
# Set by aiohttp itself from what is actually sent.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
JSON_HEADERS = {"Content-Type": "application/json"}
RETRY_AFTER_S = "5"


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

    def count_status(self, status: int) -> None:
        if status < 300:
            self.responses_2xx += 1
        elif status >= 500:
            self.responses_5xx += 1
        elif status >= 400:
            self.responses_4xx += 1
        else:
            self.responses_other += 1


class Exchange:
    """What one proxied request carries through its attempts."""

    __slots__ = ("content_frames", "headers", "local", "request", "route", "started", "target",
                 "upstream_s", "usage")

    def __init__(self, request: web.Request, route: Route, local: bool, started: float
                 ) -> None:
        self.request = request
        self.started = started
        self.upstream_s = 0.0  # time spent waiting on upstreams (excluded from overhead)
        self.route = route
        self.local = local
        self.headers = upstream_headers(request.headers)
        self.target = request.rel_url.raw_path_qs
        self.usage: tuple[int, int] | None = None  # (prompt, completion) the upstream reported
        self.content_frames = 0  # streamed content frames: the estimate without usage

    def tokens(self, payload: bytes, body: bytes | None) -> tuple[int, int]:
        """Tokens for traffic accounting: reported usage, else an estimate (~4 bytes per
        token of request; streamed frames or response bytes for the completion)."""
        if self.usage is not None:
            return self.usage
        completion = self.content_frames if body is None else len(body) // 4
        return len(payload) // 4, completion


def json_error(status: int, message: str, code: str, headers: dict[str, str] | None = None,
               **extra: object) -> web.Response:
    return web.Response(status=status, body=error_body(message, code, **extra),
                        headers={**JSON_HEADERS, **(headers or {})})


def rewrite_model(body: bytes, model: str) -> bytes:
    """Swap the `model` of a JSON request for the fallback pool's; anything else untouched."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(data, dict) or "model" not in data:
        return body
    data["model"] = model
    return orjson.dumps(data)


def upstream_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The app's headers minus hop-by-hop ones, as pairs: aiohttp copies whatever it is
    given into its own multidict, so building one here would copy twice."""
    named = headers.get("Connection")
    drop = _REQUEST_DROP
    if named:
        drop = drop | {h.strip().lower() for h in named.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


def with_authorization(headers: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "authorization"] + [
        ("Authorization", value)]


class Proxy:
    def __init__(self, settings: Settings, router: Router, http: aiohttp.ClientSession,
                 traffic: Traffic, telemetry: Telemetry | None = None) -> None:
        self.settings = settings
        self.router = router
        self.http = http
        self.traffic = traffic
        self.telemetry = telemetry if telemetry is not None else Telemetry({})
        self.request_log_level = settings.request_log_level
        self.counters = ProxyCounters()
        self.session_header = settings.session_header
        self.max_body = settings.max_body_bytes
        self.max_attempts = settings.max_attempts
        self.first_byte_timeout = settings.first_byte_timeout_s
        self.budget = RetryBudget(settings.retry_budget_percent, settings.retry_budget_min)

    @staticmethod
    def _connection_session(request: web.Request) -> str:
        # Apps that send no session header get one session per TCP connection. The peer's
        # address and port name the connection for as long as it lives; a later connection
        # that reuses the port inherits a route that is at worst idle-expired soon.
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, tuple):
            return f"conn:{peer[0]}:{peer[1]}"
        return f"conn:{id(request.protocol):x}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        counters = self.counters
        counters.requests += 1
        counters.inflight += 1
        # Durations use perf_counter: uvloop's loop.time() is a millisecond clock cached per
        # loop iteration, too coarse for sub-millisecond overheads.
        started = perf_counter()
        try:
            response = await self._handle(request, started)
        except asyncio.CancelledError:
            counters.client_disconnects += 1
            raise
        finally:
            counters.inflight -= 1
        status = response.status
        counters.count_status(status)
        pool = response.headers.get("x-sidecar-pool", "none")
        tags = (pool, _STATUS_CLASS[status // 100] if status < 600 else "other")
        elapsed = perf_counter() - started
        telemetry = self.telemetry
        telemetry.count("requests", tags)
        telemetry.observe("request_duration", tags, elapsed)
        if self.request_log_level and request_log.isEnabledFor(self.request_log_level):
            # Never the body, never credentials: what an operator needs to follow a call.
            request_log.log(self.request_log_level, "request", extra={"fields": {
                "method": request.method, "path": request.path, "status": status,
                "session": response.headers.get("x-sidecar-session"), "pool": pool,
                "endpoint": response.headers.get("x-sidecar-endpoint"),
                "attempts": response.headers.get("x-sidecar-attempts"),
                "fallback": response.headers.get("x-sidecar-fallback"),
                "duration_ms": round(elapsed * 1000, 3),
                "overhead_ms": response.headers.get("x-sidecar-overhead-ms")}})
        return response

    async def _handle(self, request: web.Request, started: float) -> web.StreamResponse:
        headers = request.headers
        session = headers.get(self.session_header)
        local = session is None
        if session is None:
            session = self._connection_session(request)
        elif not valid_session_id(session):
            self.counters.bad_requests += 1
            return json_error(400, f"header {self.session_header} must be 1-256 printable "
                              "ASCII characters", "invalid_session_id")
        selector = None
        raw_selector = headers.get(SELECTOR_HEADER)
        if raw_selector is not None:
            selector = parse_selector(raw_selector.strip())
            if selector is None:
                self.counters.bad_requests += 1
                return json_error(400, f"header {SELECTOR_HEADER} must be an integer 0-15",
                                  "invalid_selector")

        length = request.content_length
        if length is not None and length > self.max_body:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()

        now = asyncio.get_running_loop().time()
        route = self.router.lookup(session, now)
        if route is None:
            route = await self.router.resolve(session, selector, local=local)
        return await self._forward(request, route, body, now, local, started)

    def _too_large(self) -> web.Response:
        self.counters.body_too_large += 1
        return json_error(413, f"request body exceeds SIDECAR_MAX_BODY_BYTES="
                          f"{self.max_body}", "body_too_large")

    async def _forward(self, request: web.Request, route: Route, body: bytes, now: float,
                       local: bool, started: float) -> web.StreamResponse:
        ex = Exchange(request, route, local, started)
        tried: list[dict[str, object]] = []  # only grows on failures
        retry_after: float | None = None
        loop = asyncio.get_running_loop()
        self.budget.record_request(now)
        plan = self.router.plan(route, now, len(body))
        candidate = next(plan, None)
        attempt = 0
        relost = False
        while candidate is not None:
            pool, endpoint = candidate
            attempt += 1
            payload = body
            if pool.name != route.pool and body:
                payload = rewrite_model(body, pool.model)
            headers = ex.headers
            if pool.auth_header is not None:
                headers = with_authorization(headers, pool.auth_header)
            endpoint.inflight += 1
            sent_at = perf_counter()
            try:
                result = await self._attempt(request.method, endpoint, ex.target, headers,
                                             payload)
            except BaseException:
                endpoint.inflight -= 1
                raise
            waited = perf_counter() - sent_at
            ex.upstream_s += waited
            now = loop.time()
            upstream, head, outcome = result
            if outcome.retryable:
                self._failed(endpoint, outcome, now)
                failure: dict[str, object] = {"endpoint": endpoint.url, "pool": pool.name,
                                              "outcome": outcome.value}
                if upstream is not None:
                    failure["status"] = upstream.status
                    wait = parse_retry_after(upstream.headers.get("Retry-After"))
                    if wait:
                        endpoint.hold(wait, now)
                        retry_after = wait if retry_after is None else min(retry_after, wait)
                tried.append(failure)
                if outcome is Outcome.CONNECTION_LOST and not relost and \
                        attempt < self.max_attempts:
                    # Most likely a keep-alive connection the server closed as we reused
                    # it: the same endpoint, on a fresh connection, once.
                    relost = True
                    endpoint.inflight -= 1
                    self.counters.retries += 1
                    continue
                nxt = next(plan, None) if attempt < self.max_attempts else None
                if nxt is not None or upstream is None:
                    if upstream is not None:
                        upstream.release()
                    endpoint.inflight -= 1
                    if nxt is not None and outcome.overload and \
                            not self.budget.try_retry(now):
                        self.counters.budget_refusals += 1
                        return json_error(
                            503, "retry budget exhausted: too many retries in the last 10 s; "
                            "not retrying to avoid multiplying load", "retry_budget_exhausted",
                            headers={"Retry-After": _seconds(retry_after)}, tried=tried)
                    if nxt is not None:
                        self.counters.retries += 1
                        self.telemetry.count("retries", (pool.name,))
                        if outcome is Outcome.BROKEN_BEFORE_CONTENT:
                            self.counters.prefill_retries += 1
                    candidate = nxt
                    continue
                # Attempts are spent: the last upstream answer itself goes to the app.
            else:
                if endpoint.record_success():
                    self.telemetry.event("endpoint restored", f"{endpoint.url} (pool "
                                         f"{pool.name}) answered again",
                                         tags=[f"pool:{pool.name}"])
                self.telemetry.observe("upstream_ttfb", (pool.name,), waited)
            assert upstream is not None
            if pool.name != route.pool:
                self.counters.fallbacks += 1
                self.telemetry.count("fallbacks", (route.pool, pool.name))
            reason = None
            if tried:
                last = tried[-1]
                reason = f"{last['outcome']} from {last['endpoint']} (pool {last['pool']})"
            self.router.served(route, pool, endpoint, local=local, reason=reason)
            try:
                response = await self._relay(ex, upstream, head, pool, endpoint, attempt,
                                             payload)
            finally:
                endpoint.inflight -= 1
                upstream.release()
            streamed = response.body is None if isinstance(response, web.Response) else True
            prompt, completion = ex.tokens(payload, None if streamed else response.body)
            self.traffic.count(pool.name, prompt, completion)
            tags = (pool.name, pool.model)
            self.telemetry.count("prompt_tokens", tags, prompt)
            self.telemetry.count("completion_tokens", tags, completion)
            return response

        self.counters.no_endpoint += 1
        return json_error(503, self._no_endpoint_message(route, tried), "no_ready_endpoint",
                          headers={"Retry-After": _seconds(retry_after)}, tried=tried)

    def _no_endpoint_message(self, route: Route, tried: list[dict[str, object]]) -> str:
        """Say what went wrong and what to check: this is the first error a new user meets."""
        if tried and all(t["outcome"] == Outcome.CONNECT_ERROR.value for t in tried):
            urls = ", ".join(sorted({str(t["endpoint"]) for t in tried}))
            return (f"no endpoint could serve the request: nothing accepted a connection at "
                    f"{urls}. Is the model server running there, and does SIDECAR_POOLS "
                    "list the right endpoints?")
        if tried:
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

    async def _attempt(self, method: str, endpoint: Endpoint, target: str,
                       headers: list[tuple[str, str]], payload: bytes
                       ) -> tuple[aiohttp.ClientResponse | None, bytes | None, Outcome]:
        """Send once and read up to the point of no return: a whole non-streamed body, or a
        stream's preamble plus its first content. Nothing has reached the app yet, so every
        failure here is still retryable."""
        deadline = asyncio.get_running_loop().time() + self.first_byte_timeout
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await self.http.request(
                    method, URL(endpoint.url + target, encoded=True), headers=headers,
                    data=payload if payload else None, allow_redirects=False)
        except UPSTREAM_ERRORS as exc:
            return None, None, classify_exception(exc)
        outcome = classify_status(upstream.status)
        if outcome is Outcome.RETRYABLE_STATUS:
            return upstream, None, outcome
        try:
            if not _is_streaming(upstream):
                return upstream, await upstream.read(), outcome
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                async with asyncio.timeout_at(deadline):
                    return upstream, await self._until_content(upstream), outcome
            return upstream, None, outcome
        except TimeoutError:
            upstream.close()
            return None, None, Outcome.FIRST_BYTE_TIMEOUT
        except UPSTREAM_ERRORS:
            upstream.close()
            return None, None, Outcome.BROKEN_BEFORE_CONTENT

    @staticmethod
    async def _until_content(upstream: aiohttp.ClientResponse) -> bytes:
        """Hold an SSE stream's preamble until its first content frame (or its end)."""
        held = b""
        pending = b""
        content = upstream.content
        while True:
            chunk = await content.readany()
            if not chunk:  # the stream ended (cleanly) before any content
                return held + pending
            frames, pending = split_frames(pending + chunk)
            for index, frame in enumerate(frames):
                if not is_preamble(frame):
                    return held + b"".join(frames[index:]) + pending
                held += frame
            if len(held) + len(pending) > MAX_HELD_BYTES:
                return held + pending

    def _failed(self, endpoint: Endpoint, outcome: Outcome, now: float) -> None:
        """One failed attempt: passive health, counters, an event if it ejected the pod."""
        self.telemetry.count("upstream_errors", (endpoint.pool, outcome.value))
        if endpoint.record_failure(outcome, now):
            self.telemetry.event("endpoint ejected", f"{endpoint.url} (pool {endpoint.pool}) "
                                 f"after {outcome.value}", alert_type="warning",
                                 tags=[f"pool:{endpoint.pool}"])

    def _response_headers(self, ex: Exchange, upstream: aiohttp.ClientResponse, route: Route,
                          pool: Pool, endpoint: Endpoint, attempts: int
                          ) -> list[tuple[str, str]]:
        # Pairs, not a multidict: aiohttp's response copies them into its own.
        out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP]
        # Everything so far that was not waiting on an upstream is the sidecar's own time.
        overhead = perf_counter() - ex.started - ex.upstream_s
        self.telemetry.observe("overhead", (pool.name,), overhead)
        out.append(("x-sidecar-overhead-ms", f"{overhead * 1000:.3f}"))
        out.append(("x-sidecar-session", route.session))
        out.append(("x-sidecar-pool", pool.name))
        out.append(("x-sidecar-endpoint", endpoint.url))
        out.append(("x-sidecar-attempts", str(attempts)))
        if pool.name != route.pool:
            out.append(("x-sidecar-fallback", route.pool))
        return out

    async def _relay(self, ex: Exchange, upstream: aiohttp.ClientResponse, head: bytes | None,
                     pool: Pool, endpoint: Endpoint, attempts: int,
                     payload: bytes) -> web.StreamResponse:
        request = ex.request
        headers = self._response_headers(ex, upstream, ex.route, pool, endpoint, attempts)
        if not _is_streaming(upstream):
            body = head if head is not None else await upstream.read()
            ex.usage = usage_in(body)
            return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                headers=headers)

        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        if upstream.content_length is None:
            if request.version >= (1, 1):
                response.enable_chunked_encoding()
        else:
            response.content_length = upstream.content_length
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        transcript = Transcript() if (
            pool.config.resume and sse and upstream.status == 200 and request.method == "POST"
            and request.path.endswith("/chat/completions")) else None
        await response.prepare(request)
        source, source_endpoint = upstream, endpoint
        frames: ContinuationFrames | None = None  # set once the stream has been resumed
        resumed: list[tuple[aiohttp.ClientResponse, Endpoint]] = []
        try:
            while True:
                if head:
                    self._tally(ex, head)
                    if out := self._through(head, frames, transcript):
                        await response.write(out)
                if not await self._pump(ex, source, response, frames, transcript):
                    break  # the upstream ended cleanly
                self.counters.broken_streams += 1
                self._failed(source_endpoint, Outcome.BROKEN_STREAM,
                             asyncio.get_running_loop().time())
                log.warning("upstream %s broke mid-stream", source_endpoint.url)
                if transcript is not None and transcript.finished:
                    # The answer was complete (finish_reason arrived); only the end of the
                    # stream was lost. End it as the upstream would have.
                    self.counters.completed_after_break += 1
                    await response.write(b"data: [DONE]\n\n")
                    break
                nxt = None
                if transcript is not None and len(resumed) < self.max_attempts - 1:
                    nxt = await self._resume(ex, pool, source_endpoint, transcript, payload)
                    if nxt is None:
                        self.counters.resume_failures += 1
                if nxt is None:
                    await self._end_broken_stream(request, response, sse)
                    return response
                source, source_endpoint, frames, head = nxt
                resumed.append((source, source_endpoint))
        finally:
            for extra, extra_endpoint in resumed:
                extra_endpoint.inflight -= 1
                extra.release()
        if transcript is not None and (rest := transcript.flush()):
            await response.write(rest)
        await response.write_eof()
        return response

    @staticmethod
    def _through(data: bytes, frames: ContinuationFrames | None,
                 transcript: Transcript | None) -> bytes:
        if frames is not None:
            data = frames.feed(data)
        return transcript.feed(data) if transcript is not None else data

    @staticmethod
    def _tally(ex: Exchange, chunk: bytes) -> None:
        # Two scans in C per chunk; no JSON parsing on the stream path.
        ex.content_frames += chunk.count(b'"content":')
        if b'"usage"' in chunk:
            ex.usage = usage_in(chunk) or ex.usage

    async def _pump(self, ex: Exchange, upstream: aiohttp.ClientResponse,
                    response: web.StreamResponse, frames: ContinuationFrames | None,
                    transcript: Transcript | None) -> bool:
        """Relay an upstream's body as it arrives. True when the upstream broke."""
        chunks = upstream.content.iter_any().__aiter__()
        plain = frames is None and transcript is None
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return False
            except UPSTREAM_ERRORS:
                return True
            self._tally(ex, chunk)
            # A client that went away raises here and ends the handler (upstream released).
            if plain:
                await response.write(chunk)
            elif out := self._through(chunk, frames, transcript):
                await response.write(out)

    async def _resume(self, ex: Exchange, pool: Pool, broken: Endpoint,
                      transcript: Transcript, payload: bytes
                      ) -> tuple[aiohttp.ClientResponse, Endpoint, ContinuationFrames,
                                 bytes | None] | None:
        """Start the continuation of a broken chat stream on another endpoint of the pool
        (see resume.py). Returns the new source, its endpoint (in-flight counted), the frame
        rewriter and the continuation's first bytes; None when it cannot be resumed."""
        answer = transcript.answer()
        if answer is None:
            return None
        text, content_frames, stream_id, created = answer
        body = continuation(payload, text, content_frames)
        if body is None:
            return None
        loop = asyncio.get_running_loop()
        for endpoint in pool.ranked(ex.route.session.encode()):
            now = loop.time()
            if endpoint is broken or not endpoint.usable(now):
                continue
            endpoint.inflight += 1
            try:
                upstream, head, outcome = await self._attempt("POST", endpoint, ex.target,
                                                              ex.headers, body)
            except BaseException:
                endpoint.inflight -= 1
                raise
            if upstream is None or outcome is not Outcome.OK or upstream.status != 200:
                endpoint.inflight -= 1
                if upstream is not None:
                    upstream.release()
                if outcome.endpoint_failed:
                    self._failed(endpoint, outcome, loop.time())
                continue
            endpoint.record_success()
            self.counters.resumes += 1
            self.router.served(ex.route, pool, endpoint, local=ex.local,
                               reason=f"resumed after {broken.url} broke mid-stream")
            log.info("resuming a stream of session %s on %s after %s broke",
                     ex.route.session, endpoint.url, broken.url)
            return upstream, endpoint, ContinuationFrames(stream_id, created), head
        return None

    async def _end_broken_stream(self, request: web.Request, response: web.StreamResponse,
                                 sse: bool) -> None:
        if sse:
            # The OpenAI SDKs raise on an event whose data carries "error".
            event = b"data: " + error_body("the upstream broke mid-stream; the answer is "
                                           "incomplete", "upstream_broken_mid_stream") + b"\n\n"
            try:
                await response.write(event)
            except (ConnectionError, aiohttp.ClientConnectionError):
                return
        # No terminating chunk: the client sees an incomplete body, never a clean end.
        transport = request.transport
        if transport is not None:
            transport.close()


def _is_streaming(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.content_length is None or upstream.headers.get(
        "Content-Type", "").startswith("text/event-stream")


def _seconds(value: float | None) -> str:
    return str(max(1, math.ceil(value))) if value else RETRY_AFTER_S
