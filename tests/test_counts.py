"""Counts that agree: `/stats` (read by `top` and the demo) and Prometheus (and so
DogStatsD, which sends the same aggregates) count retries the same way."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from tests.conftest import admin, chat

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
