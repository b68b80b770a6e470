"""Counts that agree: `/stats` (read by `top` and the demo) and Prometheus (and so
DogStatsD, which sends the same aggregates) count retries and refused requests the same
way, each once."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator

import pytest

from tests.conftest import admin, chat, dead_url
from tests.support.raw_http import error_of
from tests.support.raw_peers import Client
from tests.test_telemetry import Agent, flushed

OK = b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
          + str(len(OK)).encode() + b"\r\n\r\n" + OK)


class ClosesOnReuse:
    """Answers the first request of each connection and keeps the connection open without
    saying it will close; a second request on it is read, then the socket is closed
    unanswered, as a server does whose keep-alive timer fired as the client reused it."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if not answered:
                    break
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def closes_on_reuse() -> AsyncIterator[ClosesOnReuse]:
    upstream = ClosesOnReuse()
    yield upstream
    if upstream.server is not None:
        upstream.server.close()
        await upstream.server.wait_closed()


def prometheus_count(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def test_reconnects_after_a_lost_keep_alive_count_as_retries_everywhere(
        closes_on_reuse, sidecar, http):
    url = await closes_on_reuse.start()
    running = await sidecar({"small": {"model": "m", "endpoints": [url]}})
    calls = 5
    for i in range(calls):
        status, _, body = await chat(http, running, "reuse")
        assert status == 200, (i, body)
    async with http.get(admin(running) + "/stats") as r:
        retries = (await r.json())["proxy"]["retries"]
    async with http.get(admin(running) + "/metrics") as r:
        metrics = await r.text()
    # Every call after the first met the closed connection and went again on a fresh one.
    assert retries == calls - 1
    assert closes_on_reuse.connections == calls
    assert prometheus_count(metrics, "llm_sidecar_retries_total") == retries


# What the sidecar refuses on its own, each on a fresh raw connection: (request bytes, the
# status and error code it answers with).
REFUSED = [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
     413, "body_too_large"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"x-h%d: v\r\n" % i for i in range(130)) + b"\r\n", 431, "too_many_headers"),
    (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "bad_host"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501,
     "method_not_supported"),
    (b"GET /v1/files HTTP/1.1\r\nHost: x\r\nx-session-id: " + b"s" * 300 + b"\r\n\r\n",
     400, "invalid_session_id"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", 408, "request_timeout"),  # never ends
]


async def test_refused_requests_count_once_in_stats_and_telemetry(sidecar, http, monkeypatch):
    """The listener's refusals (never seen by the request logic) and the exchange's reach
    the one event sink: `/stats`, Prometheus and DogStatsD each show every one, once."""
    monkeypatch.setattr("sidecar.dataplane.listener.HEAD_TIMEOUT_S", 0.5)
    agent = Agent(socket.AF_INET, ("127.0.0.1", 0))
    try:
        running = await sidecar({"small": {"model": "m", "endpoints": [dead_url()]}},
                                SIDECAR_MAX_BODY_BYTES="1000", DD_AGENT_HOST="127.0.0.1",
                                DD_DOGSTATSD_PORT=str(agent.sock.getsockname()[1]))
        for raw, status, code in REFUSED:
            client = await Client.open(running.port)
            try:
                await client.send(raw)
                answer = await client.response()
                assert (answer.status, error_of(answer)["code"]) == (status, code)
            finally:
                client.writer.close()
        async with http.get(admin(running) + "/stats") as r:
            proxy = (await r.json())["proxy"]
        async with http.get(admin(running) + "/metrics") as r:
            metrics = await r.text()
        await flushed(running)
        lines = agent.drain()
    finally:
        agent.close()
    expected = {f"{status} {code}": 1 for _, status, code in REFUSED}
    assert proxy["refused_by_reason"] == expected
    assert proxy["refused"] == len(REFUSED)
    assert proxy["body_too_large"] == 1
    assert proxy["bad_requests"] == 2
    assert proxy["internal_errors"] == 0
    assert prometheus_count(metrics, "llm_sidecar_refused_total") == len(REFUSED)
    for _, status, code in REFUSED:
        series = [line for line in metrics.splitlines()
                  if line.startswith("llm_sidecar_refused_total{")
                  and f'status_code="{status}"' in line and f'reason="{code}"' in line]
        assert [float(line.rsplit(" ", 1)[1]) for line in series] == [1.0], (status, code)
    sent = [line for line in lines if line.startswith("llm_sidecar.refused:")]
    assert sum(int(line.split(":")[1].split("|")[0]) for line in sent) == len(REFUSED), sent
