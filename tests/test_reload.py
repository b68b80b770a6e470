"""SIGHUP re-reads SIDECAR_POOLS_FILE: endpoints added start warming (or ready without a
health path), removed ones drain, a bad file keeps the running configuration, and no
request fails while it happens."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp

from tests.conftest import chat, pool


async def endpoints(http: aiohttp.ClientSession, admin: str) -> dict[str, str]:
    async with http.get(admin + "/endpoints") as r:
        data = await r.json()
    return {e["url"]: e["state"] for p in data.values() for e in p["endpoints"]}


async def test_sighup_reloads_the_pools_file(pods, sidecar_process, tmp_path):
    a, b, c = await pods(3)
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"small": pool([a, b])}))
    process = await sidecar_process({"SIDECAR_POOLS_FILE": str(path)}).start()
    async with aiohttp.ClientSession() as http:
        assert await endpoints(http, process.admin) == {a.url: "ready", b.url: "ready"}
        path.write_text(json.dumps({"small": pool([a, c])}))
        process.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if set(await endpoints(http, process.admin)) == {a.url, c.url}:
                break
            await asyncio.sleep(0.05)
        assert await endpoints(http, process.admin) == {a.url: "ready", c.url: "ready"}

        # A broken file is refused; the running configuration stays.
        path.write_text("{ not json")
        process.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await endpoints(http, process.admin) == {a.url: "ready", c.url: "ready"}
        async with http.get(process.admin + "/stats") as r:
            assert (await r.json())["reloads"] == 1
        async with http.post(process.base + "/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 200


async def test_reload_under_load_fails_no_request(pods, sidecar, http, tmp_path):
    a, b, c = await pods(3, ttft_ms=5)
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"small": pool([a, b])}))
    running = await sidecar({}, SIDECAR_POOLS="", SIDECAR_POOLS_FILE=str(path))
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            status, _, _ = await chat(http, running, f"load-{worker}-{n % 7}")
            statuses.append(status)
            n += 1

    workers = [asyncio.create_task(load(i)) for i in range(8)]
    await asyncio.sleep(0.2)
    for endpoints_now in ([a, c], [c], [a, b, c], [b]):
        path.write_text(json.dumps({"small": pool(endpoints_now)}))
        assert running.sidecar.reload()
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*workers)
    assert len(statuses) > 100
    assert set(statuses) == {200}
    states = {e.url: e.state.value for e in running.sidecar.pools.all_endpoints()}
    assert states == {b.url: "ready"}
    assert all(e.inflight == 0 for e in running.sidecar.pools.all_endpoints())


async def test_sessions_on_a_removed_endpoint_move_and_others_stay(pods, sidecar, http, tmp_path):
    a, b, c = await pods(3)
    path = tmp_path / "pools.json"
    path.write_text(json.dumps({"small": pool([a, b, c])}))
    running = await sidecar({}, SIDECAR_POOLS="", SIDECAR_POOLS_FILE=str(path))
    before = {}
    for i in range(30):
        _, headers, _ = await chat(http, running, f"move-{i}")
        before[f"move-{i}"] = headers["x-sidecar-endpoint"]
    path.write_text(json.dumps({"small": pool([a, c])}))
    assert running.sidecar.reload()
    for session, endpoint in before.items():
        status, headers, _ = await chat(http, running, session)
        assert status == 200
        if endpoint != b.url:
            assert headers["x-sidecar-endpoint"] == endpoint
        else:
            assert headers["x-sidecar-endpoint"] in (a.url, c.url)
