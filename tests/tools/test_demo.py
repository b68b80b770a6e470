"""`llm-sidecar demo` (what `make run` starts): tells the story with no failed call, then
serves a chat call with embedded defaults and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import aiohttp

from sidecar.config import load_settings
from sidecar.fleet.pools import EndpointState, PoolSet
from sidecar.tools.demo import demo_environment, warm_pools
from tests.support.redis_server import free_port


def test_the_story_waits_until_every_small_pod_is_warm():
    pools = PoolSet(load_settings(demo_environment([1, 2], [3], "127.0.0.1:0", "127.0.0.1:0")))
    small = pools.pools["small"].endpoints
    small[0].outlier.state = EndpointState.READY
    assert not warm_pools(pools), "one small pod ready is not enough"
    small[1].outlier.state = EndpointState.READY
    assert warm_pools(pools), "the large pool's cold start is part of the story"


async def test_demo_tells_the_story_then_serves_and_stops_on_ctrl_c():
    port, admin = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{port}",
         "--admin-listen", f"127.0.0.1:{admin}", "--cold-start-s", "1.5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the story did not finish: " + "".join(lines)
            await asyncio.sleep(0.1)
        story = "".join(lines)
        for act in ("Act 1", "Act 2", "Act 3", "Act 4"):
            assert act in story
        summary = story[story.index("summary"):]
        failures = next(line for line in summary.splitlines()
                        if "failures seen by the app" in line)
        assert failures.split()[-1] == "0", story
        assert "route store round trips per session" in summary
        # Act 1 starts once both small pods are warm, so its sessions spread over both.
        act1 = next(line for line in lines if "sessions per pod" in line)
        assert "small-0" in act1 and "small-1" in act1, story
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "llama-3.1-8b-instruct",
                      "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-session-id": "after-the-story"}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        reader.join(timeout=5)
        text = "".join(lines)
        assert "curl" in text and "from openai import OpenAI" in text
    finally:
        # The demo and its pods share a process group: end all of them, whatever happened.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
