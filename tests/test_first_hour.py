"""What a new user meets: messages that say what is wrong and what to do, and `top`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.conftest import admin, chat, dead_url, pool


async def test_nothing_listening_upstream_says_what_to_check(sidecar, http):
    url = dead_url()
    running = await sidecar({"small": {"model": "m", "endpoints": [url]}})
    status, _, body = await chat(http, running, "new-user")
    assert status == 503
    message = body["error"]["message"]
    assert f"nothing accepted a connection at {url}" in message
    assert "Is the model server running" in message and "SIDECAR_POOLS" in message


async def test_pods_still_starting_says_so(pods, sidecar, http):
    [pod] = await pods(1, cold_start_s=30)
    running = await sidecar({"small": pool([pod], health_path="/health")})
    status, _, body = await chat(http, running, "early")
    assert status == 503
    assert "still be starting (a cold start)" in body["error"]["message"]
    assert "GET /endpoints" in body["error"]["message"]


async def test_redis_unreachable_says_what_to_check(pods, sidecar_process):
    [pod] = await pods(1)
    process = await sidecar_process({
        "SIDECAR_POOLS": json.dumps({"small": pool([pod])}),
        "SIDECAR_REDIS_URL": dead_url().replace("http://", "redis://") + "/0"}).start()
    process.process.terminate()
    await process.wait()
    log = process.output()
    assert "is not reachable at start" in log
    assert "Check SIDECAR_REDIS_URL and that Redis is running" in log


async def test_top_shows_a_running_sidecar(pods, sidecar, http):
    small = await pods(2)
    running = await sidecar({"small": pool(small)})
    for i in range(6):
        await chat(http, running, f"top-{i % 2}")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "top", "--admin", admin(running), "--once",
        "--interval", "0.2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "load level low" in text
    assert "route cache hit rate" in text and "66.7%" in text  # 4 hits of 6
    for pod in small:
        assert pod.url in text
    assert text.count("ready") >= 2


def test_top_without_a_sidecar_says_where_to_look():
    done = subprocess.run([sys.executable, "-m", "sidecar", "top", "--admin", dead_url(),
                           "--once"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Is the sidecar running?" in done.stdout
    assert "SIDECAR_ADMIN_LISTEN" in done.stdout
