"""The simulated model server: the OpenAI shapes, cold start, prefix cache and faults."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.support.redis_server import free_port

CHAT = {"model": "asked-model", "messages": [{"role": "user", "content": "hello there"}]}


async def test_chat_echoes_the_model_and_reports_usage(pods, http):
    [pod] = await pods(1, max_tokens=5)
    async with http.post(pod.url + "/v1/chat/completions", json=CHAT) as r:
        body = await r.json()
    assert body["model"] == "asked-model"
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


async def test_stream_has_preamble_content_usage_and_done(pods, http):
    [pod] = await pods(1)
    async with http.post(pod.url + "/v1/chat/completions",
                         json={**CHAT, "stream": True, "max_tokens": 3,
                               "stream_options": {"include_usage": True}}) as r:
        raw = await r.read()
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:4]]
    assert len(content) == 3 and all(content)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_same_prompt_same_answer_on_every_pod(pods, http):
    a, b = await pods(2)
    answers = []
    for pod in (a, b):
        async with http.post(pod.url + "/v1/completions",
                             json={"model": "m", "prompt": "same"}) as r:
            answers.append((await r.json())["choices"][0]["text"])
    assert answers[0] == answers[1]


async def test_cold_start_answers_503_until_warm(pods, http):
    [pod] = await pods(1, cold_start_s=0.3)
    async with http.get(pod.url + "/health") as r:
        assert r.status == 503
    async with http.post(pod.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "1"
    await asyncio.sleep(0.35)
    async with http.get(pod.url + "/health") as r:
        assert r.status == 200


async def test_prefix_cache_counts_hits_per_pod(pods, http):
    [pod] = await pods(1)
    turn1 = {"model": "m", "messages": [{"role": "user", "content": "a" * 400}]}
    turn2 = {"model": "m", "messages": [*turn1["messages"],
                                        {"role": "assistant", "content": "b"},
                                        {"role": "user", "content": "c"}]}
    for body in (turn1, turn2):
        async with http.post(pod.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
    assert pod.fake.counters.prefix_hits == 1
    assert pod.fake.engine.lookup(["a" * 400, "b", "c", "d"], 4096, 0) == 1


async def test_faults_are_settable_at_run_time(pods, http):
    [pod] = await pods(1)
    async with http.post(pod.url + "/_control",
                         json={"fail_next": 2, "fail_status": 429, "retry_after": "7"}) as r:
        assert (await r.json())["behaviour"]["fail_next"] == 2
    statuses = []
    for _ in range(3):
        async with http.post(pod.url + "/v1/chat/completions", json=CHAT) as r:
            statuses.append((r.status, r.headers.get("Retry-After")))
    assert statuses == [(429, "7"), (429, "7"), (200, None)]
    async with http.post(pod.url + "/_control", json={"nonsense": 1}) as r:
        assert r.status == 400


async def test_drop_after_chunks_breaks_the_stream(pods, http):
    [pod] = await pods(1, drop_after_chunks=2, max_tokens=10)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(pod.url + "/v1/chat/completions",
                             json={**CHAT, "stream": True}) as r:
            await r.read()
    assert pod.fake.counters.dropped_streams == 1


async def test_hang_holds_requests_until_released(pods, http):
    [pod] = await pods(1)
    async with http.post(pod.url + "/_control", json={"hang": True}):
        pass
    call = asyncio.ensure_future(http.post(pod.url + "/v1/chat/completions", json=CHAT))
    await asyncio.sleep(0.2)
    assert not call.done()
    async with http.post(pod.url + "/_control", json={"hang": False}):
        pass
    response = await asyncio.wait_for(call, 5)
    assert response.status == 200
    response.release()


def test_fake_llm_command_serves_the_named_model():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sidecar", "fake-llm", "--port",
                                str(port), "--model", "tiny-model", "--serves", "tiny"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        import urllib.request
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
                    ids = [m["id"] for m in json.loads(r.read())["data"]]
                    assert ids == ["tiny-model", "tiny"]
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


async def test_continue_final_message_goes_on_from_the_partial_answer(pods, http):
    [pod] = await pods(1)
    async with http.post(pod.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 6}) as r:
        whole = (await r.json())["choices"][0]["message"]["content"]
    partial = " ".join(whole.split()[:2]) + " "
    body = {**CHAT, "max_tokens": 4, "continue_final_message": True,
            "add_generation_prompt": False,
            "messages": [*CHAT["messages"], {"role": "assistant", "content": partial}]}
    async with http.post(pod.url + "/v1/chat/completions", json=body) as r:
        rest = (await r.json())["choices"][0]["message"]["content"]
    assert partial + rest == whole
