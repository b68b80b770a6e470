"""Wire faults on both sides of the data path, in raw bytes on real sockets: a body that
stalls, a client that half-closes or leaves, upgrade requests, header values the parser
refuses, an upstream that writes more than its answer, a request handler that ends without
answering, and pooled connections of endpoints a reload removed."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from sidecar.dataplane import listener as listener_module
from tests.raw_http import Message, echo_target, error_of, get, post, response
from tests.raw_peers import Client, Conn, always, pools_for, proxied, upstream_factory


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


@pytest.fixture
def short_deadlines(monkeypatch):
    """Deadlines a test can wait out: the sweep looks every 0.05 s, a body may be idle 0.5 s
    (10 s each in service)."""
    monkeypatch.setattr(listener_module, "SWEEP_S", 0.05)
    monkeypatch.setattr(listener_module, "BODY_IDLE_S", 0.5, raising=False)
    monkeypatch.setattr(listener_module, "HEAD_TIMEOUT_S", 0.5)


def echo_body(request: Message) -> bytes:
    return response(request.target + b"|" + request.body)


def request_head(body_length: int, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: s\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % body_length)


# --- a stalled upload -------------------------------------------------------------------


async def test_a_stalled_body_gets_408_with_close_and_nothing_is_forwarded(
        sidecar, upstreams, short_deadlines):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(request_head(100) + b"abcd")  # then nothing
        answer = await client.final(b"POST")
        assert answer.status == 408, answer.raw[:300]
        assert answer.header("connection") == b"close"
        assert error_of(answer)["code"] == "request_timeout"
        assert await client.closed(), "the connection stays open after the 408"
    finally:
        client.close()
    assert upstream.received == b"" and not upstream.conns


async def test_a_stalled_head_gets_408_with_close(sidecar, upstreams, short_deadlines):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: s\r\nX-Slow: ")
        answer = await client.final(b"POST")
        assert answer.status == 408 and answer.header("connection") == b"close"
        assert await client.closed()
    finally:
        client.close()
    assert upstream.received == b""


async def test_a_slow_body_that_keeps_coming_is_not_cut(sidecar, upstreams, short_deadlines):
    running, _ = await proxied(sidecar, upstreams, always(echo_body))
    body = b"x" * 12
    client = await Client.open(running.port)
    try:
        await client.send(request_head(len(body)))
        for i in range(12):  # 1.2 s in all, more than twice the idle deadline
            await asyncio.sleep(0.1)
            await client.send(body[i:i + 1])
        answer = await client.final(b"POST")
        assert answer.status == 200 and answer.body == b"/v1/chat/completions|" + body
    finally:
        client.close()


# --- half-close -------------------------------------------------------------------------


async def slow(conn: Conn, request: Message) -> bool:
    await asyncio.sleep(0.2)  # the app's FIN is in long before the answer
    await conn.send(echo_body(request))
    return True


@pytest.mark.parametrize("close", [True, False], ids=["connection-close", "keep-alive"])
async def test_a_half_closed_client_gets_its_whole_answer_then_the_close(
        sidecar, upstreams, close):
    running, upstream = await proxied(sidecar, upstreams, slow)
    client = await Client.open(running.port)
    try:
        await client.send(post(body=b'{"model":"m"}',
                               headers=[b"Connection: close"] if close else []))
        client.writer.write_eof()  # shutdown(SHUT_WR): "that was my last request"
        answer = await client.final(b"POST")
        assert answer.status == 200 and answer.complete
        assert answer.body == b'/v1/chat/completions|{"model":"m"}'
        assert await client.closed(), "the connection stays open after the answer"
    finally:
        client.close()
    assert len(upstream.requests) == 1


async def test_half_closed_pipelined_requests_are_all_answered(sidecar, upstreams):
    running, _ = await proxied(sidecar, upstreams, slow)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/a") + get(b"/b"))
        client.writer.write_eof()
        assert (await client.final()).body == b"/a|"
        assert (await client.final()).body == b"/b|"
        assert await client.closed()
    finally:
        client.close()


async def test_a_half_close_mid_request_closes_without_forwarding(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(request_head(100) + b"abcd")
        client.writer.write_eof()
        assert await client.closed(), "an unfinished request kept the connection open"
    finally:
        client.close()
    await asyncio.sleep(0.05)
    assert upstream.received == b""


async def test_a_client_gone_before_its_answer_cancels_the_upstream_request(
        sidecar, upstreams):
    # A full close looks like a half-close until the sidecar writes: its probe is answered
    # with a reset, and the upstream request is dropped instead of generating for nobody.
    async def never(conn: Conn, request: Message) -> bool:
        with contextlib.suppress(TimeoutError):  # no answer; notice the sidecar's close
            await asyncio.wait_for(conn.wire.rest(), 10)
            conn.closed_by_peer.set()
        return False

    running, upstream = await proxied(sidecar, upstreams, never)
    client = await Client.open(running.port)
    await client.send(post())
    for _ in range(100):
        if upstream.requests:
            break
        await asyncio.sleep(0.02)
    client.close()
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
    assert running.sidecar.proxy.counters.client_disconnects == 1


# --- an upstream that says more than its answer ---------------------------------------

EXTRA = b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 5\r\n\r\nevil!"


async def test_bytes_after_an_upstream_answer_are_not_the_apps_and_end_that_connection(
        sidecar, upstreams):
    async def respond(conn: Conn, request: Message) -> bool:
        if conn.number == 1:  # one packet: the answer and a second, unasked one
            await conn.send(response(b"hi") + EXTRA)
        else:
            await conn.send(echo_target(request))
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first"))
        first = await client.final()
        assert first.start == b"HTTP/1.1 200 OK", first.raw[:300]
        assert first.body == b"hi" and first.header("x-evil") is None
        await client.send(get(b"/second"))  # same app connection: still in step
        second = await client.final()
        assert second.status == 200 and second.body == b"/second"
    finally:
        client.close()
    assert len(upstream.conns) == 2 and len(upstream.conns[0].requests) == 1
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)


async def test_a_body_after_a_head_answer_ends_that_connection(sidecar, upstreams):
    async def respond(conn: Conn, request: Message) -> bool:
        if conn.number == 1:  # a HEAD answer has no body: these 5 bytes are nobody's
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
        else:
            await conn.send(echo_target(request))
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first", method=b"HEAD"))
        head = await client.final(b"HEAD")
        assert head.status == 200 and head.header("content-length") == b"5"
        await client.send(get(b"/second"))
        assert (await client.final()).body == b"/second"
    finally:
        client.close()
    assert len(upstream.conns) == 2 and len(upstream.conns[0].requests) == 1


async def test_bytes_from_an_idle_pooled_connection_close_it(sidecar, upstreams):
    async def respond(conn: Conn, request: Message) -> bool:
        await conn.send(echo_target(request))
        if conn.number == 1:
            await asyncio.sleep(0.1)  # the connection is idle in the pool by now
            await conn.send(EXTRA)
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first"))
        assert (await client.final()).body == b"/first"
        await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
        await client.send(get(b"/second"))
        assert (await client.final()).body == b"/second"
    finally:
        client.close()
    assert len(upstream.conns) == 2 and len(upstream.conns[0].requests) == 1


# --- upgrade requests -----------------------------------------------------------------

H2C = [b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
       b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"]


def no_upgrade_headers(seen: Message) -> None:
    assert not seen.names() & {"upgrade", "http2-settings"}, seen.raw
    assert all(b"upgrade" not in v.lower() for v in seen.values("connection")), seen.raw


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "body-later"])
async def test_an_h2c_upgrade_with_a_body_is_declined_and_the_body_forwarded(
        sidecar, upstreams, split):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    body = b'{"model":"m","messages":[{"role":"user","content":"hello"}]}'
    client = await Client.open(running.port)
    try:
        head = request_head(len(body), b"".join(h + b"\r\n" for h in H2C))
        if split:
            await client.send(head)
            await asyncio.sleep(0.05)
            await client.send(body + get(b"/after"))
        else:
            await client.send(head + body + get(b"/after"))
        answer = await client.final(b"POST")
        assert answer.start.startswith(b"HTTP/1.1 200"), answer.raw[:300]
        assert answer.body == b"/v1/chat/completions|" + body
        assert (await client.final()).body == b"/after|"  # pipelined behind it
    finally:
        client.close()
    seen = upstream.requests[0]
    assert seen.header("content-length") == str(len(body)).encode() and seen.body == body
    no_upgrade_headers(seen)
    assert [r.target for r in upstream.requests] == [b"/v1/chat/completions", b"/after"]


async def test_an_upgrade_with_a_chunked_body_is_declined_and_the_body_forwarded(
        sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: s\r\n"
                          + b"".join(h + b"\r\n" for h in H2C)
                          + b"Transfer-Encoding: chunked\r\n\r\n4\r\n{\"mo\r\n"
                          + b"9\r\ndel\":\"m\"}\r\n0\r\n\r\n" + get(b"/after"))
        assert (await client.final(b"POST")).body == b'/v1/chat/completions|{"model":"m"}'
        assert (await client.final()).body == b"/after|"
    finally:
        client.close()
    seen = upstream.requests[0]
    assert seen.header("content-length") == b"13" and seen.header("transfer-encoding") is None
    no_upgrade_headers(seen)


async def test_a_websocket_upgrade_is_declined_and_answered_in_http_1_1(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/ws", [b"Connection: Upgrade", b"Upgrade: websocket",
                                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                                       b"Sec-WebSocket-Version: 13"]) + get(b"/after"))
        answer = await client.final()
        assert answer.status == 200 and answer.body == b"/ws"
        assert (await client.final()).body == b"/after"
    finally:
        client.close()
    no_upgrade_headers(upstream.requests[0])
    assert [r.target for r in upstream.requests] == [b"/ws", b"/after"]


# --- header values the parser refuses ------------------------------------------------


@pytest.mark.parametrize(("line", "code", "named"), [
    (b"X-Session-Id: ab\x01cd", "invalid_session_id", "x-session-id"),
    (b"x-sidecar-selector: 1\x7f", "invalid_selector", "x-sidecar-selector"),
    (b"X-App: a\x00b", "bad_request", "X-App"),
])
@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "split-in-the-value"])
async def test_a_refused_header_value_is_a_400_naming_the_header(sidecar, upstreams, line,
                                                                 code, named, split):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    data = request_head(2, line + b"\r\n") + b"{}"
    client = await Client.open(running.port)
    try:
        if split:  # the name in one read, the bad character in the next
            cut = data.index(line) + len(line) - 2
            await client.send(data[:cut])
            await asyncio.sleep(0.05)
            await client.send(data[cut:])
        else:
            await client.send(data)
        answer = await client.final(b"POST")
        assert answer.status == 400
        error = error_of(answer)
        assert error["code"] == code and named in error["message"], error
        assert await client.closed()
    finally:
        client.close()
    assert upstream.received == b""


# --- a handler that ends without answering --------------------------------------------


@pytest.mark.parametrize("corked", [False, True], ids=["plain", "corked"])
async def test_a_handler_cancelled_before_answering_gives_a_500_and_a_close(sidecar, upstreams,
                                                                            corked):
    running, _ = await proxied(sidecar, upstreams, always(echo_target))

    async def cancelled(request, down) -> None:
        if corked:  # as the relay does before its head: the 500 must not stay held
            down.cork()
        raise asyncio.CancelledError

    running.listener.handle = cancelled
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/x"))
        answer = await client.final()
        assert answer.status == 500 and error_of(answer)["code"] == "internal_error"
        assert answer.header("connection") == b"close"
        assert await client.closed()
    finally:
        client.close()
    assert running.listener.errors == 1


async def test_a_handler_cancelled_mid_answer_aborts_the_connection(sidecar, upstreams):
    running, _ = await proxied(sidecar, upstreams, always(echo_target))

    async def cut(request, down) -> None:
        down.start(200, b"OK", b"Content-Type: text/plain\r\n", 100)
        down.write(b"partial")
        raise asyncio.CancelledError

    running.listener.handle = cut
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/x"))
        answer = await client.final()
        assert answer.status == 200 and not answer.complete and answer.body == b"partial"
    finally:
        client.close()


async def test_a_handler_that_returns_without_answering_gives_a_500(sidecar, upstreams):
    running, _ = await proxied(sidecar, upstreams, always(echo_target))

    async def silent(request, down) -> None:
        return None

    running.listener.handle = silent
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/x"))
        assert (await client.final()).status == 500
        assert await client.closed()
    finally:
        client.close()


# --- endpoints a reload removed -------------------------------------------------------


async def test_a_reload_closes_the_pooled_connections_of_removed_endpoints(
        sidecar, upstreams, tmp_path):
    a = await upstreams(always(echo_target))
    b = await upstreams(always(echo_target))
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(pools_for(a)))
    running = await sidecar({}, SIDECAR_POOLS="", SIDECAR_POOLS_FILE=str(path))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/one"))
        assert (await client.final()).body == b"/one"
        assert len(a.conns) == 1  # idle in the pool now
        path.write_text(json.dumps(pools_for(b)))
        assert running.sidecar.reload()
        await asyncio.wait_for(a.conns[0].closed_by_peer.wait(), 5)
        await client.send(get(b"/two"))
        assert (await client.final()).body == b"/two"
    finally:
        client.close()
    assert [r.target for r in b.requests] == [b"/two"] and len(a.requests) == 1
    upstream = running.sidecar.upstream
    assert a.url not in upstream._origins and b.url in upstream._origins


async def test_an_answer_in_flight_across_a_reload_ends_whole_and_its_connection_closes(
        sidecar, upstreams, tmp_path):
    release = asyncio.Event()

    async def held(conn: Conn, request: Message) -> bool:
        await release.wait()
        await conn.send(echo_target(request))
        return True

    a = await upstreams(held)
    b = await upstreams(always(echo_target))
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(pools_for(a)))
    running = await sidecar({}, SIDECAR_POOLS="", SIDECAR_POOLS_FILE=str(path))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/held"))
        for _ in range(100):
            if a.requests:
                break
            await asyncio.sleep(0.02)
        path.write_text(json.dumps(pools_for(b)))
        assert running.sidecar.reload()
        release.set()
        assert (await client.final()).body == b"/held"
        await asyncio.wait_for(a.conns[0].closed_by_peer.wait(), 5)
    finally:
        client.close()
    upstream = running.sidecar.upstream
    assert upstream.in_use() == 0 and a.url not in upstream._origins
