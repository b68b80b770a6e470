"""Flow control through the sidecar, which runs as its own process so its memory can be
read: a client that stops reading stops the upstream (the sidecar holds a bounded amount,
whatever the upstream's framing), and a slow upstream stops the sidecar reading the client."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from tests.support.raw_http import Message, post, response
from tests.support.raw_peers import Client, Conn, upstream_factory

MiB = 1 << 20
STREAM_BYTES = 50 * MiB
BLOCK = bytes(range(256)) * 4096  # 1 MiB
IDLE_S = 5.0
# What the sidecar may hold on top of its resting size while a peer does not keep up.
RSS_GROWTH_LIMIT = 6 * MiB


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def small_send_buffer(conn: Conn) -> None:
    # So that what the upstream manages to write is close to what the sidecar took.
    conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                    1 << 16)


class Streamer:
    """Answers /chunked and /length with 50 MiB, as fast as the sidecar takes it, counting
    what it wrote; anything else with a short answer."""

    def __init__(self) -> None:
        self.sent: dict[bytes, int] = {}

    async def __call__(self, conn: Conn, request: Message) -> bool:
        target = request.target
        if target not in (b"/chunked", b"/length"):
            await conn.send(response(b"warm"))
            return True
        small_send_buffer(conn)
        self.sent[target] = 0
        if target == b"/length":
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Content-Length: %d\r\n\r\n" % STREAM_BYTES)
        else:
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(STREAM_BYTES // len(BLOCK)):
            if target == b"/chunked":
                conn.writer.write(b"%x\r\n" % len(BLOCK) + BLOCK + b"\r\n")
            else:
                conn.writer.write(BLOCK)
            await conn.writer.drain()
            self.sent[target] += len(BLOCK)
        if target == b"/chunked":
            conn.writer.write(b"0\r\n\r\n")
        await conn.writer.drain()
        return True


async def start_process(sidecar_process, upstream, **env: str):
    pools = {"m": {"model": "m", "endpoints": [upstream.url]}}
    return await sidecar_process({"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_LOG_FORMAT":
                                  "text", **env}).start()


async def warm_up(port: int, body: bytes = b"{}") -> None:
    """One call through the same path first, so lazy imports and pools are not growth."""
    client = await Client.open(port)
    try:
        await client.send(post(b"/warm", body))
        assert (await client.final(b"POST")).body == b"warm"
    finally:
        client.close()


async def test_a_client_that_reads_nothing_stops_the_upstream(sidecar_process, upstreams):
    streamer = Streamer()
    upstream = await upstreams(streamer)
    process = await start_process(sidecar_process, upstream)
    await warm_up(process.port)
    before = rss(process.process.pid)
    clients = {}
    for target in (b"/chunked", b"/length"):
        clients[target] = client = await Client.open(process.port, rcvbuf=1 << 16)
        client.wire.record = False
        await client.send(post(target))
    await asyncio.sleep(IDLE_S)  # the clients read nothing
    growth = rss(process.process.pid) - before
    sent = dict(streamer.sent)
    try:
        # Then they read: the paused streams resume and end whole.
        for target, client in clients.items():
            answer = await client.final(b"POST", timeout=30, keep=False)
            assert answer.status == 200 and answer.complete, target
            assert answer.size == STREAM_BYTES, target
    finally:
        for client in clients.values():
            client.close()
    held = {t.decode(): f"{n / MiB:.1f} MiB written by the upstream" for t, n in sent.items()}
    assert growth < RSS_GROWTH_LIMIT and all(n < STREAM_BYTES * 0.8 for n in sent.values()), (
        f"the sidecar's RSS grew {growth / MiB:.1f} MiB while its clients read nothing: {held}")


async def test_a_slow_upstream_stops_the_sidecar_reading_the_client(sidecar_process,
                                                                    upstreams):
    answer_now = asyncio.Event()

    async def respond(conn: Conn, request: Message) -> bool:
        if request.target == b"/slow":
            await asyncio.wait_for(answer_now.wait(), 20)
        await conn.send(response(b"warm" if request.target == b"/warm" else b"done"))
        return True

    upstream = await upstreams(respond)
    process = await start_process(sidecar_process, upstream)
    await warm_up(process.port, BLOCK)
    before = rss(process.process.pid)
    client = await Client.open(process.port, sndbuf=1 << 16)
    count = 30
    pipelined = post(b"/slow") + post(b"/next", BLOCK) * count  # 30 MiB behind a slow call
    try:
        client.writer.write(pipelined)  # no drain: see how much the sidecar takes
        await asyncio.sleep(2)
        taken = len(pipelined) - client.writer.transport.get_write_buffer_size()
        growth = rss(process.process.pid) - before
        answer_now.set()
        await asyncio.wait_for(client.writer.drain(), 30)
        bodies = [(await client.final(b"POST", timeout=30)).body for _ in range(count + 1)]
    finally:
        client.close()
    assert bodies == [b"done"] * (count + 1)
    assert growth < RSS_GROWTH_LIMIT and taken < 8 * MiB, (
        f"while the upstream sat on the first call the sidecar read {taken / MiB:.1f} MiB "
        f"of the client's pipelined requests and grew {growth / MiB:.1f} MiB")
