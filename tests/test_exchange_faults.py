"""The request logic under upstream faults, on real sockets: what a retry or a resume sends,
to whom, and how many times each pod is asked (fake-llm pods count their requests)."""

from __future__ import annotations

import json

from tests.conftest import CHAT, base, chat, pool

POOL_KEY = "sk-pool-key-0123456789"


async def test_a_resumed_stream_carries_the_pools_key_never_the_apps(pods, sidecar, http,
                                                                     monkeypatch):
    a, b = await pods(2, max_tokens=20)
    monkeypatch.setenv("TEST_POOL_KEY", POOL_KEY)
    running = await sidecar({"keyed": pool([a, b], resume=True, api_key_env="TEST_POOL_KEY")},
                            TEST_POOL_KEY=POOL_KEY)
    status, headers, _ = await chat(http, running, "keyed", Authorization="Bearer app-token")
    assert status == 200
    first = a if headers["x-sidecar-endpoint"] == a.url else b
    other = b if first is a else a
    assert first.fake.last_headers["Authorization"] == f"Bearer {POOL_KEY}"
    first.fake.behaviour.update({"drop_after_chunks": 6, "drop_next": 1})  # dies mid-stream
    before = other.requests
    async with http.post(base(running) + "/v1/chat/completions",
                         json={**CHAT, "max_tokens": 20, "stream": True},
                         headers={"x-session-id": "keyed",
                                  "Authorization": "Bearer app-token"}) as r:
        raw = await r.read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]", raw[-300:]
    assert other.requests == before + 1, "the continuation went to the other pod"
    assert other.fake.last_request is not None
    assert other.fake.last_request["continue_final_message"] is True
    assert other.fake.last_headers["Authorization"] == f"Bearer {POOL_KEY}"
    assert "app-token" not in json.dumps(other.fake.last_headers)
    assert running.sidecar.proxy.counters.resumes == 1
