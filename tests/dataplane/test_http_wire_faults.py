"""Wire faults on both sides of the data path, in raw bytes on real sockets: a body that
stalls, a client that half-closes or leaves, upgrade requests, header values the parser
refuses, an upstream that writes more than its answer, a request handler that ends without
answering, and pooled connections of endpoints a reload removed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from sidecar.dataplane import listener as listener_module
from sidecar.dataplane.listener import ClientConnection
from tests.support.polling import until
from tests.support.raw_http import Message, echo_target, error_of, get, post, response
from tests.support.raw_peers import (
    Client,
    Conn,
    Upstream,
    always,
    pools_for,
    proxied,
    upstream_factory,
)


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


@pytest.fixture
def no_sweep(monkeypatch):
    """The test looks at the connection itself (`timed_out(now)` with a `now` of its
    choosing) instead of waiting for the sweep."""
    monkeypatch.setattr(listener_module, "SWEEP_S", 3600.0)


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


async def test_a_body_that_came_with_its_head_then_stalled_is_refused_at_the_first_look(
        sidecar, upstreams, no_sweep, monkeypatch):
    # The bytes read with the head are not progress: the body's idle clock starts at the
    # end of that read, not at the head's deadline (which would double it, then some).
    monkeypatch.setattr(listener_module, "HEAD_TIMEOUT_S", 100.0)
    monkeypatch.setattr(listener_module, "BODY_IDLE_S", 100.0)
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(request_head(100) + b"abcd")  # one read, then nothing
        conn = await the_connection(running)
        await until(lambda: conn._body_size == 4)
        assert conn.deadline <= time.monotonic() + 100.0, "the head's deadline plus more"
        conn.timed_out(conn.deadline + 0.001)
        answer = await client.final(b"POST")
        assert answer.status == 408 and "stalled" in error_of(answer)["message"]
        assert await client.closed()
    finally:
        client.close()
    assert upstream.received == b""


async def test_a_body_that_trickles_below_the_minimum_rate_gets_408(sidecar, upstreams,
                                                                      no_sweep):
    # One byte every 9 s never stalls (10 s idle): the body's overall bound ends it.
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    sent = 1
    try:
        await client.send(request_head(100) + b"x")
        conn = await the_connection(running)
        await until(lambda: conn._body_size == 1)
        now = time.monotonic()
        for sent in range(2, 30):
            await client.send(b"x")
            await until(lambda: conn._body_size == sent)  # noqa: B023
            now += 9.0
            conn.timed_out(now)
            if conn.closed:
                break
        answer = await client.final(b"POST")
        assert answer.status == 408 and "too slow" in error_of(answer)["message"]
    finally:
        client.close()
    assert sent < 10, f"refused only after {sent} bytes in {9 * sent} s"
    assert upstream.received == b""


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


async def test_a_request_cut_by_a_half_close_behind_an_answered_one_gets_400(sidecar,
                                                                             upstreams):
    running, upstream = await proxied(sidecar, upstreams, slow)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/a") + request_head(10) + b"abc")
        client.writer.write_eof()
        assert (await client.final()).body == b"/a|"
        answer = await client.final(b"POST")
        assert answer.status == 400 and error_of(answer)["code"] == "incomplete_request"
        assert answer.header("connection") == b"close"
        assert await client.closed()
    finally:
        client.close()
    assert [r.target for r in upstream.requests] == [b"/a"]


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


@pytest.mark.parametrize("cut", [b"POST /v1/chat/completions HTTP/1.1\r\nHost: s\r\n",
                                 request_head(2) + b"{"], ids=["in-the-head", "in-the-body"])
async def test_a_half_close_mid_request_gets_400_and_nothing_is_forwarded(sidecar, upstreams,
                                                                         cut):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(cut)
        client.writer.write_eof()
        answer = await client.final(b"POST")
        assert answer.status == 400 and answer.header("connection") == b"close"
        assert error_of(answer)["code"] == "incomplete_request"
        assert await client.closed(), "an unfinished request kept the connection open"
    finally:
        client.close()
    await asyncio.sleep(0.05)
    assert upstream.received == b""


async def never(conn: Conn, request: Message) -> bool:
    """No answer; notices the sidecar's close of the connection."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.wire.rest(), 10)
        conn.closed_by_peer.set()
    return False


async def forwarded(upstream: Upstream) -> None:
    for _ in range(250):
        if upstream.requests:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the request never reached the upstream")


async def the_connection(running: Any) -> ClientConnection:
    """The sidecar's side of the test's one client connection."""
    for _ in range(250):
        if running.listener.connections:
            [conn] = running.listener.connections
            return conn
        await asyncio.sleep(0.02)
    raise AssertionError("no client connection in the sidecar")


