"""What a call pays, measured by the relay: time to first token, inter-token gaps and
tokens per second per pool and model, and the sidecar's own time in x-sidecar-overhead-ms."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import CHAT, admin, base, chat, pool
from tests.support.raw_http import Message, post
from tests.support.raw_peers import Conn, exchange, proxied, upstream_factory


def _series(text: str, name: str, suffix: str) -> dict[str, float]:
    """{labels: value} of one Prometheus series family member (e.g. _count)."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + suffix + "{"):
            labels, value = line[len(name + suffix):].rsplit(" ", 1)
            found[labels] = float(value)
    return found


async def test_stream_reports_ttft_inter_token_latency_and_tokens_per_second(pods, sidecar,
                                                                            http):
    [pod] = await pods(1, ttft_ms=80, tokens_per_s=100, max_tokens=10)
    running = await sidecar({"small": pool([pod])})
    async with http.post(base(running) + "/v1/chat/completions",
                         json={**CHAT, "stream": True}, headers={"x-session-id": "t"}) as r:
        assert r.status == 200
        await r.read()
    async with http.get(admin(running) + "/metrics") as r:
        text = await r.text()
    labels = '{pool="small",model="small-model"}'
    assert _series(text, "llm_sidecar_ttft_seconds", "_count") == {labels: 1}
    # the first token came after the model's 80 ms time to first token
    assert _series(text, "llm_sidecar_ttft_seconds", "_sum")[labels] >= 0.08
    # one sample per stream: its mean gap, about 1/100 s at 100 tokens/s
    assert _series(text, "llm_sidecar_inter_token_latency_seconds", "_count") == {labels: 1}
    gap = _series(text, "llm_sidecar_inter_token_latency_seconds", "_sum")[labels]
    assert 0.005 <= gap <= 0.05
    # 100 tokens/s, never faster than the model writes them
    rate = _series(text, "llm_sidecar_tokens_per_second", "_sum")[labels]
    assert 0 < rate <= 150


async def test_non_streamed_calls_record_no_token_timing(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    status, _, _ = await chat(http, running, "plain")
    assert status == 200
    async with http.get(admin(running) + "/metrics") as r:
        text = await r.text()
    assert not _series(text, "llm_sidecar_ttft_seconds", "_count")


async def test_overhead_header_counts_the_sidecars_own_time_only(pods, sidecar, http):
    [pod] = await pods(1, ttft_ms=50)
    running = await sidecar({"small": pool([pod])})
    await chat(http, running, "overhead")  # warm: the route and the upstream connection
    started = time.perf_counter()
    status, headers, _ = await chat(http, running, "overhead")
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert status == 200
    overhead_ms = float(headers["x-sidecar-overhead-ms"])
    # Positive, and far below the call: the model's 50 ms are not the sidecar's.
    assert 0 < overhead_ms < elapsed_ms - 40


async def test_a_role_only_preamble_is_neither_the_first_token_nor_a_token(sidecar):
    """vLLM opens a stream with `"content":""`, llama.cpp with `"content":null`: neither is a
    token, so the time to first token runs to the first text and, without usage in the
    stream, the completion estimate counts only frames with text."""
    def event(delta: bytes) -> bytes:
        frame = b'data: {"choices":[{"index":0,"delta":' + delta + b'}]}\n\n'
        return b"%x\r\n%s\r\n" % (len(frame), frame)

    async def stream(conn: Conn, request: Message) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        await conn.send(event(b'{"role":"assistant","content":""}'))
        await conn.send(event(b'{"role":"assistant","content":null}'))
        await asyncio.sleep(0.3)
        for word in (b"one", b"two", b"three"):
            await conn.send(event(b'{"content":"' + word + b'"}'))
        await conn.send(event(b'{"content": null}') + b"0\r\n\r\n")
        return True

    async with upstream_factory() as upstreams:
        running, _ = await proxied(sidecar, upstreams, stream)
        answer = await exchange(running.port, post(b"/v1/chat/completions",
                                                   b'{"stream":true}'), b"POST")
    assert answer.status == 200
    telemetry = running.sidecar.telemetry
    assert telemetry.counter_total("completion_tokens") == 3
    [ttft] = [s for key, s in telemetry.series.items() if "ttft" in key[0]]
    assert ttft.count == 1 and ttft.sum >= 0.3  # the preamble came at once, the text 0.3 s on
