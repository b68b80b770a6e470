"""A simulated OpenAI-compatible model server for tests, the demo and benchmarks.

It models time to first token (a base plus a cost per uncached prompt token, with a bounded
per-pod prefix cache), tokens per second, a cold start (`/health` and the API answer 503
until warm), the engine of `engine.py` (running sequences bounded by `max_num_seqs`, a
waiting queue, a KV cache in tokens), reported as the server named by `engine` reports it
(dialects.py: vLLM's `/metrics` by default, or SGLang's, llama.cpp's, TGI's, trtllm-serve's
or Triton's page and health answers), and injects faults on demand: an
error rate, the next N requests failing with a status, hanging before headers, dropping a
stream after N chunks. Everything is settable at start and at run time through
`POST /_control` (never proxied).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from aiohttp import web

from sidecar.tools.fakellm.dialects import DIALECTS, PAGES, Snapshot, trtllm_iteration_stats
from sidecar.tools.fakellm.engine import Engine, count_tokens

JSON = "application/json"

# A call's own account, kept on its request for the diagnostic headers.
ARRIVED = web.RequestKey("arrived", tuple[float, int, int])  # when, running, waiting
ADMITTED = web.RequestKey("admitted", float)                  # when it got a slot
UNCACHED = web.RequestKey("uncached", int)                    # prompt tokens prefilled


@dataclass
class Behaviour:
    """What the server does; every field can be changed at run time."""

    model: str = "fake-model"
    # Other names it answers to, comma-separated (vLLM's --served-model-name); "*" = any.
    # A request naming a model it does not serve gets vLLM's 404, so a mismatch is loud.
    serves: str = ""
    ttft_ms: float = 0.0                # time to first token with a fully cached prompt
    prefill_ms_per_token: float = 0.0   # extra first-token time per uncached prompt token
    tokens_per_s: float = 0.0           # 0 = as fast as possible
    max_tokens: int = 16                # default completion length
    cold_start_s: float = 0.0           # /health and the API answer 503 until this passes
    max_concurrency: int = 0            # 0 = unlimited; over it requests queue
    max_num_seqs: int = 0               # vLLM's name for the same limit (wins when set)
    prefix_cache_entries: int = 4096    # bounded per-pod prefix cache (cached messages)
    kv_cache_tokens: int = 0            # KV cache size in tokens; 0 = unbounded
    error_rate: float = 0.0             # fraction of requests answered with error_status
    error_status: int = 500
    fail_next: int = 0                  # the next N requests fail with fail_status
    fail_status: int = 503
    retry_after: str | None = None      # Retry-After on injected failures
    hang: bool = False                  # hold requests before sending headers
    drop_after_chunks: int = -1         # streams: break the connection after N chunks
    drop_next: int = 0                  # only the next N streams drop (0 = every stream)
    stall_after_chunks: int = -1        # streams: go silent after N chunks (until released)
    seed: int = 0
    # Whose metrics page and health answers to give (dialects.py): the pool's `engine` names.
    engine: str = "vllm"

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name: f.type for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown setting {key!r}; known: {sorted(names)}")
            if key == "engine" and value not in DIALECTS:
                raise ValueError(f"engine must be one of {list(DIALECTS)}, got {value!r}")
        for key, value in changes.items():
            setattr(self, key, value)


@dataclass
class Counters:
    requests: int = 0
    completed: int = 0
    injected_errors: int = 0
    dropped_streams: int = 0
    cancelled: int = 0
    inflight: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unknown_model: int = 0  # requests refused with 404: a model this server does not serve


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class FakeLLM:
    def __init__(self, behaviour: Behaviour, name: str = "") -> None:
        self.behaviour = behaviour
        self.name = name
        self.counters = Counters()
        self.started = time.monotonic()
        self.rng = random.Random(behaviour.seed)
        self.engine = Engine()
        self.last_request: dict[str, Any] | None = None
        self.last_headers: dict[str, str] = {}
        self.paths: dict[str, int] = {}
        self._released = asyncio.Event()  # set while `hang` is off
        if not behaviour.hang:
            self._released.set()

    # -- application ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/ready", self.health_ready)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/prometheus/metrics", self.metrics)
        app.router.add_get("/_control", self.get_control)
        app.router.add_post("/_control", self.set_control)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    @property
    def warm(self) -> bool:
        return time.monotonic() - self.started >= self.behaviour.cold_start_s

    async def health(self, request: web.Request) -> web.Response:
        self._probed(request)
        if self.behaviour.engine == "llamacpp":
            # llama.cpp's server answers 503 with this body while it loads the model
            # (tools/server/server-http.cpp); the sidecar's prober reads it as warming.
            if not self.warm:
                return self._json({"error": {"message": "Loading model", "type":
                                             "unavailable_error", "code": 503}}, status=503)
            return self._json({"status": "ok"})
        if not self.warm:
            return web.Response(status=503, text="warming up")
        if self.behaviour.engine in ("sglang", "tgi", "trtllm"):
            return web.Response()  # 200 with an empty body
        return web.Response(text="ok")

    async def health_ready(self, request: web.Request) -> web.Response:
        """Triton's OpenAI frontend: 400 until its engine is ready (observability.py)."""
        if self.behaviour.engine != "triton":
            return await self.echo(request)
        self._probed(request)
        if not self.warm:
            return self._json({"detail": "Attached inference engine is not ready for "
                               "inference requests."}, status=400)
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        """The engine's page under the dialect's names, at the dialect's path; trtllm-serve's
        `/metrics` is its iteration statistics in JSON (dialects.py names the sources)."""
        b = self.behaviour
        path, render = PAGES[b.engine]
        snapshot = Snapshot.of(self.engine, b.model, b.kv_cache_tokens,
                               b.max_num_seqs or b.max_concurrency)
        if request.path != path:
            if b.engine == "trtllm" and request.path == "/metrics":
                self._probed(request)
                return self._json(trtllm_iteration_stats(snapshot))
            return await self.echo(request)
        self._probed(request)
        return web.Response(text=render(snapshot), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def get_control(self, request: web.Request) -> web.Response:
        return self._json({"name": self.name, "behaviour": asdict(self.behaviour),
                           "counters": asdict(self.counters), "warm": self.warm,
                           "engine": {"running": self.engine.running,
                                      "waiting": self.engine.waiting,
                                      "prefix_cache_queries": self.engine.prefix_queries,
                                      "prefix_cache_hits": self.engine.prefix_hit_tokens,
                                      "cached_tokens": self.engine.cached_tokens},
                           "paths": self.paths, "last_request": self.last_request,
                           "last_headers": self.last_headers})

    async def set_control(self, request: web.Request) -> web.Response:
        changes = await request.json()
        reset = changes.pop("reset", False)
        restart = changes.pop("restart_cold", False)
        try:
            self.behaviour.update(changes)
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        if "hang" in changes:
            if self.behaviour.hang:
                self._released.clear()
            else:
                self._released.set()
        if "seed" in changes:
            self.rng.seed(self.behaviour.seed)
        if reset:
            self.counters = Counters()
            self.paths = {}
            self.engine.reset()
        if restart:
            self.started = time.monotonic()
        return await self.get_control(request)

    async def models(self, request: web.Request) -> web.Response:
        self._seen(request)
        return self._json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake-llm"}
            for name in self.served_models()]})

    def served_models(self) -> list[str]:
        extra = [n.strip() for n in self.behaviour.serves.split(",") if n.strip()]
        return [self.behaviour.model, *(n for n in extra if n != self.behaviour.model)]

    async def echo(self, request: web.Request) -> web.Response:
        """Any other path: describe the request, so forwarding can be checked exactly."""
        body = await request.read()
        self._seen(request)
        return self._json({"method": request.method, "path": request.path,
                           "raw_path": request.raw_path, "body_bytes": len(body),
                           "headers": {str(k): v for k, v in request.headers.items()}})

    # -- the OpenAI API ------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        tokens = 0
        for index, item in enumerate(items):
            text = str(item)
            tokens += count_tokens(text)
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            data.append({"object": "embedding", "index": index,
                         "embedding": [round(b / 255.0, 4) for b in digest]})
        self.counters.completed += 1
        return self._json({"object": "list", "data": data, "model": body.get("model"),
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _admit(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The request's body, or the answer it gets instead: an unreadable body, a model
        not served, or an injected fault (loading, failing, hanging)."""
        body = await self._parse(request)
        if isinstance(body, web.Response):
            return body
        failure = await self._fault()
        return failure if failure is not None else body

    async def _parse(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = await request.read()
        self._seen(request)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object", "invalid_request")
        self.last_request = body
        model = body.get("model")
        served = self.served_models()
        if model is not None and "*" not in served and model not in served:
            self.counters.unknown_model += 1
            # vLLM's OpenAI server's answer, byte for byte in shape.
            return self._json({"object": "error", "message": f"The model `{model}` does not "
                               "exist.", "type": "NotFoundError", "param": None, "code": 404},
                              status=404)
        return body

    def _probed(self, request: web.Request) -> None:
        """Monitoring requests count per path only (`requests` counts the API's)."""
        self.paths[request.path] = self.paths.get(request.path, 0) + 1

    def _seen(self, request: web.Request) -> None:
        self.counters.requests += 1
        self.paths[request.path] = self.paths.get(request.path, 0) + 1
        self.last_headers = {str(k): v for k, v in request.headers.items()}

    async def _fault(self) -> web.Response | None:
        b = self.behaviour
        if not self.warm:
            return self._error(503, "model is loading", "model_loading",
                               headers={"Retry-After": "1"})
        if b.fail_next > 0:
            b.fail_next -= 1
            return self._injected(b.fail_status)
        if b.error_rate > 0 and self.rng.random() < b.error_rate:
            return self._injected(b.error_status)
        if b.hang:
            await self._released.wait()
        return None

    def _injected(self, status: int) -> web.Response:
        self.counters.injected_errors += 1
        headers = {"Retry-After": self.behaviour.retry_after} if self.behaviour.retry_after \
            else None
        return self._error(status, f"injected failure ({status})", "injected", headers=headers)

    def _prompt(self, body: dict[str, Any], chat: bool) -> tuple[list[str], int]:
        """The prompt as cache-able segments (one per message) and its token count."""
        if chat:
            messages = body.get("messages") or []
            segments = [_message_text(m) for m in messages] if isinstance(messages, list) else []
        else:
            prompt = body.get("prompt", "")
            segments = [p if isinstance(p, str) else str(p)
                        for p in (prompt if isinstance(prompt, list) else [prompt])]
        return segments, sum(count_tokens(s) for s in segments)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self._admit(request)
        if isinstance(body, web.Response):
            return body
        b = self.behaviour
        segments, prompt_tokens = self._prompt(body, chat)
        tokens = self._completion_tokens(body, segments)
        self.counters.inflight += 1
        # Where a call's first-token time went, for a benchmark to attribute its tail.
        request[ARRIVED] = (time.monotonic(), self.engine.running, self.engine.waiting)
        try:
            async with self.engine.sequence(prompt_tokens + len(tokens),
                                            b.max_num_seqs or b.max_concurrency,
                                            b.kv_cache_tokens):
                return await self._answer(request, body, chat, segments, prompt_tokens, tokens)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            raise
        finally:
            self.counters.inflight -= 1

    def _completion_tokens(self, body: dict[str, Any], segments: list[str]) -> list[str]:
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or \
            self.behaviour.max_tokens
        n = max(1, min(int(limit), 100_000))
        start = 0
        messages = body.get("messages")
        if body.get("continue_final_message") and isinstance(messages, list) and messages \
                and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            # vLLM's continuation: go on from the partial answer (its tokens are whole words).
            start = len(_message_text(messages[-1]).split())
            segments = segments[:-1]
        # Deterministic text: the same prompt gets the same answer on every pod.
        seed = hashlib.blake2b("\x00".join(segments).encode(), digest_size=4).hexdigest()
        return [f"tok{i}-{seed} " if i == 0 else f"tok{i} " for i in range(start, start + n)]

    async def _answer(self, request: web.Request, body: dict[str, Any], chat: bool,
                      segments: list[str], prompt_tokens: int, tokens: list[str]
                      ) -> web.StreamResponse:
        b = self.behaviour
        engine = self.engine
        request[ADMITTED] = time.monotonic()
        hits_before = engine.prefix_hits
        uncached = engine.lookup(segments, b.prefix_cache_entries, b.kv_cache_tokens)
        request[UNCACHED] = uncached
        self.counters.prefix_hits += engine.prefix_hits - hits_before
        engine.prompt_tokens += prompt_tokens
        engine.generation_tokens += len(tokens)
        first_token_s = (b.ttft_ms + b.prefill_ms_per_token * uncached) / 1000.0
        if first_token_s > 0:
            await asyncio.sleep(first_token_s)
        model = body.get("model", b.model)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        self.counters.prompt_tokens += prompt_tokens
        self.counters.completion_tokens += len(tokens)
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.counters.requests}"
        if not body.get("stream"):
            if b.tokens_per_s > 0:
                await asyncio.sleep(len(tokens) / b.tokens_per_s)
            text = "".join(tokens)
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "length", "logprobs": None} if chat else
                {"index": 0, "text": text, "finish_reason": "length", "logprobs": None})
            self.counters.completed += 1
            engine.successes += 1
            return self._json({"id": rid, "object": "chat.completion" if chat else
                               "text_completion", "created": created, "model": model,
                               "choices": [choice], "usage": usage})
        return await self._stream(request, body, chat, tokens, rid, created, model, usage)

    def _diagnosis(self, request: web.Request) -> dict[str, str]:
        """The pod's account of a call: the queue it met on arrival (running, waiting), the
        seconds it waited for a slot, the prompt tokens it prefilled uncached."""
        arrived = request.get(ARRIVED)
        if arrived is None:
            return {}
        at, running, waiting = arrived
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return {"x-fake-pod": str(sockname[1]) if sockname else "",
                "x-fake-arrival": f"{running} {waiting}",
                "x-fake-queued-ms": f"{(request[ADMITTED] - at) * 1000:.1f}",
                "x-fake-uncached-tokens": str(request.get(UNCACHED, 0))}

    async def _stream(self, request: web.Request, body: dict[str, Any], chat: bool,
                      tokens: list[str], rid: str, created: int, model: str,
                      usage: dict[str, int]) -> web.StreamResponse:
        b = self.behaviour
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache",
                                               **self._diagnosis(request)})
        response.enable_chunked_encoding()
        await response.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        delay = 1.0 / b.tokens_per_s if b.tokens_per_s > 0 else 0.0
        drop_at = b.drop_after_chunks
        if drop_at >= 0 and b.drop_next > 0:
            b.drop_next -= 1
            if b.drop_next == 0:
                b.drop_after_chunks = -1

        def frame(choice: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> bytes:
            chunk: dict[str, Any] = {"id": rid, "object": obj, "created": created,
                                     "model": model, "choices": [choice] if choice else []}
            if extra:
                chunk.update(extra)
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        frames_sent = 0
        if chat:
            await response.write(frame({"index": 0, "delta": {"role": "assistant",
                                                              "content": ""},
                                        "finish_reason": None, "logprobs": None}))
            frames_sent += 1
        for token in tokens:
            if frames_sent == b.stall_after_chunks:
                await asyncio.Event().wait()  # silent until the client gives up
            if frames_sent == drop_at:
                self.counters.dropped_streams += 1
                # Abort without the terminating chunk: the client sees a broken stream.
                if request.transport is not None:
                    request.transport.abort()
                return response
            if delay:
                await asyncio.sleep(delay)
            choice = ({"index": 0, "delta": {"content": token}, "finish_reason": None,
                       "logprobs": None} if chat else
                      {"index": 0, "text": token, "finish_reason": None, "logprobs": None})
            await response.write(frame(choice))
            frames_sent += 1
        final = ({"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
                 if chat else {"index": 0, "text": "", "finish_reason": "length",
                               "logprobs": None})
        # Usage rides on the final chunk (as vLLM does with continuous usage stats) and, when
        # asked for with stream_options.include_usage, also in its own usage-only chunk.
        await response.write(frame(final, {"usage": usage}))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            await response.write(frame(None, {"usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.counters.completed += 1
        self.engine.successes += 1
        return response

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None
              ) -> web.Response:
        return web.Response(body=orjson.dumps(data), status=status, content_type=JSON,
                            headers=headers)

    def _error(self, status: int, message: str, code: str,
               headers: dict[str, str] | None = None) -> web.Response:
        return self._json({"error": {"message": message, "type": "fake_llm_error",
                                     "code": code}}, status=status, headers=headers)


async def start_fake_llm(behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0,
                         name: str = "") -> tuple[web.AppRunner, FakeLLM, int]:
    """Start one fake pod on the running loop; returns its runner, state and bound port."""
    fake = FakeLLM(behaviour, name)
    runner = web.AppRunner(fake.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, fake, bound
