"""Fixtures of the real-engine tier: llama.cpp's `llama-server` pods on loopback (one thread
each, two slots), the SmolLM2-135M model, and helpers to call them directly or through the
sidecar and compare what came back.

Every module here is marked `engine` (deselected by default). Without the engine installed
the tests skip, unless LLMSC_REQUIRE_ENGINE=1 (`make test-engine`, CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.tools.llamaserver import (
    EngineMissing,
    LlamaPod,
    binary_path,
    engine_version,
    model_path,
)

MODEL = "smollm2"


def pytest_report_header() -> str:
    try:
        return f"llama-server: {binary_path()} ({engine_version()}); model: {model_path().name}"
    except EngineMissing as exc:
        return f"llama-server: {exc}"


@pytest.fixture(scope="session")
def engine() -> None:
    """Skip (or, when the engine is required, fail) without llama-server and the model."""
    try:
        binary_path()
        model_path()
    except EngineMissing as exc:
        if os.environ.get("LLMSC_REQUIRE_ENGINE"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


LlamaFactory = Callable[..., list[LlamaPod]]


@pytest.fixture
def llama(engine: None, tmp_path: Path) -> Iterator[LlamaFactory]:
    """Start llama-server pods: `llama(2)` starts two and waits until both are loaded;
    `llama(1, wait=False)` returns at once (the pod is still starting); `start=False`
    only reserves a port (`pod.start()` later). Every pod is
    stopped at the end, whatever happened."""
    started: list[LlamaPod] = []

    def make(count: int = 1, wait: bool = True, start: bool = True, **options: Any
             ) -> list[LlamaPod]:
        options.setdefault("alias", MODEL)
        made = []
        for _ in range(count):
            index = len(started)
            pod = LlamaPod(log=tmp_path / f"llama-{index}.log", **options)
            started.append(pod)
            made.append(pod.start() if start else pod)
        if wait and start:
            for pod in made:
                pod.wait_ready()
        return made

    yield make
    for pod in started:
        with contextlib.suppress(Exception):
            pod.stop()
        with contextlib.suppress(Exception):
            pod.kill()


def body(content: str, max_tokens: int = 24, stream: bool = False, **extra: Any
         ) -> dict[str, Any]:
    """A deterministic chat call: temperature 0, a fixed seed."""
    data: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, "temperature": 0, "seed": 7,
                            "stream": stream, **extra}
    if stream:
        data["stream_options"] = {"include_usage": True}
    return data


def sse_events(raw: bytes) -> list[Any]:
    """The `data:` payloads of an SSE body, parsed (`[DONE]` kept as the string)."""
    events: list[Any] = []
    for frame in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in frame.split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


# Fields that differ between two identical generations: ids, clocks, timings.
VOLATILE = ("id", "created", "timings", "system_fingerprint")


def comparable(event: Any) -> Any:
    if isinstance(event, dict):
        return {k: v for k, v in event.items() if k not in VOLATILE}
    return event


def content_of(events: list[Any]) -> str:
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for event in events if isinstance(event, dict)
                   for choice in event.get("choices") or [])


async def post(http: aiohttp.ClientSession, url: str, data: dict[str, Any],
               **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with http.post(url + "/v1/chat/completions", json=data, headers=headers,
                         timeout=aiohttp.ClientTimeout(total=90)) as response:
        return response.status, dict(response.headers), await response.read()


async def metrics(pod: LlamaPod) -> dict[str, float]:
    """The pod's llamacpp:* series, read off the event loop (the sidecar shares it)."""
    return await asyncio.to_thread(pod.metrics)


def session_on(running: Any, pool: str, url: str, prefix: str, count: int = 1) -> list[str]:
    """Session ids whose first rendezvous choice in `pool` is the endpoint `url`."""
    ranked = running.sidecar.pools.pools[pool].ranked
    found = [s for s in (f"{prefix}-{i}" for i in range(4096))
             if ranked(s.encode())[0].url == url]
    assert len(found) >= count
    return found[:count]
