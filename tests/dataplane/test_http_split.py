"""However the bytes are cut on the way in, the same bytes come out: a request split at
every byte boundary (and sent a byte at a time) reaches the upstream the same each time, and
an upstream answer split the same ways reaches the app the same each time."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.support.raw_http import Message, get
from tests.support.raw_peers import Client, Conn, proxied, upstream_factory

PAUSE_S = 0.001  # between the pieces, so the sidecar reads them apart

# Two pipelined requests: chunked (with an extension and a trailer), then Content-Length.
REQUESTS = (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: sidecar\r\nX-App: one\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\n{\"mod\r\n8;e=1\r\nel\":\"m\"}\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"POST /v1/embeddings HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 14\r\n"
            b"X-App: two\r\n\r\n{\"input\":\"hi\"}")

DATE = b"Date: Tue, 01 Dec 2026 00:00:00 GMT"
ANSWERS = {
    "content-length": DATE + b"\r\nContent-Type: application/json\r\nX-Up: 1\r\n"
    b"Content-Length: 26\r\n\r\n{\"id\":\"x\",\"choices\":[1,2]}",
    "chunked": DATE + b"\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n7;ext=1\r\ndata: a\r\n3\r\n\n\nd\r\nd\r\nata: [DONE]\n\n\r\n0\r\nX-Sum: 9\r\n\r\n",
}


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


def cuts(length: int) -> list[list[int]]:
    """Every single cut, then every byte on its own."""
    return [[i] for i in range(1, length)] + [list(range(1, length))]


def stable(answer: Message) -> tuple[object, ...]:
    """What must not depend on how the bytes were cut: the overhead the sidecar measures
    does, and so may the chunk boundaries it forwards a chunked body in."""
    raw = re.sub(rb"(?i)x-sidecar-overhead-ms: [^\r]*\r\n", b"", answer.raw)
    if answer.chunked:
        raw = raw.split(b"\r\n\r\n", 1)[0]
    return raw, answer.body, answer.complete


async def send_in_pieces(client: Client, data: bytes, pieces: list[int]) -> None:
    last = 0
    for cut in [*pieces, len(data)]:
        client.writer.write(data[last:cut])
        await client.writer.drain()
        last = cut
        if cut < len(data):
            await asyncio.sleep(PAUSE_S)


async def test_a_request_split_anywhere_reaches_the_upstream_the_same(sidecar, upstreams):
    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\n" + ANSWERS["content-length"])
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        seen: list[tuple[list[bytes], list[tuple[object, ...]]]] = []
        for pieces in [[], *cuts(len(REQUESTS))]:
            before = len(upstream.requests)
            await send_in_pieces(client, REQUESTS, pieces)
            answers = [await client.final(b"POST") for _ in range(2)]
            forwarded = [r.raw for r in upstream.requests[before:]]
            seen.append((forwarded, [stable(a) for a in answers]))
            assert seen[-1] == seen[0], f"cut at {pieces[:3]}{'...' if len(pieces) > 3 else ''}"
    finally:
        client.close()
    reference, answers = seen[0]
    assert len(reference) == 2 and reference[0].endswith(b'{"model":"m"}')
    assert all(body == b'{"id":"x","choices":[1,2]}' for _, body, _ in answers)


@pytest.mark.parametrize("kind", ANSWERS)
async def test_an_answer_split_anywhere_reaches_the_app_the_same(sidecar, upstreams, kind):
    answer = b"HTTP/1.1 200 OK\r\n" + ANSWERS[kind]
    plan: list[list[int]] = [[]]

    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(answer, pieces=plan[0], pause_s=PAUSE_S)
        return True

    running, _ = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        seen = []
        for pieces in [[], *cuts(len(answer))]:
            plan[0] = pieces
            await client.send(get())
            seen.append(stable(await client.final()))
            assert seen[-1] == seen[0], f"cut at {pieces[:3]}{'...' if len(pieces) > 3 else ''}"
    finally:
        client.close()
    _, body, complete = seen[0]
    assert complete and body == (b'{"id":"x","choices":[1,2]}' if kind == "content-length"
                                 else b"data: a\n\ndata: [DONE]\n\n")