async def test_a_client_gone_before_its_answer_cancels_the_upstream_request(
        sidecar, upstreams):
    # A full close looks like a half-close until the sidecar writes: its probe is answered
    # with a reset, and the upstream request is dropped instead of generating for nobody.
    running, upstream = await proxied(sidecar, upstreams, never)
    client = await Client.open(running.port)
    await client.send(post())
    await forwarded(upstream)
    client.close()
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
    assert running.sidecar.proxy.counters.client_disconnects == 1


@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_an_http_1_0_client_that_closes_cancels_its_upstream_request(sidecar, upstreams,
                                                                            how):
    # No 1xx may be sent to HTTP/1.0, so nothing tells its half-close from its leaving:
    # either is taken as gone, and nothing (no 100 Continue either) is written to it.
    running, upstream = await proxied(sidecar, upstreams, never)
    client = await Client.open(running.port)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.0\r\nHost: s\r\n"
                          b"Content-Length: 2\r\n\r\n{}")
        await forwarded(upstream)
        if how == "close":
            client.close()
        else:
            client.writer.write_eof()
            assert await asyncio.wait_for(client.wire.rest(), 5) == b""
        await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
    finally:
        client.close()
    assert running.sidecar.proxy.counters.client_disconnects == 1


def piece(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")


async def test_a_half_close_mid_answer_lets_the_answer_end_whole(sidecar, upstreams):
    release = asyncio.Event()

    async def streaming(conn: Conn, request: Message) -> bool:
        await conn.send(STREAM_HEAD + piece(b"data: 1\n\n"))
        await asyncio.wait_for(release.wait(), 5)
        await conn.send(piece(b"data: 2\n\n") + b"0\r\n\r\n")
        return True

    running, upstream = await proxied(sidecar, upstreams, streaming)
    client = await Client.open(running.port)
    try:
        await client.send(post())
        await asyncio.wait_for(client.wire.until(b"data: 1\n\n"), 5)
        conn = await the_connection(running)
        client.writer.write_eof()  # the answer has begun: this is "no more requests"
        await until(lambda: conn._half_closed or conn.closed)
        release.set()
        await asyncio.wait_for(client.wire.rest(), 5)
    finally:
        client.close()
    received = bytes(client.wire.seen)
    assert b"data: 2\n\n" in received and received.endswith(b"\r\n0\r\n\r\n"), received
    assert b" 100 " not in received  # never a probe inside an answer
    assert running.sidecar.proxy.counters.client_disconnects == 0
    assert len(upstream.requests) == 1


async def test_a_client_gone_mid_answer_cancels_the_upstream_request(sidecar, upstreams):
    # Its FIN looks like a half-close: the answer's next write draws the reset.
    async def endless(conn: Conn, request: Message) -> bool:
        await conn.send(STREAM_HEAD + piece(b"data: 0\n\n"))
        for i in range(1, 200):  # 10 s at most
            await asyncio.sleep(0.05)
            await conn.send(piece(b"data: %d\n\n" % i))
        return False

    running, upstream = await proxied(sidecar, upstreams, endless)
    client = await Client.open(running.port)
    await client.send(post())
    await asyncio.wait_for(client.wire.until(b"data: 0\n\n"), 5)
    client.close()
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
    assert running.sidecar.proxy.counters.client_disconnects == 1


async def test_a_half_closed_client_that_had_its_100_continue_gets_no_second_one(
        sidecar, upstreams):
    release = asyncio.Event()

    async def held(conn: Conn, request: Message) -> bool:
        await asyncio.wait_for(release.wait(), 5)
        await conn.send(echo_body(request))
        return True

    running, _ = await proxied(sidecar, upstreams, held)
    client = await Client.open(running.port)
    try:
        await client.send(request_head(2, b"Expect: 100-continue\r\n"))
        assert (await client.response(b"POST")).status == 100
        await client.send(b"{}")
        conn = await the_connection(running)
        client.writer.write_eof()
        await until(lambda: conn._half_closed or conn.closed)
        release.set()
        answer = await client.final(b"POST")
        assert answer.status == 200 and answer.body == b"/v1/chat/completions|{}"
        assert await client.closed()
    finally:
        client.close()
    assert bytes(client.wire.seen).count(b"100 Continue") == 1, bytes(client.wire.seen)


async def test_a_running_answer_past_the_keep_alive_deadline_is_not_looked_at_again(
        sidecar, upstreams, monkeypatch):
    # A pipelined request's answer starts with the keep-alive deadline of the one before;
    # once the sweep has seen it run, it leaves the connection alone until the answer ends.
    monkeypatch.setattr(listener_module, "SWEEP_S", 0.05)
    monkeypatch.setattr(listener_module, "KEEPALIVE_S", 0.2)
    release = asyncio.Event()

    async def respond(conn: Conn, request: Message) -> bool:
        if request.target == b"/held":
            await asyncio.wait_for(release.wait(), 5)
        await conn.send(echo_body(request))
        return True

    running, _ = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/first") + get(b"/held"))
        assert (await client.final()).body == b"/first|"
        conn = await the_connection(running)
        await until(lambda: conn.deadline == 0.0)
        await asyncio.sleep(0.3)  # six sweeps: none sets a deadline again
        assert conn.deadline == 0.0 and conn.task is not None and not conn.closed
        release.set()
        assert (await client.final()).body == b"/held|"
    finally:
        client.close()


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


async def test_an_upgrade_with_a_body_keeps_its_method(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(b"PUT /v1/files/a HTTP/1.1\r\nHost: s\r\n"
                          + b"".join(h + b"\r\n" for h in H2C)
                          + b"Content-Length: 2\r\n\r\n{}")
        assert (await client.final(b"PUT")).body == b"/v1/files/a|{}"
    finally:
        client.close()
    [seen] = upstream.requests
    assert seen.method == b"PUT" and seen.body == b"{}"


async def test_an_http_1_0_keep_alive_upgrade_with_a_body_keeps_the_connection(sidecar,
                                                                               upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(b"POST /v1/chat/completions HTTP/1.0\r\nHost: s\r\n"
                          b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                          b"Content-Length: 2\r\n\r\n{}")
        answer = await client.final(b"POST")
        assert answer.body == b"/v1/chat/completions|{}"
        assert answer.header("connection") == b"keep-alive", answer.raw[:300]
        await client.send(b"GET /after HTTP/1.0\r\nHost: s\r\nConnection: keep-alive"
                          b"\r\n\r\n")
        assert (await client.final()).body == b"/after|"
    finally:
        client.close()
    assert [r.target for r in upstream.requests] == [b"/v1/chat/completions", b"/after"]


@pytest.mark.parametrize("body", [b"", b"GET /smuggled HTTP/1.1\r\nHost: s\r\n\r\n"],
                         ids=["no-body", "a-request-as-body"])
async def test_connect_is_refused_and_nothing_is_forwarded(sidecar, upstreams, body):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n"
                          + (b"Content-Length: %d\r\n" % len(body) if body else b"")
                          + b"\r\n" + body)
        answer = await client.final(b"CONNECT")
        assert answer.status == 501 and answer.header("connection") == b"close"
        assert error_of(answer)["code"] == "method_not_supported"
        assert await client.closed()
    finally:
        client.close()
    await asyncio.sleep(0.05)
    assert upstream.received == b""


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


async def test_a_refusal_after_a_head_answer_keeps_its_body(sidecar, upstreams):
    running, _ = await proxied(sidecar, upstreams, always(echo_target))
    client = await Client.open(running.port)
    try:
        await client.send(get(b"/a", method=b"HEAD"))
        assert (await client.final(b"HEAD")).status == 200
        await client.send(b"GET /b\x01 HTTP/1.1\r\nHost: s\r\n\r\n")
        answer = await client.final()
        assert answer.status == 400 and answer.complete, answer.raw[:300]
        assert error_of(answer)["code"] == "bad_request"
    finally:
        client.close()


async def test_a_refused_url_is_not_blamed_on_a_header(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))
    client = await Client.open(running.port)
    try:
        await client.send(b"GET /a\x01 HTTP/1.1\r\nHost: s\r\nX-Session-Id: a\x01b\r\n\r\n")
        answer = await client.final()
        error = error_of(answer)
        assert answer.status == 400 and error["code"] == "bad_request", error
        assert "x-session-id" not in error["message"].lower(), error
    finally:
        client.close()
    assert upstream.received == b""


async def test_a_refused_header_is_named_from_its_own_head_not_the_bytes_before_it(
        sidecar, upstreams):
    # An answer made without waiting (as eager tasks on 3.12+ make one) leaves the rest of
    # the read to the parser: the body before the refused head holds a bad "header" too.
    running, upstream = await proxied(sidecar, upstreams, always(echo_body))

    async def at_once(request: Any, down: Any) -> None:
        down.respond(200, b"{}")

    def eager(coro: Any) -> asyncio.Future[None]:
        with contextlib.suppress(StopIteration):
            coro.send(None)
            raise AssertionError("the handler waited")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    running.listener.handle = at_once
    running.listener.start = eager
    body = b"X-Session-Id: a\x01b\r\n"
    client = await Client.open(running.port)
    try:
        await client.send(request_head(len(body)) + body
                          + get(b"/b", [b"X-App: c\x01d"]))
        assert (await client.final(b"POST")).status == 200
        answer = await client.final()
        error = error_of(answer)
        assert answer.status == 400 and error["code"] == "bad_request", error
        assert "X-App" in error["message"], error
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
    assert running.sidecar.proxy.events.counters.internal_errors == 1


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
