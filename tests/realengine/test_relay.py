"""What the app gets through the sidecar is what llama.cpp's server sends: at temperature 0,
a call through the sidecar to one pod and the same call straight to a twin pod (same binary,
same model, cold caches both) give the same frames and the same usage; only ids, clocks and
timings differ. The stream's role-only preamble is held until the first content frame, so
a pod that dies during prefill is retried with nothing sent to the app."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from tests.conftest import base
from tests.realengine.conftest import (
    MODEL,
    body,
    comparable,
    content_of,
    metrics,
    post,
    session_on,
    sse_events,
)
from tests.support.polling import until

pytestmark = pytest.mark.engine


async def test_a_stream_through_the_sidecar_is_the_engines_own(llama, sidecar, http):
    served, twin = llama(2)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [served.url]}})
    data = body("Name three colours.", max_tokens=24, stream=True)

    status, _, direct = await post(http, twin.url, data)
    relayed_status, headers, relayed = await post(http, base(running), data,
                                                  **{"x-session-id": "exact"})

    assert status == relayed_status == 200
    assert headers["x-sidecar-endpoint"] == served.url
    want, got = sse_events(direct), sse_events(relayed)
    assert [comparable(e) for e in got] == [comparable(e) for e in want]
    assert content_of(got), "the model said something"
    # llama.cpp's shape, relayed frame for frame: a role-only preamble whose content is
    # null, the tokens, a finish frame, the usage frame (no choices), [DONE].
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert got[-2]["choices"] == [] and got[-2]["usage"]["prompt_tokens"] > 0
    assert got[-1] == "[DONE]"
    # Byte for byte apart from the volatile fields: the preamble frame was held, not dropped
    # or rewritten, and the whole stream is in the engine's framing.
    assert relayed.count(b"data: ") == direct.count(b"data: ")
    assert relayed.startswith(b"data: ") and relayed.endswith(b"data: [DONE]\n\n")


async def test_a_whole_answer_through_the_sidecar_is_the_engines_own(llama, sidecar, http):
    served, twin = llama(2)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [served.url]}})
    data = body("What is the capital of France?", max_tokens=24)

    status, _, direct = await post(http, twin.url, data)
    relayed_status, _, relayed = await post(http, base(running), data,
                                            **{"x-session-id": "exact"})

    assert status == relayed_status == 200
    want, got = orjson.loads(direct), orjson.loads(relayed)
    assert comparable(got) == comparable(want)
    assert got["choices"][0]["message"]["content"]
    assert got["usage"] == want["usage"]


async def test_the_sidecar_counts_the_engines_usage(llama, sidecar, http):
    """The token tally (traffic for the scaler, telemetry) reads llama.cpp's usage object,
    whose keys come in alphabetical order (completion_tokens first)."""
    served, = llama(1)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [served.url]}})
    telemetry = running.sidecar.telemetry
    usages = []
    for stream in (False, True):
        _, _, raw = await post(http, base(running), body("Say hello.", 16, stream=stream),
                               **{"x-session-id": f"usage-{stream}"})
        events = sse_events(raw) if stream else [orjson.loads(raw)]
        usages.append(next(e["usage"] for e in events if isinstance(e, dict)
                           and e.get("usage")))
    assert telemetry.counter_total("prompt_tokens") == sum(u["prompt_tokens"] for u in usages)
    assert telemetry.counter_total("completion_tokens") == \
        sum(u["completion_tokens"] for u in usages)


async def test_without_usage_the_estimate_is_one_token_per_content_frame(llama, sidecar, http):
    """docs/reference.md: without reported usage a stream's completion tokens are estimated
    as "a token per streamed content frame"."""
    served, = llama(1)
    running = await sidecar({"small": {"model": MODEL, "endpoints": [served.url]}})
    data = body("Name three colours.", max_tokens=24, stream=True)
    data.pop("stream_options")
    _, _, raw = await post(http, base(running), data, **{"x-session-id": "estimate"})
    content_frames = sum(
        1 for e in sse_events(raw) if isinstance(e, dict) and e["choices"]
        and e["choices"][0]["delta"].get("content"))
    assert content_frames > 0
    assert running.sidecar.telemetry.counter_total("completion_tokens") == content_frames


LONG_PROMPT = "Summarise the following notes in one line.\n" + "\n".join(
    f"Note {i}: the shipment of crate {i * 7 % 101} left dock {i % 9} on day {i % 31}."
    for i in range(50))


async def test_a_pod_killed_during_prefill_is_retried_with_nothing_sent(llama, sidecar, http):
    """With `return_progress`, llama.cpp answers 200 and sends role-only progress frames
    while it reads the prompt. The sidecar holds them (they carry no content): the pod
    SIGKILLed during prefill is retried on the other pod, and the app gets one whole
    answer: the other pod's, equal to an uninterrupted one."""
    first, second = llama(2, ctx=8192, extra=("-b", "64", "-ub", "64"))
    running = await sidecar({"small": {"model": MODEL, "endpoints": [first.url, second.url]}},
                            SIDECAR_FIRST_BYTE_TIMEOUT_S="120")
    data = body(LONG_PROMPT, max_tokens=12, stream=True, return_progress=True)

    # The engine's side of the claim: progress preambles arrive during a long prefill.
    started = time.monotonic()
    _, _, direct = await post(http, second.url, data)
    prefill_s = time.monotonic() - started
    progress = [e for e in sse_events(direct)
                if isinstance(e, dict) and "prompt_progress" in e]
    assert len(progress) >= 3, "llama.cpp sent no progress frames during prefill"
    assert all(e["choices"][0]["delta"].get("content") is None for e in progress)

    session, = session_on(running, "small", first.url, "prefill")
    call = asyncio.create_task(post(http, base(running), data, **{"x-session-id": session}))
    async def processing() -> bool:
        return (await metrics(first))["requests_processing"] >= 1

    await until(processing, "the call reached its pod", timeout=30)
    # Prefill takes about `prefill_s`; killing a quarter of the way in is well inside it.
    await asyncio.sleep(prefill_s / 4)
    assert (await metrics(first))["tokens_predicted_total"] == 0, "already past prefill"
    first.kill()
    status, headers, relayed = await call

    assert status == 200
    assert headers["x-sidecar-endpoint"] == second.url
    assert running.sidecar.proxy.counters.prefill_retries == 1
    events = sse_events(relayed)
    assert events[-1] == "[DONE]"
    assert content_of(events) == content_of(sse_events(direct))
    assert not any(isinstance(e, dict) and "error" in e for e in events)
