"""`llm-sidecar demo --engine llama` (`make run-engine`): the same story on llama.cpp pods
with the real model: no failed call, the large pod's (delayed) start reported as its cold
start, then a call served and a clean stop on Ctrl-C."""

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
import pytest

from sidecar.tools.llamaserver import free_port

pytestmark = pytest.mark.engine


async def test_the_demo_tells_its_story_on_llama_server_pods(engine):
    port, admin = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "demo", "--engine", "llama",
         "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
         "--cold-start-s", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "the story did not finish: " + "".join(lines)
            await asyncio.sleep(0.2)
        story = "".join(lines)
        assert "on llama.cpp" in story and "SmolLM2-135M-Instruct" in story
        for act in ("Act 1", "Act 2", "Act 3", "Act 4"):
            assert act in story
        assert "cold start event: large-0 ready" in story, story
        summary = story[story.index("summary"):]
        failures = next(line for line in summary.splitlines()
                        if "failures seen by the app" in line)
        assert failures.split()[-1] == "0", story
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "llama-3.1-8b-instruct", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-session-id": "after-the-story"}) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        # The demo and its pods share a process group: end all of them, whatever happened.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
