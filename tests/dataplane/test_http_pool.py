"""Upstream keep-alive, observed from the upstream's side of the socket: connections are
reused, never after an answer that did not end cleanly or that said close, a connection lost
as it was reused is retried once on a fresh one, and idle ones are closed before 5 s."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from sidecar.dataplane.upstream import HttpUpstream, Origin
from sidecar.policy.errors import Outcome
from tests.support.raw_http import Message, echo_target, error_of, get, post, response
from tests.support.raw_peers import Client, Conn, always, exchange, proxied, upstream_factory


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


def first_conn_says(reply: bytes):
    """Connection 1 answers its first request with `reply`, and anything after that with a
    500 (a reuse the sidecar should not have made); later connections echo the target."""

    async def respond(conn: Conn, request: Message) -> bool:
        if conn.number > 1:
            await conn.send(echo_target(request))
        elif len(conn.requests) == 1:
            await conn.send(reply)
        else:
            await conn.send(response(b"reused after it should not be", b"500 Reused"))
        return True

    return respond


async def test_sequential_calls_reuse_one_upstream_connection(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    for i in range(10):  # a fresh client connection (and session) each time
        answer = await exchange(running.port, get(b"/call-%d" % i))
        assert answer.status == 200 and answer.body == b"/call-%d" % i
    assert len(upstream.conns) == 1 and len(upstream.requests) == 10


async def test_concurrent_calls_open_connections_that_are_then_reused(sidecar, upstreams):
    async def slow(conn: Conn, request: Message) -> bool:
        await asyncio.sleep(0.2)  # keep all four in flight together
        await conn.send(echo_target(request))
        return True

    running, upstream = await proxied(sidecar, upstreams, slow)
    for _ in range(2):
        answers = await asyncio.gather(*(exchange(running.port, get(b"/c%d" % i))
                                         for i in range(4)))
        assert [a.body for a in answers] == [b"/c%d" % i for i in range(4)]
    assert len(upstream.conns) == 4 and len(upstream.requests) == 8


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "http-1.0"])
async def test_a_connection_that_said_close_is_not_reused(sidecar, upstreams, reply):
    # The upstream keeps the socket open anyway: only the sidecar's reading of the answer
    # keeps it from sending the next request there.
    running, upstream = await proxied(sidecar, upstreams, first_conn_says(reply))
    assert (await exchange(running.port, get(b"/first"))).body == b"ok"
    assert (await exchange(running.port, get(b"/second"))).body == b"/second"
    assert len(upstream.conns) == 2 and len(upstream.conns[0].requests) == 1
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 2)


async def test_a_connection_whose_answer_the_app_abandoned_is_not_reused(sidecar, upstreams):
    # The app hangs up mid-answer: the rest of that answer would still arrive on the
    # upstream connection, ahead of whatever answer is read from it next. (Its FIN alone
    # reads like a half-close; the answer's next piece draws the reset that tells.)
    partial = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n5\r\nfirst\r\n")
    hung_up = asyncio.Event()

    async def respond(conn: Conn, request: Message) -> bool:
        if conn.number > 1:
            await conn.send(echo_target(request))
            return True
        await conn.send(partial)
        await asyncio.wait_for(hung_up.wait(), 5)
        await conn.send(b"6\r\nsecond\r\n")
        return True

    running, upstream = await proxied(sidecar, upstreams, respond)
    client = await Client.open(running.port)
    await client.send(get(b"/first"))
    await asyncio.wait_for(client.wire.until(b"first"), 5)
    client.close()
    hung_up.set()
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 5)
    assert (await exchange(running.port, get(b"/second"))).body == b"/second"
    assert len(upstream.conns) == 2 and len(upstream.conns[0].requests) == 1


async def test_a_connection_whose_answer_timed_out_is_not_reused(sidecar, upstreams):
    async def late(conn: Conn, request: Message) -> bool:
        if request.target == b"/slow":
            await asyncio.sleep(0.6)  # past the first-byte budget: the answer goes stale
            await conn.send(response(b"stale answer of /slow"))
        else:
            await conn.send(echo_target(request))
        return True

    running, upstream = await proxied(sidecar, upstreams, late, SIDECAR_MAX_ATTEMPTS="1",
                                      SIDECAR_RESPONSE_TIMEOUT_S="0.3")
    timed_out = await exchange(running.port, get(b"/slow"))
    assert timed_out.status >= 500
    assert error_of(timed_out)["tried"][0]["outcome"] == "first_byte_timeout"
    await asyncio.sleep(0.5)  # the stale answer has been written by now
    assert (await exchange(running.port, get(b"/fresh"))).body == b"/fresh"
    assert [r.target for r in upstream.conns[0].requests] == [b"/slow"]


def call(method: bytes, target: bytes) -> bytes:
    return post(target) if method == b"POST" else get(target)


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_a_connection_lost_as_it_is_reused_is_retried_once_on_a_fresh_one(
        sidecar, upstreams, method):
    async def closes_when_reused(conn: Conn, request: Message) -> bool:
        if conn.number == 1 and len(conn.requests) == 2:
            return False  # the server had just timed the connection out: no answer
        await conn.send(echo_target(request))
        return True

    running, upstream = await proxied(sidecar, upstreams, closes_when_reused)
    assert (await exchange(running.port, call(method, b"/first"), method)).body == b"/first"
    answer = await exchange(running.port, call(method, b"/second"), method)
    assert answer.status == 200 and answer.body == b"/second"
    assert [[r.target for r in c.requests] for c in upstream.conns] == \
        [[b"/first", b"/second"], [b"/second"]]


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_a_request_lost_on_fresh_connections_is_sent_at_most_twice(sidecar, upstreams,
                                                                        method):
    # Each copy may have started a generation upstream: one retry, then a clear error.
    async def never_answers(conn: Conn, request: Message) -> bool:
        return False

    running, upstream = await proxied(sidecar, upstreams, never_answers)
    answer = await exchange(running.port, call(method, b"/lost"), method)
    assert answer.status >= 500 and error_of(answer)["code"]
    assert len(upstream.requests) <= 2, f"sent {len(upstream.requests)} times"


async def test_idle_upstream_connections_are_closed_before_5_s(sidecar, upstreams):
    # Model servers (uvicorn, vLLM) close idle keep-alive connections at 5 s: reusing one
    # at that instant races their close, so the sidecar must close first.
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    assert (await exchange(running.port, get())).status == 200
    answered = time.monotonic()
    await asyncio.wait_for(upstream.conns[0].closed_by_peer.wait(), 6)
    idle = time.monotonic() - answered
    assert idle < 5.0, f"the idle connection was kept {idle:.1f} s"
    assert idle > 0.5, "closed at once: keep-alive is not kept at all"


async def test_a_call_that_waited_for_a_busy_endpoint_was_never_sent_and_says_so(
        sidecar, upstreams, monkeypatch):
    """All of an endpoint's connections busy until the deadline: the waiting call was never
    sent, so it is `pool_full` (another pod may take it), not a timeout of work a pod held."""
    monkeypatch.setattr("sidecar.dataplane.upstream.PER_ENDPOINT", 1)

    async def slow(conn: Conn, request: Message) -> bool:
        if request.target != b"/busy":
            await conn.send(echo_target(request))
            return True
        # An answer that keeps its connection busy past the other call's deadline.
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            await conn.send(b"5\r\nbusy\n\r\n")
            await asyncio.sleep(0.1)
        await conn.send(b"0\r\n\r\n")
        return True

    running, upstream = await proxied(sidecar, upstreams, slow, SIDECAR_MAX_ATTEMPTS="1",
                                      SIDECAR_RESPONSE_TIMEOUT_S="0.4")
    busy = asyncio.create_task(exchange(running.port, get(b"/busy")))
    await asyncio.sleep(0.1)
    waited = await exchange(running.port, get(b"/waited"))
    assert error_of(waited)["tried"][0]["outcome"] == "pool_full"
    assert waited.status == 503
    await busy
    sent = [r.target for c in upstream.conns for r in c.requests]
    assert b"/waited" not in sent


async def test_a_slot_freed_by_a_failed_connect_goes_to_the_waiting_call(monkeypatch):
    """With the endpoint's one slot taken by a connect that then fails, the call waiting for
    it is woken and tries at once, instead of sleeping to its deadline as `pool_full`."""
    monkeypatch.setattr("sidecar.dataplane.upstream.PER_ENDPOINT", 1)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    url = f"http://127.0.0.1:{refused.getsockname()[1]}"
    upstream = HttpUpstream(connect_timeout=2.0, idle_timeout=3.0)
    try:
        deadline = upstream.loop.time() + 5.0
        first = asyncio.create_task(upstream.send(url, b"GET", b"/", b"", b"", deadline))
        await asyncio.sleep(0)  # the first holds the slot while it connects
        second = asyncio.create_task(upstream.send(url, b"GET", b"/", b"", b"", deadline))
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert outcomes == [Outcome.CONNECT_ERROR, Outcome.CONNECT_ERROR]
        assert upstream.in_use() == 0
    finally:
        refused.close()
        await upstream.aclose()


async def test_a_freed_slot_skips_waiters_that_already_gave_up():
    origin = Origin("http://127.0.0.1:1", None)
    loop = asyncio.get_running_loop()
    gone, waiting = loop.create_future(), loop.create_future()
    gone.cancel()
    origin.waiters = [gone, waiting]
    origin.wake_one()
    assert waiting.done() and not origin.waiters


async def test_a_reply_held_past_its_release_never_reaches_the_next_requests_answer(upstreams):
    """A stale reference to a reply (held by whatever still had it after its release) stays
    inert: the connection it gave back carries the next request's answer to the next reply
    alone, a pause through it pauses nothing, and releasing it again gives back no slot."""
    peer = await upstreams(always(echo_target))
    upstream = HttpUpstream(connect_timeout=2.0, idle_timeout=3.0)
    try:
        deadline = upstream.loop.time() + 10.0
        first = await upstream.send(peer.url, b"GET", b"/first", b"", b"", deadline)
        assert not isinstance(first, Outcome)
        assert await asyncio.wait_for(first.read(), 10) == b"/first"
        first.release()
        second = await upstream.send(peer.url, b"GET", b"/second", b"", b"", deadline)
        assert not isinstance(second, Outcome)
        assert len(peer.conns) == 1, "the connection was reused for the second request"
        stale: list[bytes] = []
        first.pipe(stale.append)
        first.pause()
        first.release()
        assert upstream.in_use() == 1, "the stale release gave back the second's slot"
        assert await asyncio.wait_for(second.read(), 10) == b"/second"
        assert b"/second" not in b"".join(stale)
        second.release()
        assert upstream.in_use() == 0
    finally:
        await upstream.aclose()
