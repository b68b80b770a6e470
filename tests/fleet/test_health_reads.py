"""The prober reads a whole answer however it arrives: a real vLLM metrics page (50-200 KB)
comes in several socket reads, and a page cut at the first one would be misread."""

from __future__ import annotations

import asyncio
import json

from sidecar.config import load_settings
from sidecar.fleet.health import HealthProber
from sidecar.fleet.pools import PoolSet

PAGE_LINES = 6000  # ~300 KB, as a busy vLLM pod's histograms make it


def metrics_page() -> bytes:
    # The gauges come last, as prometheus_client prints vLLM's counters and histograms
    # first: a reader that stops early never sees them.
    filler = "".join(f'vllm:e2e_request_latency_seconds_bucket{{le="{i}",model_name="m"}} '
                     f"{i}\n" for i in range(PAGE_LINES))
    gauges = ('vllm:num_requests_running{model_name="m"} 3.0\n'
              'vllm:num_requests_waiting{model_name="m"} 2.0\n'
              'vllm:kv_cache_usage_perc{model_name="m"} 0.5\n')
    return (filler + gauges).encode()


async def serve_in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    page = metrics_page()
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                 b"content-length: %d\r\n\r\n" % len(page))
    for start in range(0, len(page), 16_384):
        writer.write(page[start:start + 16_384])
        await writer.drain()
        await asyncio.sleep(0.01)  # each piece its own read at the prober
    writer.close()


async def test_a_metrics_page_arriving_in_pieces_is_read_whole() -> None:
    server = await asyncio.start_server(serve_in_pieces, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # No metrics_path: the prober starts no loop of its own; the test scrapes once.
    pools = PoolSet(load_settings({"SIDECAR_POOLS": json.dumps(
        {"p": {"model": "m", "endpoints": [url]}})}))
    prober = HealthProber(pools)
    await prober.start()
    try:
        endpoint = pools.endpoint("p", url)
        assert endpoint is not None
        await prober.scrape(endpoint, "/metrics", 5.0)
        assert prober.scrape_failures == 0
        assert endpoint.load is not None
        assert (endpoint.load.running, endpoint.load.waiting) == (3.0, 2.0)
        assert endpoint.saturated
    finally:
        await prober.close()
        server.close()
        await server.wait_closed()
