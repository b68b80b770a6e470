"""Forwarding: any method and path, headers and bytes intact, streaming as it arrives, the
official OpenAI client, and sticky sessions."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import openai
import pytest
from yarl import URL

from tests.conftest import CHAT, base, chat, pool


async def test_any_method_path_and_query_are_forwarded_with_headers(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    url = URL(base(running) + "/custom/path?a=1&b=two%20words", encoded=True)
    async with http.put(url, data=b"xyz",
                        skip_auto_headers=["User-Agent", "Accept", "Accept-Encoding"],
                        headers={"x-session-id": "s", "x-app": "kept",
                                 "Connection": "keep-alive, x-hop",
                                 "x-hop": "dropped", "Keep-Alive": "timeout=5"}) as r:
        assert r.status == 200
        seen = await r.json()
    assert seen["method"] == "PUT"
    assert seen["path"] == "/custom/path"
    assert seen["raw_path"] == "/custom/path?a=1&b=two%20words"
    assert seen["body_bytes"] == 3
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-app"] == "kept"
    assert headers["x-session-id"] == "s"
    assert "x-hop" not in headers, "headers named in Connection are hop-by-hop"
    assert "keep-alive" not in headers
    # The sidecar adds no request headers of its own (no user agent, no accept-encoding).
    assert "user-agent" not in headers
    assert "accept-encoding" not in headers


async def test_response_bytes_and_sidecar_headers(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    async with http.get(f"{pod.url}/health") as r:
        direct = await r.read()
    async with http.get(base(running) + "/health", headers={"x-session-id": "abc"}) as r:
        proxied = await r.read()
        assert r.headers["x-sidecar-session"] == "abc"
        assert r.headers["x-sidecar-pool"] == "small"
        assert r.headers["x-sidecar-endpoint"] == pod.url
        assert r.headers["x-sidecar-attempts"] == "1"
        assert r.headers["x-sidecar-model"] == "small-model"
        assert "x-sidecar-fallback" not in r.headers
    assert proxied == direct


async def test_request_body_reaches_upstream_unchanged(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    # Odd spacing and key order must survive: the primary pool's request is never re-encoded.
    raw = b'{ "messages":[{"content":"hi","role":"user"}],   "model":"small-model" }'
    async with http.post(base(running) + "/v1/chat/completions", data=raw,
                         headers={"content-type": "application/json"}) as r:
        assert r.status == 200
    assert pod.fake.last_request == {"messages": [{"content": "hi", "role": "user"}],
                                     "model": "small-model"}


async def test_sse_is_forwarded_chunk_by_chunk_as_it_arrives(pods, sidecar, http):
    [pod] = await pods(1, tokens_per_s=20, max_tokens=10)
    running = await sidecar({"small": pool([pod])})
    body = {**CHAT, "stream": True}
    async with http.post(base(running) + "/v1/chat/completions", json=body,
                         headers={"x-session-id": "s"}) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await r.content.readline()
        # The first event reached us while the upstream was still generating: nothing buffered.
        assert first.startswith(b"data: ")
        assert pod.fake.counters.completed == 0
        assert pod.fake.counters.inflight == 1
        rest = await r.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert pod.fake.counters.completed == 1


async def test_openai_sdk_async_streaming_and_not(pods, sidecar):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    client = openai.AsyncOpenAI(base_url=base(running) + "/v1", api_key="unused",
                                default_headers={"x-session-id": "sdk"})
    try:
        answer = await client.chat.completions.create(model="small-model",
                                                      messages=[{"role": "user",
                                                                 "content": "hi"}])
        assert answer.choices[0].message.content.startswith("tok0")
        assert answer.usage is not None and answer.usage.completion_tokens == 16
        stream = await client.chat.completions.create(
            model="small-model", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and
                  c.choices[0].delta.content]
        assert "".join(pieces) == answer.choices[0].message.content
        models = await client.models.list()
        assert [m.id for m in models.data] == ["small-model", "auto"]  # the sidecar's list
        embedding = await client.embeddings.create(model="small-model", input="hello")
        assert len(embedding.data[0].embedding) == 16
    finally:
        await client.close()


async def test_openai_sdk_sync_client(pods, sidecar):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})

    def call() -> tuple[str, list[str]]:
        client = openai.OpenAI(base_url=base(running) + "/v1", api_key="unused", max_retries=0)
        with client:
            answer = client.completions.create(model="small-model", prompt="hi", max_tokens=4)
            stream = client.chat.completions.create(
                model="small-model", messages=[{"role": "user", "content": "hi"}],
                stream=True, max_tokens=4)
            return answer.choices[0].text, [c.choices[0].delta.content or "" for c in stream
                                            if c.choices]

    text, pieces = await asyncio.to_thread(call)
    assert text.split() == ["tok0-" + text.split()[0].split("-")[1], "tok1", "tok2", "tok3"]
    assert "".join(pieces).split()[1:] == ["tok1", "tok2", "tok3"]


async def test_one_session_sticks_to_one_endpoint(pods, sidecar, http):
    small = await pods(3)
    running = await sidecar({"small": pool(small)})
    endpoints = set()
    for _ in range(50):
        status, headers, _ = await chat(http, running, "sticky-session")
        assert status == 200
        endpoints.add(headers["x-sidecar-endpoint"])
    assert len(endpoints) == 1
    assert sorted(p.requests for p in small)[-1] == 50


async def test_sessions_spread_over_the_pool(pods, sidecar, http):
    small = await pods(2)
    running = await sidecar({"small": pool(small)})
    served = Counter()
    for i in range(40):
        status, headers, _ = await chat(http, running, f"conversation-{i}")
        assert status == 200
        served[headers["x-sidecar-endpoint"]] += 1
    # Rendezvous hashing spreads sessions; 40 sessions over 2 pods never land all on one.
    assert set(served) == {p.url for p in small}
    assert min(served.values()) >= 8


async def test_without_session_header_a_connection_is_a_session(pods, sidecar):
    small = await pods(4)
    running = await sidecar({"small": pool(small)})
    seen = []
    for _ in range(3):
        async with aiohttp.ClientSession() as http:  # one keep-alive connection each
            endpoints = set()
            for _ in range(5):
                status, headers, _ = await chat(http, running, session=None)
                assert status == 200
                endpoints.add(headers["x-sidecar-endpoint"])
                session = headers["x-sidecar-session"]
            assert len(endpoints) == 1
            seen.append(session)
    assert len(set(seen)) == 3, "each connection is its own session"


async def test_selector_header_pins_the_pool(pods, sidecar, http):
    small, large = await pods(1), await pods(1)
    routes = '{"low":{"small":8,"large":8},"medium":{"small":8,"large":8},' \
             '"high":{"small":8,"large":8}}'
    running = await sidecar({"small": pool(small), "large": pool(large, "large-model")},
                            SIDECAR_ROUTES=routes)
    for i in range(6):
        _, headers, _ = await chat(http, running, f"pinned-low-{i}", **{"x-sidecar-selector": "3"})
        assert headers["x-sidecar-pool"] == "small"
        _, headers, _ = await chat(http, running, f"pinned-high-{i}",
                                   **{"x-sidecar-selector": "12"})
        assert headers["x-sidecar-pool"] == "large"


@pytest.mark.parametrize("level,expected", [("low", {"small"}), ("high", {"small", "large"})])
async def test_load_level_chooses_the_routing_table(pods, sidecar, http, level, expected):
    small, large = await pods(1), await pods(1)
    routes = '{"low":{"small":16},"medium":{"small":12,"large":4},"high":{"small":8,"large":8}}'
    running = await sidecar({"small": pool(small), "large": pool(large, "large-model")},
                            SIDECAR_ROUTES=routes, SIDECAR_LOAD_LEVEL=level)
    pools = set()
    for i in range(32):
        _, headers, _ = await chat(http, running, f"level-{i}")
        pools.add(headers["x-sidecar-pool"])
    assert pools == expected


async def test_api_key_env_replaces_the_apps_authorization(pods, sidecar, http, monkeypatch):
    [pod] = await pods(1)
    monkeypatch.setenv("TEST_POOL_KEY", "sk-secret-value")
    running = await sidecar({"external": pool([pod], api_key_env="TEST_POOL_KEY")},
                            TEST_POOL_KEY="sk-secret-value")
    status, _, _ = await chat(http, running, Authorization="Bearer app-token")
    assert status == 200
    assert pod.fake.last_headers["Authorization"] == "Bearer sk-secret-value"


async def test_apps_authorization_is_forwarded_without_api_key_env(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    await chat(http, running, Authorization="Bearer app-token")
    assert pod.fake.last_headers["Authorization"] == "Bearer app-token"
