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

from tests.redis_server import free_port


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
