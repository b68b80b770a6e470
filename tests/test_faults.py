"""Fault matrix (part of it): each row asserts that every request got a complete answer or
a clear error, none hung, and nothing leaked (in-flight counts, acquired upstream
connections and asyncio tasks back where they were)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar import admin
from tests.conftest import CHAT, base, chat, pool
from tests.support.redis_server import RedisServer, self_signed_certificate


def _request_tasks(before: set[asyncio.Task]) -> list[asyncio.Task]:
    """Tasks started since `before` that are still pending, except aiohttp's per-connection
    handlers (one per open keep-alive connection: not a leak while the connection lives)."""
    connection_handlers = ("RequestHandler.start", "RawUpstream._serve")
    return [t for t in asyncio.all_tasks() - before if not t.done()
            and t.get_coro().__qualname__ not in connection_handlers]


@contextlib.asynccontextmanager
async def no_leaks(running) -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    sidecar = running.sidecar
    for _ in range(100):
        settled = (sidecar.proxy.counters.inflight == 0
                   and all(e.inflight == 0 for e in sidecar.pools.all_endpoints())
                   and sidecar.upstream.in_use() == 0)
        if settled and not _request_tasks(before):
            return
        await asyncio.sleep(0.02)
    assert sidecar.proxy.counters.inflight == 0, "requests still in flight"
    assert all(e.inflight == 0 for e in sidecar.pools.all_endpoints())
    assert sidecar.upstream.in_use() == 0, "upstream connections still leased"
    assert not _request_tasks(before), "tasks leaked"


class RawUpstream:
    """A TCP server that answers every request with fixed bytes (garbage included)."""

    def __init__(self, reply: Callable[[int], bytes], close_after: bool = False,
                 trickle_s: float = 0.0) -> None:
        self.reply = reply
        self.close_after = close_after
        self.trickle_s = trickle_s  # > 0: one byte at a time, this far apart
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                reply = self.reply(self.requests)
                if self.trickle_s:
                    for i in range(len(reply)):
                        writer.write(reply[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(self.trickle_s)
                else:
                    writer.write(reply)
                    await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream():
    made: list[RawUpstream] = []

    async def make(reply: Callable[[int], bytes], close_after: bool = False,
                   trickle_s: float = 0.0) -> str:
        upstream = RawUpstream(reply, close_after, trickle_s)
        made.append(upstream)
        return await upstream.start()

    yield make
    for upstream in made:
        await upstream.stop()


OK_JSON = b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'


def http_response(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


async def test_upstream_hanging_mid_stream_ends_visibly_instead_of_hanging(pods, sidecar, http):
    [pod] = await pods(1, stall_after_chunks=3, max_tokens=10)
    running = await sidecar({"small": pool([pod])}, SIDECAR_STREAM_IDLE_TIMEOUT_S="0.5")
    async with no_leaks(running):
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(base(running) + "/v1/chat/completions",
                                 json={**CHAT, "stream": True},
                                 timeout=aiohttp.ClientTimeout(total=10)) as r:
                async for piece in r.content.iter_any():
                    received += piece
        assert b"upstream_broken_mid_stream" in received and b"[DONE]" not in received


async def test_an_upstream_answering_byte_by_byte_gets_an_answer_or_a_clear_timeout(
        raw_upstream, pods, sidecar, http):
    """1 byte/s, scaled to 1 byte per 20 ms: slow is not dead. Within the deadline the
    answer arrives whole; past it the app gets a clear 504 and no other pod is asked."""
    reply = http_response(b'{"ok":1}')  # ~80 bytes: ~1.7 s at this pace
    slow = await raw_upstream(lambda n: reply, trickle_s=0.02)
    patient = await sidecar({"small": {"model": "m", "endpoints": [slow]}},
                            SIDECAR_RESPONSE_TIMEOUT_S="10", SIDECAR_FIRST_BYTE_TIMEOUT_S="0.3")
    async with no_leaks(patient):
        async with http.post(base(patient) + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and await r.read() == b'{"ok":1}'
    [healthy] = await pods(1)
    hasty = await sidecar({"small": {"model": "m", "endpoints": [slow, healthy.url]}},
                          SIDECAR_RESPONSE_TIMEOUT_S="0.3")
    async with no_leaks(hasty):
        statuses = []
        # A session on the slow pod times out there, and only there; 16 sessions put some on
        # the healthy pod whatever the ports (all 16 on one pod: 1 run in 65,536).
        for i in range(16):
            status, headers, body = await chat(http, hasty, f"trickle-{i}")
            statuses.append(status)
            assert headers["x-sidecar-attempts"] == "1"
            if status == 504:
                assert body["error"]["tried"][0] == {"endpoint": slow, "pool": "small",
                                                     "outcome": "first_byte_timeout"}
        assert set(statuses) <= {200, 504} and 200 in statuses
        assert healthy.requests == statuses.count(200)


async def test_upstream_answering_garbage_fails_over(raw_upstream, pods, sidecar, http):
    garbage = await raw_upstream(lambda n: b"this is not HTTP at all\r\n\r\n", close_after=True)
    [good] = await pods(1)
    running = await sidecar({"small": {"model": "m", "endpoints": [garbage, good.url]}})
    async with no_leaks(running):
        results = await asyncio.gather(*(chat(http, running, f"garbage-{i}")
                                         for i in range(10)))
        assert {status for status, _, _ in results} == {200}
        assert {h["x-sidecar-endpoint"] for _, h, _ in results} == {good.url}


async def test_upstream_with_broken_chunked_encoding_is_a_502_never_retried(
        raw_upstream, pods, sidecar, http):
    """A valid head, then a body that is no chunked coding: the pod answered, malformed.
    The app gets 502 and no other pod is asked to do the work again."""
    broken = await raw_upstream(lambda n: (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n"), close_after=True)
    [good] = await pods(1)
    running = await sidecar({"small": {"model": "m", "endpoints": [broken, good.url]}})
    ranked = running.sidecar.pools.pools["small"].ranked
    on_broken = next(s for s in (f"chunk-{i}" for i in range(200))
                     if ranked(s.encode())[0].url == broken)
    async with no_leaks(running):
        first = await chat(http, running, on_broken)
        results = [first, *await asyncio.gather(*(chat(http, running, f"chunk-{i}")
                                                  for i in range(10)))]
    assert first[0] == 502 and first[2]["error"]["code"] == "upstream_error"
    assert {status for status, _, _ in results} <= {200, 502}
    assert all(h["x-sidecar-attempts"] == "1" for _, h, _ in results)
    assert good.requests == sum(status == 200 for status, _, _ in results)


async def test_invalid_sse_is_passed_through_untouched(raw_upstream, sidecar, http):
    body = b"data: {not json\n\ndata: also not json\n\ndata: [DONE]\n\n"
    odd = await raw_upstream(lambda n: (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body))
    running = await sidecar({"small": {"model": "m", "endpoints": [odd]}})
    async with no_leaks(running), http.post(base(running) + "/v1/chat/completions",
                                            json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        assert await r.read() == body


async def test_a_5xx_other_than_503_is_the_pods_answer_passed_through_without_a_retry(
        pods, sidecar, http):
    a, b = await pods(2, fail_next=100, fail_status=502)
    running = await sidecar({"small": pool([a, b])}, SIDECAR_MAX_ATTEMPTS="2")
    async with no_leaks(running):
        status, headers, body = await chat(http, running, "five-oh-two")
    assert status == 502 and headers["x-sidecar-attempts"] == "1"
    assert body["error"]["code"] == "injected"
    assert a.requests + b.requests == 1


async def test_keep_alive_connections_closed_by_the_server_are_not_errors(raw_upstream,
                                                                          sidecar, http):
    # The server closes every connection after answering, without saying so: the next
    # reuse of a pooled connection may meet a closed socket.
    closer = await raw_upstream(lambda n: http_response(OK_JSON), close_after=True)
    running = await sidecar({"small": {"model": "m", "endpoints": [closer]}})
    async with no_leaks(running):
        for i in range(30):
            status, _, body = await chat(http, running, "keepalive")
            assert status == 200, (i, body)
            await asyncio.sleep(0.005 * (i % 3))
    [endpoint] = running.sidecar.pools.all_endpoints()
    assert endpoint.state.value == "ready", "a closed keep-alive connection ejects nobody"


async def test_client_disconnecting_mid_request_body_leaks_nothing(pods, sidecar):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    async with no_leaks(running):
        _, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.sleep(0.1)
    assert pod.requests == 0


async def test_pipelined_requests_are_answered_in_order(pods, sidecar):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    body = json.dumps(CHAT).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
           b"\r\nx-session-id: pipe\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
           + body)
    async with no_leaks(running):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(one * 3)
        await writer.drain()
        received = b""
        while received.count(b"HTTP/1.1 200 OK") < 3:
            received += await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
    assert pod.requests == 3


async def test_oversized_headers_are_refused_clearly(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    async with http.post(base(running) + "/v1/chat/completions", json=CHAT,
                         headers={"x-big": "a" * 20000}) as r:
        assert r.status in (400, 431)
    assert pod.requests == 0


@pytest.mark.parametrize("args", [("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")])
async def test_redis_full_keeps_requests_flowing(pods, sidecar, http, args):
    server = RedisServer(args=args).start()
    try:
        client = server.client()
        with contextlib.suppress(Exception):
            for i in range(10_000):
                client.set(f"filler:{i}", "x" * 1000)
        [pod] = await pods(1)
        running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=server.url)
        async with no_leaks(running):
            results = [await chat(http, running, f"full-{i}") for i in range(5)]
        assert {status for status, _, _ in results} == {200}
        store = running.sidecar.store
        # Refused at start (the store's probe writes) or by the first touches: either way
        # the store is not used and no route was stored.
        assert not store.available and store.counters.created == 0
        assert store.counters.errors + store.counters.skipped >= 5
    finally:
        server.cleanup()


async def test_a_read_only_replica_keeps_requests_flowing(pods, sidecar, http, redis_server):
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(redis_server.port))).start()
    try:
        [pod] = await pods(1)
        running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=replica.url)
        async with no_leaks(running):
            results = [await chat(http, running, f"ro-{i}") for i in range(5)]
        assert {status for status, _, _ in results} == {200}
        store = running.sidecar.store
        assert not store.available  # a replica refuses the probe's write: never "back"
        assert store.counters.errors + store.counters.skipped >= 5
    finally:
        replica.cleanup()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


async def test_upstream_tls_is_verified_and_a_private_ca_can_be_named(tls_files, sidecar, http):
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    try:
        untrusted = await sidecar({"small": {"model": "m", "endpoints": [url]}})
        status, _, body = await chat(http, untrusted, "tls")
        assert status == 503, "a certificate nobody vouches for is refused"
        assert body["error"]["tried"][0]["outcome"] == "connect_error"
        trusted = await sidecar({"small": {"model": "m", "endpoints": [url]}},
                                SIDECAR_UPSTREAM_CA_FILE=str(cert))
        status, _, _ = await chat(http, trusted, "tls")
        assert status == 200
    finally:
        await runner.cleanup()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


async def test_the_admin_listener_answers_while_the_proxy_loop_is_blocked(pods, sidecar,
                                                                         monkeypatch):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    admin_url = f"http://127.0.0.1:{running.admin_port}"
    monkeypatch.setattr(admin, "STALL_LIMIT_S", 0.3)
    monkeypatch.setattr(admin, "PROXY_LOOP_WAIT_S", 0.2)
    seen: dict[str, tuple[int, dict]] = {}
    probed = threading.Event()

    def probe() -> None:
        try:
            seen["busy"] = _get(admin_url + "/health")
            time.sleep(0.5)  # past the (lowered) stall limit
            seen["stalled"] = _get(admin_url + "/health")
            seen["ready"] = _get(admin_url + "/ready")
        finally:
            probed.set()

    await asyncio.sleep(0.3)  # the heartbeat is ticking
    threading.Thread(target=probe, daemon=True).start()
    # Block the proxy's loop (this test's loop) until the probes are answered: with the
    # admin listener on this loop they could not be, and the wait would run out.
    assert probed.wait(10), "the admin listener did not answer while the proxy loop was busy"
    assert seen["busy"][0] == 200 and seen["busy"][1]["status"] == "alive"
    status, body = seen["stalled"]
    assert status == 503 and body["status"] == "stalled", "a stalled loop fails liveness"
    assert body["proxy_loop_stalled_s"] >= 0.3
    assert seen["ready"][0] == 503 and "did not answer" in seen["ready"][1]["reasons"][0]
    await asyncio.sleep(0.3)  # the loop turns again
    status, body = await asyncio.to_thread(_get, admin_url + "/health")
    assert status == 200 and body["status"] == "alive"
    assert (await asyncio.to_thread(_get, admin_url + "/ready"))[0] == 200
