"""SPEC section 9, one test per row: each bad input or fault gets its documented answer."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import pytest

from tests.conftest import CHAT, admin, base, chat, dead_url, pool


async def test_body_over_limit_is_413_and_upstream_not_called(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_MAX_BODY_BYTES="1000")
    async with http.post(base(running) + "/v1/chat/completions", data=b"x" * 1001,
                         headers={"x-session-id": "big"}) as r:
        assert r.status == 413
        body = await r.json()
    assert body["error"]["code"] == "body_too_large"
    assert "SIDECAR_MAX_BODY_BYTES" in body["error"]["message"]

    async def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(11):
            yield b"y" * 100

    async with http.post(base(running) + "/v1/chat/completions", data=chunked(),
                         headers={"x-session-id": "big"}) as r:
        assert r.status == 413
    assert pod.requests == 0
    # A body at the limit goes through.
    async with http.post(base(running) + "/x", data=b"x" * 1000) as r:
        assert r.status == 200


@pytest.mark.parametrize("value", ["", "x" * 257, "tab\there", "ünïcode"])
async def test_invalid_session_id_is_400_naming_the_header(pods, sidecar, http, value):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    async with http.post(base(running) + "/v1/chat/completions", json=CHAT,
                         headers={"x-session-id": value.encode().decode("latin-1")}) as r:
        assert r.status == 400
        body = await r.json()
    assert "x-session-id" in body["error"]["message"]
    assert body["error"]["code"] == "invalid_session_id"
    assert pod.requests == 0


@pytest.mark.parametrize("value", ["16", "-1", "abc", "1.5", "", "\u00b2"])
async def test_invalid_selector_is_400_naming_the_header(pods, sidecar, http, value):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    status, _, body = await chat(http, running, "sel", **{"x-sidecar-selector": value})
    assert status == 400
    assert "x-sidecar-selector" in body["error"]["message"]
    assert pod.requests == 0


async def test_body_that_is_not_json_is_forwarded_untouched(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    async with http.post(base(running) + "/v1/chat/completions", data=b"{not json",
                         headers={"x-session-id": "nj"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "invalid_json"
    assert pod.requests == 1


async def test_all_endpoints_down_is_503_with_retry_after(sidecar, http):
    running = await sidecar({"small": {"model": "m", "endpoints": [dead_url()]}})
    status, headers, body = await chat(http, running, "down")
    assert status == 503 and "Retry-After" in headers
    assert body["error"]["tried"][0]["outcome"] == "connect_error"


async def test_upstream_breaking_mid_stream_ends_with_a_visible_error(pods, sidecar, http):
    [pod] = await pods(1, drop_after_chunks=4, max_tokens=10)
    running = await sidecar({"small": pool([pod])})
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(base(running) + "/v1/chat/completions",
                             json={**CHAT, "stream": True},
                             headers={"x-session-id": "mid"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += chunk
    events = [e for e in received.split(b"\n\n") if e]
    assert b"[DONE]" not in received, "a broken stream must never look complete"
    error = json.loads(events[-1].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_broken_mid_stream"
    assert running.sidecar.proxy.counters.broken_streams == 1
    [endpoint] = running.sidecar.pools.all_endpoints()
    assert endpoint.outlier.consecutive_failures == 1


async def test_openai_sdk_raises_on_a_broken_stream(pods, sidecar):
    import openai

    [pod] = await pods(1, drop_after_chunks=3, max_tokens=10)
    running = await sidecar({"small": pool([pod])})
    client = openai.AsyncOpenAI(base_url=base(running) + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        await client.close()


async def test_client_disconnect_cancels_the_upstream_and_leaks_nothing(pods, sidecar):
    [pod] = await pods(1, tokens_per_s=20, max_tokens=200)
    running = await sidecar({"small": pool([pod])})
    tasks_before = len(asyncio.all_tasks())
    async with aiohttp.ClientSession() as client:
        async with client.post(base(running) + "/v1/chat/completions",
                               json={**CHAT, "stream": True},
                               headers={"x-session-id": "gone"}) as r:
            await r.content.readline()
            assert pod.fake.counters.inflight == 1
    # The client went away: the upstream call is cancelled, not left generating.
    for _ in range(100):
        if pod.fake.counters.cancelled == 1 and pod.fake.counters.inflight == 0:
            break
        await asyncio.sleep(0.02)
    assert pod.fake.counters.cancelled == 1
    assert pod.fake.counters.inflight == 0
    assert running.sidecar.proxy.counters.inflight == 0
    assert all(e.inflight == 0 for e in running.sidecar.pools.all_endpoints())
    await asyncio.sleep(0.05)
    assert len(asyncio.all_tasks()) <= tasks_before
    assert running.sidecar.upstream.in_use() == 0


async def test_client_disconnect_while_waiting_for_first_byte_cancels_upstream(pods, sidecar):
    [pod] = await pods(1, ttft_ms=2000)
    running = await sidecar({"small": pool([pod])})
    async with aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            async with client.post(base(running) + "/v1/chat/completions", json=CHAT,
                                   timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
    for _ in range(100):
        if pod.fake.counters.cancelled == 1:
            break
        await asyncio.sleep(0.02)
    assert pod.fake.counters.cancelled == 1
    assert running.sidecar.proxy.counters.inflight == 0
    assert running.sidecar.proxy.counters.client_disconnects == 1


async def test_sigterm_finishes_in_flight_streams_then_exits_0(pods, sidecar_process):
    [pod] = await pods(1, tokens_per_s=20, max_tokens=20)  # a 1 s stream
    process = await sidecar_process({"SIDECAR_POOLS": json.dumps({"small": pool([pod])}),
                                     "SIDECAR_DRAIN_TIMEOUT_S": "10"}).start()
    async with aiohttp.ClientSession() as client:
        async with client.post(process.base + "/v1/chat/completions",
                               json={**CHAT, "stream": True}) as r:
            await r.content.readline()
            process.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            # Draining: not ready, and new connections are refused.
            async with client.get(process.admin + "/ready") as ready:
                assert ready.status == 503
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as fresh:
                    await fresh.post(process.base + "/v1/chat/completions", json=CHAT)
            rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]"), "the in-flight stream finished whole"
    assert await process.wait() == 0


async def test_bad_configuration_refuses_start_naming_every_problem(sidecar_process):
    process = sidecar_process({"SIDECAR_POOLS": '{"small": {"endpoints": ["ftp://x"]}}',
                               "SIDECAR_MAX_ATTEMPTS": "zero",
                               "SIDECAR_LOAD_LEVEL": "extreme"})
    with pytest.raises(RuntimeError) as failed:
        await process.start()
    output = str(failed.value)
    assert process.process.returncode == 2
    for expected in ('"model" must be a non-empty string', "ftp://x",
                     "SIDECAR_MAX_ATTEMPTS='zero'", "SIDECAR_LOAD_LEVEL='extreme'"):
        assert expected in output


async def test_admin_ready_reflects_endpoints(sidecar, http):
    running = await sidecar({"small": {"model": "m", "endpoints": [dead_url()],
                                       "health_path": "/health", "health_interval_s": 0.1}})
    async with http.get(admin(running) + "/ready") as r:
        assert r.status == 503
        assert "no pool has a ready endpoint" in (await r.json())["reasons"][0]
