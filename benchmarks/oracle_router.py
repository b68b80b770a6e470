"""A reference for `routing.py`: one central router that knows every pod's queue and prefix
cache exactly, because it sends every call and models the simulated engine.

    python benchmarks/oracle_router.py LISTEN_PORT POD_PORT [POD_PORT ...]

Each call goes to the pod where its first token is expected soonest: the wait for a slot
(the calls in flight there replayed first come, first served over `SLOTS` slots, each
lasting its prefill plus its decode) plus the prefill of the prompt tokens that pod has not
cached (a mirror of the engine's prefix cache, fed with every call sent there). It sees
the present perfectly and the future not at all: a greedy router with perfect information,
which shows what better information could give an online router on these loads. It is
not a bound (`routing.py`'s floor is one): a router that knew the calls still to come
could do better. Not a product: no sessions, no failover, no limits. The engine's numbers
are `routing.py`'s ENGINE.
"""

from __future__ import annotations

import heapq
import itertools
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web

from sidecar.tools.fakellm.engine import Engine

SLOTS = 8                 # --max-num-seqs
KV_TOKENS = 60_000        # --kv-cache-tokens
PREFIX_ENTRIES = 1_000_000
FIXED_S = 0.020           # --ttft-ms
PREFILL_S = 0.0001        # --prefill-ms-per-token, in seconds
TOKEN_S = 0.010           # 1 / --tokens-per-s


@dataclass
class Call:
    order: int
    start: float            # expected (then, once its first token came, known) start
    service: float          # expected seconds from start to its last token
    first_token: float | None = None

    @property
    def end(self) -> float:
        return self.start + self.service


@dataclass
class Pod:
    url: str
    cache: Engine = field(default_factory=Engine)
    calls: dict[int, Call] = field(default_factory=dict)

    def slot_at(self, now: float) -> float:
        """When one more call sent now would get a slot: the calls in flight replayed first
        come, first served (the engine's order) over the pod's slots."""
        free = [now] * SLOTS
        for call in sorted(self.calls.values(), key=lambda c: c.order):
            if call.first_token is not None:  # running: its slot frees at its end
                heapq.heapreplace(free, max(free[0], call.end))
            else:
                start = max(heapq.heappop(free), now)
                heapq.heappush(free, start + call.service)
        return max(free[0], now)


class Oracle:
    def __init__(self, pods: list[str]) -> None:
        self.pods = [Pod(url) for url in pods]
        self.order = itertools.count()
        self.http: aiohttp.ClientSession | None = None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = orjson.loads(raw)
        segments = [str(m.get("content", "")) for m in body.get("messages", [])]
        decode = TOKEN_S * max(0, int(body.get("max_tokens", 16)) - 1)
        now = time.monotonic()
        best: tuple[float, int, Pod, float, float] | None = None
        for pod in self.pods:
            prefill = FIXED_S + PREFILL_S * pod.cache.uncached(segments)
            start = pod.slot_at(now)
            candidate = (start + prefill, len(pod.calls), pod, start, prefill)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        assert best is not None
        _, _, pod, start, prefill = best
        pod.cache.lookup(segments, PREFIX_ENTRIES, KV_TOKENS)
        call = Call(next(self.order), start, prefill + decode)
        pod.calls[call.order] = call
        assert self.http is not None
        try:
            async with self.http.post(pod.url + request.path, data=raw,
                                      headers={"content-type": "application/json"}) as up:
                response = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items()
                    if k.lower().startswith(("content-type", "x-fake"))})
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    if call.first_token is None and b'"content":"tok' in chunk:
                        call.first_token = time.monotonic()
                        call.start, call.service = call.first_token - prefill, prefill + decode
                    await response.write(chunk)
                await response.write_eof()
                return response
        finally:
            del pod.calls[call.order]

    async def start(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                          timeout=aiohttp.ClientTimeout(total=300))

    async def stop(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> int:
    listen, *pods = (int(a) for a in sys.argv[1:])
    oracle = Oracle([f"http://127.0.0.1:{p}" for p in pods])
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", oracle.chat)
    app.router.add_get("/health", health)
    app.on_startup.append(oracle.start)
    app.on_cleanup.append(oracle.stop)
    web.run_app(app, host="127.0.0.1", port=listen, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
