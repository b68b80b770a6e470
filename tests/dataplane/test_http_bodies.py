"""Response bodies on the wire (SPEC 5, 6 and 9): bodiless answers (HEAD, 204, 304) carry
no bytes and leave the upstream connection reusable, close-delimited and chunked answers
arrive whole, and a truncated answer never looks complete to the app."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.raw_http import Message, chunked, error_of, get, response
from tests.support.raw_peers import Client, Conn, always, proxied, upstream_factory


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


def then(first: bytes, rest: bytes = response(b"after")):
    """Answer the first request of each connection with `first`, the others with `rest`."""

    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(first if len(conn.requests) == 1 else rest)
        return True

    return respond


async def two_calls(port: int, method: bytes = b"GET") -> tuple[Message, Message]:
    """Two requests on one client connection: the second proves the first left no bytes."""
    client = await Client.open(port)
    try:
        await client.send(get(b"/first", method=method))
        one = await client.final(method)
        await client.send(get(b"/second"))
        two = await client.final()
    finally:
        client.close()
    return one, two


async def test_head_keeps_the_upstreams_content_length_and_sends_no_body(sidecar, upstreams):
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1234\r\n\r\n")
    running, upstream = await proxied(sidecar, upstreams, then(head))
    one, two = await two_calls(running.port, b"HEAD")
    assert one.status == 200 and one.body == b""
    assert one.header("content-length") == b"1234", one.raw
    assert two.body == b"after"
    assert len(upstream.conns) == 1 and [r.method for r in upstream.requests] == \
        [b"HEAD", b"GET"], "the upstream connection is reused after a HEAD"


async def test_204_has_no_body_and_the_upstream_connection_is_reused(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams,
                                      then(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"))
    one, two = await two_calls(running.port)
    assert one.status == 204 and one.header("x-a") == b"1"
    assert one.header("content-length") is None and one.header("transfer-encoding") is None
    assert two.body == b"after"
    assert len(upstream.conns) == 1 and len(upstream.requests) == 2


async def test_304_has_no_body_and_the_upstream_connection_is_reused(sidecar, upstreams):
    # A 304's Content-Length describes the representation, not bytes that follow.
    not_modified = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 42\r\n\r\n'
    running, upstream = await proxied(sidecar, upstreams, then(not_modified))
    one, two = await two_calls(running.port)
    assert one.status == 304 and one.header("etag") == b'"v1"'
    assert one.header("content-length") in (None, b"42")
    assert one.header("transfer-encoding") is None
    assert two.body == b"after"
    assert len(upstream.conns) == 1 and len(upstream.requests) == 2


PATTERN = bytes(range(256)) * 800  # 200 KiB


@pytest.mark.parametrize("kind", [b"application/octet-stream", b"text/event-stream"])
async def test_a_close_delimited_response_is_forwarded_whole(sidecar, upstreams, kind):
    async def respond(conn: Conn, request: Message) -> bool:
        if conn.number > 1:
            await conn.send(response(b"fresh"))
            return True
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\n\r\n")
        for i in range(0, len(PATTERN), 32768):
            await conn.send(PATTERN[i:i + 32768])
        return False  # the close is the end of the body

    running, upstream = await proxied(sidecar, upstreams, respond)
    one, two = await two_calls(running.port)
    assert one.status == 200 and one.complete, "the upstream's close ended the body cleanly"
    assert one.body == PATTERN
    assert two.body == b"fresh" and len(upstream.conns) == 2


async def test_a_chunked_response_with_trailers_arrives_complete(sidecar, upstreams):
    pieces = [b"alpha ", b"beta " * 1000, b"gamma"]
    reply = chunked(pieces, trailers=b"X-Checksum: abc\r\nX-Other: 1\r\n")
    running, upstream = await proxied(sidecar, upstreams, then(reply))
    one, two = await two_calls(running.port)
    assert one.status == 200 and one.complete and one.body == b"".join(pieces)
    assert two.body == b"after"
    assert len(upstream.conns) == 1, "the trailers were read: the connection stays usable"


TRUNCATED = {
    "before-content-length": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 100000\r\n\r\n" + PATTERN[:40000],
    "mid-chunk": b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n8000\r\n" + PATTERN[:10000],
    # chunked() ends with the terminating "0" chunk: cut it off.
    "between-chunks": chunked([b"0123456789abcdef"],
                              [b"Content-Type: application/octet-stream"])[:-5],
    "sse-mid-stream": chunked([b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'],
                              [b"Content-Type: text/event-stream"])[:-5],
}


@pytest.mark.parametrize("case", TRUNCATED)
async def test_a_truncated_response_never_looks_complete(sidecar, upstreams, case):
    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(TRUNCATED[case])
        await asyncio.sleep(0.3)  # the sidecar has started relaying by now
        return False  # lost: the connection ends short of what the framing promised

    running, _ = await proxied(sidecar, upstreams, respond, SIDECAR_MAX_ATTEMPTS="1")
    client = await Client.open(running.port)
    try:
        await client.send(get())
        answer = await client.final()
        closed = answer.status < 500 and await client.closed()
    finally:
        client.close()
    if answer.status >= 500:  # refused before any byte was relayed: a clear error
        assert error_of(answer)["code"], answer.raw[:300]
        return
    assert answer.status == 200
    assert not answer.complete, ("the app got a complete-looking answer from a truncated "
                                 f"upstream response: {answer.raw[:200]!r}...")
    assert closed


async def test_a_large_content_length_body_is_forwarded_byte_exact(sidecar, upstreams):
    body = PATTERN * 25  # 5 MiB
    running, _ = await proxied(sidecar, upstreams, always(response(body)))
    client = await Client.open(running.port)
    try:
        await client.send(get())
        answer = await client.final()
    finally:
        client.close()
    assert answer.header("content-length") == str(len(body)).encode()
    assert answer.body == body


BAD_UPSTREAM_FRAMING = {
    "content-length-and-chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nabcde\r\n0\r\n\r\n",
    "differing-content-lengths": b"Content-Length: 5\r\nContent-Length: 3\r\n\r\nabcde",
    "negative-content-length": b"Content-Length: -5\r\n\r\nabcde",
    "space-before-colon": b"X-Up : 1\r\nContent-Length: 5\r\n\r\nabcde",
    "nul-in-value": b"X-Up: a\x00b\r\nContent-Length: 5\r\n\r\nabcde",
}


@pytest.mark.parametrize("case", BAD_UPSTREAM_FRAMING)
async def test_an_upstream_answer_with_malformed_framing_is_never_relayed(sidecar, upstreams,
                                                                         case):
    # Relaying an ambiguous answer would let the app (or a proxy before it) read it
    # differently from the sidecar: the app gets a clear error instead.
    bad = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + BAD_UPSTREAM_FRAMING[case]
    running, upstream = await proxied(sidecar, upstreams, then(bad, bad),
                                      SIDECAR_MAX_ATTEMPTS="1")
    client = await Client.open(running.port)
    try:
        await client.send(get())
        answer = await client.final()
    finally:
        client.close()
    assert answer.status >= 500, answer.raw[:300]
    assert error_of(answer)["code"]
    assert len(upstream.requests) == 1


async def test_an_upstream_1xx_before_its_answer_leaves_the_answer_intact(sidecar, upstreams):
    early = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
             + response(b"final"))
    running, upstream = await proxied(sidecar, upstreams, then(early))
    one, two = await two_calls(running.port)
    assert one.status == 200 and one.body == b"final"
    assert two.body == b"after" and len(upstream.conns) == 1


@pytest.mark.parametrize("kind", [b"text/event-stream", b"application/octet-stream"])
async def test_a_chunked_answer_is_relayed_as_it_arrives(sidecar, upstreams, kind):
    first = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    second = b"data: [DONE]\n\n"
    app_got_first = asyncio.Event()

    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: " + kind
                        + b"\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                        % (len(first), first))
        try:  # the next chunk only once the app has the first: nothing may sit in between
            await asyncio.wait_for(app_got_first.wait(), 3)
        except TimeoutError:
            return False
        await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))
        return True

    running, _ = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get())
        try:
            await asyncio.wait_for(client.wire.until(first), 2)
        except TimeoutError:
            raise AssertionError("the first chunk was held back until the upstream sent more"
                                 ) from None
        app_got_first.set()
        await asyncio.wait_for(client.wire.until(second), 2)
    finally:
        client.close()
