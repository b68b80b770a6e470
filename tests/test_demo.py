"""`llm-sidecar demo` (what `make run` starts): serves a chat call with embedded defaults and
stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp

from tests.redis_server import free_port


async def test_demo_serves_on_embedded_defaults_and_stops_on_ctrl_c():
    port, admin = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{admin}", "--cold-start-s", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:  # every simulated pod has finished its (scaled-down) cold start
                    async with http.get(f"http://127.0.0.1:{admin}/endpoints") as r:
                        pools = await r.json()
                    states = {e["state"] for p in pools.values() for e in p["endpoints"]}
                    if states == {"ready"}:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "demo did not become ready"
                await asyncio.sleep(0.05)
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json={"model": "llama-3.1-8b-instruct",
                                       "messages": [{"role": "user", "content": "hi"}]},
                                 headers={"x-session-id": "demo"}) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"]
                assert r.headers["x-sidecar-pool"] in ("small", "large")
            async with http.get(f"http://127.0.0.1:{admin}/stats") as r:
                assert (await r.json())["store"]["kind"] == "memory"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 0
        text = output.decode()
        assert "curl" in text and "from openai import OpenAI" in text
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
