"""Safe defaults: Redis over TLS, loud non-loopback listeners, header-safe values, slow
clients, and SIGHUP to a real process under load."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import ConfigError, load_settings
from sidecar.routing.store import route_key
from tests.conftest import CHAT, chat, pool
from tests.support.redis_server import TlsRedis, self_signed_certificate


async def test_redis_over_tls_verifies_the_server_against_the_named_ca(pods, sidecar, http,
                                                                       tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server = TlsRedis(cert, key).start()
    try:
        [pod] = await pods(1)
        trusted = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=server.url,
                                SIDECAR_REDIS_CA_FILE=str(cert),
                                SIDECAR_REDIS_TIMEOUT_MS="1000")
        assert (await chat(http, trusted, "tls"))[0] == 200
        assert trusted.sidecar.store.available
        assert trusted.sidecar.store.counters.created == 1
        assert server.client().exists(route_key("tls")) == 1, "the route went over TLS"
        # Without the CA the server's certificate is refused; without TLS the server
        # does not answer: either way calls still route, and nothing reaches Redis.
        for url in (server.url, server.url.replace("rediss://", "redis://")):
            refused = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=url,
                                    SIDECAR_REDIS_TIMEOUT_MS="1000")
            assert (await chat(http, refused, "untrusted"))[0] == 200
            assert not refused.sidecar.store.available
        assert server.client().exists(route_key("untrusted")) == 0
    finally:
        server.cleanup()


def test_a_redis_ca_file_needs_a_readable_file_and_a_tls_url(tmp_path):
    pools = json.dumps({"small": {"model": "m", "endpoints": ["http://127.0.0.1:9"]}})
    with pytest.raises(ConfigError) as missing:
        load_settings({"SIDECAR_POOLS": pools, "SIDECAR_REDIS_URL": "rediss://127.0.0.1:1",
                       "SIDECAR_REDIS_CA_FILE": str(tmp_path / "nope.pem")})
    assert "SIDECAR_REDIS_CA_FILE" in missing.value.problems[0]
    assert "PEM" in missing.value.problems[0]
    ca = tmp_path / "ca.pem"
    ca.write_text("-")
    with pytest.raises(ConfigError) as plain:
        load_settings({"SIDECAR_POOLS": pools, "SIDECAR_REDIS_URL": "redis://127.0.0.1:1",
                       "SIDECAR_REDIS_CA_FILE": str(ca)})
    assert "rediss://" in plain.value.problems[0]


async def test_a_listener_off_loopback_is_announced_loudly(pods, sidecar_process):
    [pod] = await pods(1)
    process = sidecar_process({"SIDECAR_POOLS": json.dumps({"small": pool([pod])})})
    process.env["SIDECAR_ADMIN_LISTEN"] = f"0.0.0.0:{process.admin_port}"
    await process.start()
    process.process.terminate()
    await process.wait()
    assert "is NOT loopback" in process.output()


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000\r\nX-Injected: 1",
                                 "http://10.0.0.5:8000\n", "http://10.0.0.5 :8000"])
def test_endpoint_urls_cannot_carry_header_injection(url):
    with pytest.raises(ConfigError) as refused:
        load_settings({"SIDECAR_POOLS": json.dumps({"small": {"model": "m",
                                                              "endpoints": [url]}})})
    assert "is not a base URL" in refused.value.problems[0]


async def test_slow_clients_do_not_hold_up_others(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    writers = []
    for _ in range(50):  # slowloris: headers that never finish
        _, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        writers.append(writer)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(chat(http, running, f"fast-{i}") for i in range(20)))
        assert {status for status, _, _ in results} == {200}
        assert time.monotonic() - started < 10
    finally:
        for writer in writers:
            writer.close()


async def test_sighup_under_load_drops_nothing(pods, sidecar_process, tmp_path):
    a, b = await pods(2, ttft_ms=5)
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"small": pool([a, b])}))
    process = await sidecar_process({"SIDECAR_POOLS_FILE": str(path)}).start()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        async with aiohttp.ClientSession() as client:
            n = 0
            while not stop.is_set():
                async with client.post(process.base + "/v1/chat/completions", json=CHAT,
                                       headers={"x-session-id": f"hup-{worker}-{n % 5}"}) as r:
                    await r.read()
                    statuses.append(r.status)
                n += 1

    workers = [asyncio.create_task(load(i)) for i in range(6)]
    await asyncio.sleep(0.3)
    for endpoints in ([a], [a, b], [b], [a, b]):
        path.write_text(json.dumps({"small": pool(endpoints)}))
        process.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 50 and set(statuses) == {200}


async def test_upstream_cookies_are_passed_on_but_never_kept(sidecar, http):
    """A shared client must not keep an upstream's Set-Cookie and send it with the next
    call, which may be another session's (or another app user's)."""
    seen: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"choices": []})
        response.set_cookie("upstream-affinity", "pod-1")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    # A host name, not an IP: cookie jars keep no cookies of IP hosts.
    url = f"http://localhost:{site._server.sockets[0].getsockname()[1]}"
    try:
        running = await sidecar({"small": {"model": "m", "endpoints": [url]}})
        async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions",
                             json={"model": "m", "messages": []},
                             headers={"x-session-id": "alice"}) as first:
            assert "upstream-affinity=pod-1" in first.headers.get("Set-Cookie", "")
        http.cookie_jar.clear()  # the test's own client keeps cookies; the app may not
        async with http.post(f"http://127.0.0.1:{running.port}/v1/chat/completions",
                             json={"model": "m", "messages": []},
                             headers={"x-session-id": "bob"}) as second:
            assert second.status == 200
        assert seen == [None, None], "the sidecar sent an upstream's cookie back"
    finally:
        await runner.cleanup()
