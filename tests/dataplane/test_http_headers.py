"""Headers on the wire (SPEC 6): hop-by-hop fields (RFC 9110 7.6.1) and every field a
Connection header names are dropped in both directions; everything else reaches the
upstream and the app as it was sent, with nothing of the sidecar's own added."""

from __future__ import annotations

import pytest

from tests.support.raw_http import echo_target, get, response, without_sidecar_headers
from tests.support.raw_peers import always, exchange, proxied, upstream_factory


@pytest.fixture
async def upstreams():
    async with upstream_factory() as make:
        yield make


HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
              "upgrade", "trailer", "proxy-authenticate", "proxy-authorization"}


async def test_hop_by_hop_request_headers_are_not_forwarded(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, get(headers=[
        b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive",
        b"TE: trailers", b"Trailer: X-Checksum", b"Upgrade: example/1",
        b"Proxy-Authorization: Basic cHJveHk6c2VjcmV0", b"X-App: kept",
        b"Authorization: Bearer app-token"]))
    assert answer.status == 200
    [seen] = upstream.requests
    # The sidecar may send a Connection of its own upstream; the rest must be gone.
    forwarded = seen.names() & HOP_BY_HOP - {"connection"}
    assert not forwarded, f"hop-by-hop headers forwarded: {sorted(forwarded)}"
    assert seen.header("x-app") == b"kept"
    assert seen.header("authorization") == b"Bearer app-token"


async def test_request_headers_named_by_connection_are_not_forwarded(sidecar, upstreams):
    running, upstream = await proxied(sidecar, upstreams, always(echo_target))
    answer = await exchange(running.port, get(headers=[
        b"Connection: X-Conn-A ,  x-conn-b", b"Connection: X-CONN-C", b"X-Conn-A: 1",
        b"X-Conn-B: 2", b"x-conn-c: 3", b"X-Conn-D: kept"]))
    assert answer.status == 200
    [seen] = upstream.requests
    named = seen.names() & {"x-conn-a", "x-conn-b", "x-conn-c"}
    assert not named, f"headers named by Connection were forwarded: {sorted(named)}"
    assert seen.header("x-conn-d") == b"kept"


async def test_hop_by_hop_response_headers_are_not_passed_to_the_app(sidecar, upstreams):
    reply = response(b"ok", headers=[
        b"Content-Type: text/plain", b"Connection: keep-alive", b"Keep-Alive: timeout=5, max=9",
        b"Proxy-Connection: keep-alive", b'Proxy-Authenticate: Basic realm="upstream"',
        b"Trailer: X-Checksum", b"Upgrade: h2c", b"X-Kept: yes"])
    running, _ = await proxied(sidecar, upstreams, always(reply))
    answer = await exchange(running.port, get())
    assert answer.status == 200 and answer.body == b"ok"
    passed = answer.names() & HOP_BY_HOP - {"connection", "transfer-encoding"}
    assert not passed, f"hop-by-hop response headers passed to the app: {sorted(passed)}"
    assert answer.header("x-kept") == b"yes"


async def test_response_headers_named_by_connection_are_not_passed_to_the_app(sidecar,
                                                                              upstreams):
    reply = response(b"ok", headers=[
        b"Connection: X-Up-A, x-up-b", b"Connection: X-UP-C", b"X-Up-A: 1", b"X-Up-B: 2",
        b"x-up-c: 3", b"X-Up-D: kept"])
    running, _ = await proxied(sidecar, upstreams, always(reply))
    answer = await exchange(running.port, get())
    assert answer.status == 200
    named = answer.names() & {"x-up-a", "x-up-b", "x-up-c"}
    assert not named, f"headers named by the upstream's Connection passed on: {sorted(named)}"
    assert answer.header("x-up-d") == b"kept"


async def test_the_app_gets_no_header_the_upstream_did_not_send(sidecar, upstreams):
    # No Content-Type, Server or Date from the upstream: the sidecar adds none of its own.
    running, _ = await proxied(sidecar, upstreams,
                               always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    answer = await exchange(running.port, get())
    assert answer.status == 200 and answer.body == b"ok"
    assert without_sidecar_headers(answer.headers) == [], answer.raw


async def test_the_app_gets_the_upstreams_headers_in_order_with_duplicates(sidecar,
                                                                          upstreams):
    sent = [(b"Server", b"upstream/1.0"), (b"Date", b"Tue, 01 Dec 2026 00:00:00 GMT"),
            (b"Content-Type", b"application/json; charset=utf-8"),
            (b"Set-Cookie", b"a=1; Path=/"), (b"Set-Cookie", b"b=2; Path=/"),
            (b"X-Spaced", b"one  two"), (b"Cache-Control", b"no-store")]
    reply = response(b"{}", headers=[k + b": " + v for k, v in sent])
    running, _ = await proxied(sidecar, upstreams, always(reply))
    answer = await exchange(running.port, get())
    assert answer.status == 200 and answer.body == b"{}"
    got = [(k.lower(), v) for k, v in without_sidecar_headers(answer.headers)]
    assert got == [(k.lower(), v) for k, v in sent]


async def test_the_status_line_reason_is_the_upstreams(sidecar, upstreams):
    running, _ = await proxied(sidecar, upstreams,
                               always(response(b"{}", status=b"404 No Such Model Here")))
    answer = await exchange(running.port, get())
    assert answer.start == b"HTTP/1.1 404 No Such Model Here"
