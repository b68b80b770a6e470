"""Request framing on the wire (SPEC 6 and 9): malformed or ambiguous framing is refused and
never forwarded, oversized header sections get 431, and what is forwarded carries exactly
one framing; Expect, HTTP/1.0, Connection: close, Upgrade: h2c and pipelining."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.raw_http import TIMEOUT_S, Message, chunked, echo_target, error_of, get, response
from tests.support.raw_peers import Client, Conn, always, exchange, proxied, upstream_factory


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


# A second request right behind each malformed one: if the sidecar reads the framing
# differently from a server behind it, this is what would be smuggled through.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: s\r\n\r\n"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: s\r\n"

MALFORMED = {
    "content-length-and-chunked": HEAD + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked-and-content-length": HEAD + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "differing-content-lengths": HEAD + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
    "differing-content-length-list": HEAD + b"Content-Length: 3, 5\r\n\r\nabcde",
    "plus-signed-content-length": HEAD + b"Content-Length: +5\r\n\r\nabcde",
    "negative-content-length": HEAD + b"Content-Length: -5\r\n\r\nabcde",
    "non-numeric-content-length": HEAD + b"Content-Length: five\r\n\r\nabcde",
    "hex-content-length": HEAD + b"Content-Length: 0x5\r\n\r\nabcde",
    "content-length-with-inner-space": HEAD + b"Content-Length: 5 5\r\n\r\nabcde",
    "gzip-transfer-encoding": HEAD + b"Transfer-Encoding: gzip\r\n\r\nabcde",
    "chunked-not-final": HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "chunked-not-final-across-lines": HEAD + b"Transfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "identity-transfer-encoding": HEAD + b"Transfer-Encoding: identity\r\n\r\nabcde",
    "unknown-transfer-coding": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing.
    "chunked-in-http-1.0": b"POST /v1/chat/completions HTTP/1.0\r\nHost: s\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n",
    "space-before-colon-in-content-length": HEAD + b"Content-Length : 5\r\n\r\nabcde",
    "space-before-colon": HEAD + b"X-App : 1\r\nContent-Length: 5\r\n\r\nabcde",
    "obs-fold": HEAD + b"X-App: one\r\n two\r\nContent-Length: 5\r\n\r\nabcde",
    "nul-in-value": HEAD + b"X-App: a\x00b\r\nContent-Length: 5\r\n\r\nabcde",
    "bare-cr-in-value": HEAD + b"X-App: a\rb\r\nContent-Length: 5\r\n\r\nabcde",
    "invalid-name-character": HEAD + b"X(App): 1\r\nContent-Length: 5\r\n\r\nabcde",
    "bad-chunk-size": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabcde\r\n0\r\n\r\n",
    "missing-host": b"GET /v1/models HTTP/1.1\r\nX-App: 1\r\n\r\n",
    "two-hosts": b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_framing_is_400_closed_and_nothing_forwarded(sidecar, upstreams, case):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    data = MALFORMED[case]
    # HTTP/1.0 closes after one request anyway: bytes after it say nothing about framing.
    tail = SMUGGLED if data.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1") else b""
    client = await Client.open(running.port)
    try:
        await client.send(data + tail)
        answer = await client.final(b"POST")
        assert answer.status == 400, answer.raw[:300]
        # The framing is unknown, so nothing after it can be trusted: close.
        assert await client.closed(), "the connection stays open after a framing error"
    finally:
        client.close()
    await asyncio.sleep(0.05)
    assert upstream.received == b"" and not upstream.conns, "forwarded upstream"


@pytest.mark.parametrize("case", ["content-length-and-chunked", "obs-fold"])
async def test_a_framing_error_uses_the_sidecar_error_shape(sidecar, upstreams, case):
    running, _ = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, MALFORMED[case], b"POST")
    assert answer.status == 400
    error = error_of(answer)
    assert error["type"] == "sidecar_error" and error["code"] and error["message"]


def many_headers(count: int) -> list[bytes]:
    return [b"X-H-%d: v%d" % (i, i) for i in range(count)]


@pytest.mark.parametrize("headers", [
    pytest.param([b"X-Big: " + b"a" * 9000], id="line-over-8190-bytes"),
    pytest.param(many_headers(128), id="129-headers"),  # plus Host
])
async def test_oversized_header_section_is_431_and_not_forwarded(sidecar, upstreams, headers):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, get(headers=headers))
    assert answer.status == 431, answer.raw[:300]
    assert error_of(answer)["code"]
    assert upstream.received == b""


async def test_header_section_within_limits_is_forwarded_whole(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    headers = [b"X-Big: " + b"b" * 8000, *many_headers(126)]  # 128 with Host
    answer = await exchange(running.port, get(headers=headers))
    assert answer.status == 200
    [seen] = upstream.requests
    assert seen.header("x-big") == b"b" * 8000
    assert [v for k, v in seen.headers if k.lower().startswith(b"x-h-")] == \
        [b"v%d" % i for i in range(126)]


def framing(request: Message) -> tuple[list[bytes], list[bytes]]:
    return request.values("content-length"), request.values("transfer-encoding")


async def test_a_chunked_request_is_forwarded_with_content_length_only(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                            b"4;ext=1\r\n{\"mo\r\n9\r\ndel\":\"m\"}\r\n0\r\nX-Trailer: t\r\n\r\n",
                            b"POST")
    assert answer.status == 200
    [seen] = upstream.requests
    assert framing(seen) == ([b"13"], []), seen.raw
    assert seen.body == b'{"model":"m"}'
    assert seen.header("trailer") is None


async def test_a_content_length_request_is_forwarded_with_its_length(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    body = b'{"model":"m","messages":[]}'
    answer = await exchange(running.port, HEAD + b"Content-Length: %d\r\n\r\n%s"
                            % (len(body), body), b"POST")
    assert answer.status == 200
    [seen] = upstream.requests
    assert framing(seen) == ([str(len(body)).encode()], []) and seen.body == body


async def test_a_bodyless_get_is_forwarded_without_framing(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    assert (await exchange(running.port, get())).status == 200
    [seen] = upstream.requests
    assert framing(seen) == ([], []), seen.raw


async def test_an_empty_post_is_forwarded_with_content_length_0(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, HEAD + b"Content-Length: 0\r\n\r\n", b"POST")
    assert answer.status == 200
    [seen] = upstream.requests
    assert framing(seen) == ([b"0"], []), seen.raw


async def test_expect_100_continue_is_answered_by_the_sidecar(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(HEAD + b"Expect: 100-continue\r\nContent-Length: 13\r\n\r\n")
        interim = await client.response(b"POST", timeout=2)
        assert interim.start == b"HTTP/1.1 100 Continue"
        assert upstream.received == b"", "nothing goes upstream before the body"
        await client.send(b'{"model":"m"}')
        assert (await client.final(b"POST", timeout=3)).status == 200
    finally:
        client.close()
    assert upstream.requests[0].body == b'{"model":"m"}'


async def test_expect_is_not_forwarded_and_an_upstream_ignoring_it_gets_the_body(
        sidecar, upstreams):
    # The raw upstream never sends 100 Continue: if the sidecar forwarded Expect and waited
    # for one, the call would sit until the first-byte timeout (60 s by default).
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(HEAD + b"Expect: 100-continue\r\nContent-Length: 13\r\n\r\n"
                          b'{"model":"m"}')
        answer = await client.final(b"POST", timeout=3)
        assert answer.status == 200
    finally:
        client.close()
    [seen] = upstream.requests
    assert seen.header("expect") is None and seen.body == b'{"model":"m"}'


SSE = [b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
       b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n", b"data: [DONE]\n\n"]


async def test_http_1_0_client_gets_a_close_delimited_stream(sidecar, upstreams):
    stream = chunked(SSE, headers=[b"Content-Type: text/event-stream"])
    running, _ = await proxied(sidecar, upstreams, always(stream))
    client = await Client.open(running.port)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.0\r\nHost: s\r\n"
                          b"Content-Length: 13\r\n\r\n{\"model\":\"m\"}")
        answer = await client.final(b"POST")
    finally:
        client.close()
    assert answer.status == 200
    assert answer.header("transfer-encoding") is None and not answer.chunked
    assert answer.header("content-length") is None
    assert answer.body == b"".join(SSE) and answer.complete


async def test_http_1_0_request_goes_upstream_as_http_1_1_and_is_closed_after(sidecar,
                                                                             upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(b"GET /v1/files HTTP/1.0\r\n\r\n")  # no Host: fine in 1.0
        answer = await client.final()
        assert answer.status == 200 and answer.body == b"/v1/files"
        assert await client.closed(), "an HTTP/1.0 client without keep-alive gets a close"
    finally:
        client.close()
    [seen] = upstream.requests
    assert seen.start == b"GET /v1/files HTTP/1.1" and len(seen.values("host")) == 1


async def test_connection_close_is_honoured(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first", [b"Connection: close"]))
        answer = await client.final()
        assert answer.status == 200 and answer.body == b"/first"
        assert await client.closed(), "Connection: close not honoured"
    finally:
        client.close()
    [seen] = upstream.requests
    assert b"close" not in b",".join(seen.values("connection")).lower(), \
        "the client's Connection: close is hop-by-hop"


async def test_requests_after_connection_close_are_not_processed(sidecar, upstreams):
    # RFC 9112 9.6: answer the request that said close, then process nothing more.
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first", [b"Connection: close"]) + get(b"/second"))
        answer = await client.final()
        assert answer.status == 200 and answer.body == b"/first", answer.raw[:200]
        assert await client.closed()
    finally:
        client.close()
    await asyncio.sleep(0.05)
    assert [r.target for r in upstream.requests] == [b"/first"]


@pytest.mark.parametrize("garbage", [
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # refused by the sidecar's checks
    b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",  # refused by llhttp itself
], ids=["two-hosts", "content-length-and-chunked"])
async def test_garbage_behind_a_request_in_flight_lets_its_answer_finish_then_closes(
        sidecar, upstreams, garbage):
    # A malformed request pipelined behind a slow one: the first answer arrives whole (the
    # refusal does not cut it), nothing of the garbage is forwarded, then the close.
    async def respond(conn: Conn, request: Message) -> bool:
        await asyncio.sleep(0.2)
        await conn.send(response(request.target))
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/slow") + garbage)
        answer = await client.final()
        assert answer.status == 200 and answer.body == b"/slow" and answer.complete
        assert await client.closed(), "the connection stays open after garbage"
    finally:
        client.close()
    assert [r.target for r in upstream.requests] == [b"/slow"]


async def test_upgrade_h2c_is_ignored_and_the_request_served_over_http_1_1(sidecar,
                                                                           upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/v1/models", [b"Connection: Upgrade, HTTP2-Settings",
                                              b"Upgrade: h2c",
                                              b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"]))
        answer = await client.final()
        assert answer.start.startswith(b"HTTP/1.1 200"), answer.raw[:200]
        await client.send(get(b"/again"))  # still HTTP/1.1 on this connection
        assert (await client.final()).body == b"/again"
    finally:
        client.close()
    seen = upstream.requests[0]
    assert not seen.names() & {"upgrade", "http2-settings"}, seen.raw
    assert all(b"upgrade" not in v.lower() for v in seen.values("connection"))


async def test_pipelined_requests_are_answered_in_order(sidecar, upstreams):
    async def respond(conn: Conn, request: Message) -> bool:
        if request.target == b"/a":
            await asyncio.sleep(0.2)  # the first answer is the slowest
        await conn.send(response(request.target + b" " + request.body))
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(HEAD.replace(b"/v1/chat/completions", b"/a")
                          + b"Transfer-Encoding: chunked\r\n\r\n2\r\nA1\r\n0\r\n\r\n"
                          + HEAD.replace(b"/v1/chat/completions", b"/b")
                          + b"Content-Length: 2\r\n\r\nB2" + get(b"/c"))
        bodies = [(await client.final(b"POST", timeout=TIMEOUT_S)).body for _ in range(3)]
    finally:
        client.close()
    assert bodies == [b"/a A1", b"/b B2", b"/c "]
    assert sorted(r.target for r in upstream.requests) == [b"/a", b"/b", b"/c"]
