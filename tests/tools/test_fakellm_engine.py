"""fake-llm's simulated engine: bounded running sequences, the waiting queue, a KV cache in
tokens with LRU eviction, and vLLM's metric names on /metrics."""

from __future__ import annotations

import asyncio

import aiohttp
from hypothesis import given
from hypothesis import strategies as st

from sidecar.fleet.podload import parse_metrics
from sidecar.tools.fakellm.engine import Clairvoyant, Engine, count_tokens
from tests.support.polling import until


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            values[line.partition("{")[0]] = float(line.rsplit(" ", 1)[1])
    return values


def chat(content: str, max_tokens: int = 4, stream: bool = True) -> dict:
    return {"model": "m", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}


async def test_metrics_page_has_vllm_names_types_and_token_counts(pods, http):
    [pod] = await pods(1, model="m", max_tokens=4)
    prompt = "p" * 400  # 100 tokens
    for _ in range(2):
        async with http.post(pod.url + "/v1/chat/completions", json=chat(prompt)) as r:
            await r.read()
    async with http.get(pod.url + "/metrics") as r:
        text = await r.text()
    for name, kind in (("vllm:num_requests_running", "gauge"),
                       ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"),
                       ("vllm:gpu_cache_usage_perc", "gauge"),
                       ("vllm:prefix_cache_queries_total", "counter"),
                       ("vllm:prefix_cache_hits_total", "counter"),
                       ("vllm:prompt_tokens_total", "counter"),
                       ("vllm:generation_tokens_total", "counter")):
        assert f"# TYPE {name} {kind}" in text
    assert 'vllm:num_requests_running{model_name="m",engine="0"} 0.0' in text
    values = await metrics(http, pod.url)
    assert values["vllm:prompt_tokens_total"] == 200
    assert values["vllm:generation_tokens_total"] == 8
    assert values["vllm:prefix_cache_queries_total"] == 200   # tokens looked up
    assert values["vllm:prefix_cache_hits_total"] == 100      # the second call's prompt
    assert values["vllm:request_success_total"] == 2


async def test_running_sequences_are_bounded_and_the_rest_wait(pods, http):
    [pod] = await pods(1, max_num_seqs=2, tokens_per_s=40, max_tokens=40)  # ~1 s each

    async def one(i: int) -> int:
        async with http.post(pod.url + "/v1/chat/completions", json=chat(f"c{i}", 40)) as r:
            await r.read()
            return r.status

    calls = [asyncio.create_task(one(i)) for i in range(5)]

    async def queued() -> bool:
        v = await metrics(http, pod.url)
        return v["vllm:num_requests_running"] == 2 and v["vllm:num_requests_waiting"] == 3
    await until(queued)
    page = parse_metrics((await (await http.get(pod.url + "/metrics")).read()), 0)
    assert (page.running, page.waiting) == (2, 3)
    assert await asyncio.gather(*calls) == [200] * 5
    v = await metrics(http, pod.url)
    assert v["vllm:num_requests_running"] == 0 and v["vllm:num_requests_waiting"] == 0


async def test_kv_usage_is_the_running_sequences_share_of_the_cache(pods, http):
    [pod] = await pods(1, kv_cache_tokens=1000, tokens_per_s=20, max_tokens=50)
    call = asyncio.create_task(http.post(pod.url + "/v1/chat/completions",
                                         json=chat("k" * 800, 50)))  # 200 + 50 tokens

    async def running() -> bool:
        return (await metrics(http, pod.url))["vllm:num_requests_running"] == 1
    await until(running)
    v = await metrics(http, pod.url)
    assert v["vllm:kv_cache_usage_perc"] == 0.25 == v["vllm:gpu_cache_usage_perc"]
    call.cancel()


async def test_a_sequence_waits_for_kv_room_not_only_for_a_slot(pods, http):
    [pod] = await pods(1, kv_cache_tokens=300, tokens_per_s=20, max_tokens=40)
    first = asyncio.create_task(http.post(pod.url + "/v1/chat/completions",
                                          json=chat("a" * 800, 40)))   # 240 tokens

    async def one_running() -> bool:
        return (await metrics(http, pod.url))["vllm:num_requests_running"] == 1
    await until(one_running)
    second = asyncio.create_task(http.post(pod.url + "/v1/chat/completions",
                                           json=chat("b" * 800, 40)))

    async def second_waits() -> bool:
        return (await metrics(http, pod.url))["vllm:num_requests_waiting"] == 1
    await until(second_waits)
    for task in (first, second):
        response = await task
        assert response.status == 200
        await response.read()


def test_prefix_cache_evicts_least_recently_used_conversations_by_tokens():
    engine = Engine()
    a, b = ["a" * 400], ["b" * 400]          # 100 tokens each
    assert engine.lookup(a, 4096, 250) == 100
    assert engine.lookup(b, 4096, 250) == 100
    assert engine.lookup(a, 4096, 250) == 0  # a is now the most recent
    engine.lookup(["c" * 400], 4096, 250)    # 300 tokens > 250: b (least recent) leaves
    assert engine.cached_tokens == 200
    assert engine.lookup(a, 4096, 250) == 0
    assert engine.lookup(b, 4096, 250) == 100


def test_a_grown_conversation_hits_its_cached_prefix():
    engine = Engine()
    turn1 = ["s" * 400, "u" * 40]
    engine.lookup(turn1, 4096, 0)
    turn2 = [*turn1, "assistant answer", "u2" * 20]
    assert engine.lookup(turn2, 4096, 0) == count_tokens("assistant answer") + 10
    assert engine.prefix_hit_tokens == 110


# Conversations that share prefixes: a few system prompts, then a few messages each.
prompts = st.lists(st.lists(st.sampled_from(["s" * 400, "t" * 800, "u" * 40, "v" * 4, "w"]),
                            min_size=1, max_size=4), min_size=1, max_size=30)


@given(prompts.filter(lambda calls: len(calls) >= 2))
def test_uncached_tells_what_lookup_would_and_changes_nothing(calls):
    """A router mirroring the engine weighs a pod with `uncached`: the same count the
    engine's lookup then returns, with the cache and its counters untouched."""
    engine = Engine()
    for segments in calls:
        before = (dict(engine._prefixes), engine.prefix_queries, engine.prefix_hit_tokens)
        told = engine.uncached(segments)
        assert (dict(engine._prefixes), engine.prefix_queries,
                engine.prefix_hit_tokens) == before
        assert engine.lookup(segments, 4096, 0) == told


@given(prompts, st.lists(st.integers(0, 3), min_size=30, max_size=30),
       st.sampled_from([0, 150, 1000]))
def test_no_placement_beats_the_clairvoyant_cache(calls, placement, capacity):
    """Calls spread over four pods by any placement, with or without eviction: each call
    prefills at least the tokens no earlier call had, and the pods' hit rate never
    exceeds the clairvoyant one."""
    pods = [Engine() for _ in range(4)]
    bound = Clairvoyant()
    for segments, pod in zip(calls, placement, strict=False):
        floor = bound.lookup(segments)
        assert pods[pod].lookup(segments, 4096, capacity) >= floor
    hits = sum(p.prefix_hit_tokens for p in pods)
    queried = sum(p.prefix_queries for p in pods)
    assert queried == bound.tokens
    assert hits / queried <= bound.hit_rate + 1e-12
    # one pod that never evicts takes every call: the bound is reached exactly
    alone, again = Engine(), Clairvoyant()
    assert [alone.lookup(s, 10**6, 0) for s in calls] == [again.lookup(s) for s in calls]
