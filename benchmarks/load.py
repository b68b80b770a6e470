"""Load held: a steady rate of mixed calls for a minute, then thousands of open streams.

    python benchmarks/load.py [--rate 500] [--seconds 60] [--streams 2000]

Phase 1: `--rate` calls per second (a fifth of them streamed) for `--seconds`; errors and
p50 / p99 per 10-second window (flat means the sidecar keeps up). Phase 2: `--streams`
concurrent slow streams held open (~20 s each) while the admin listener's /health is
timed every 100 ms: the sidecar must stay responsive. Loopback only; stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
import urllib.request
from collections import Counter, defaultdict

import aiohttp
from common import Fleet, chat_outcome, paced


async def steady(fleet: Fleet, rate: float, seconds: float
                 ) -> tuple[Counter[str], dict[int, list[float]]]:
    outcomes: Counter[str] = Counter()
    windows: dict[int, list[float]] = defaultdict(list)
    rng = random.Random(5)
    start = time.monotonic()

    async def call(http: aiohttp.ClientSession, n: int) -> None:
        began = time.perf_counter()
        outcomes[await chat_outcome(http, fleet.base, f"load-{n % 1000}", f"call {n}",
                                    stream=rng.random() < 0.2, max_tokens=8)] += 1
        windows[int((time.monotonic() - start) // 10)].append(
            (time.perf_counter() - began) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as http:
        await paced(rate, seconds, lambda n: call(http, n))
    return outcomes, windows


def watch_health(url: str, done: threading.Event) -> tuple[list[float], list[float]]:
    """Probe /health every 100 ms from a thread of its own (the load generator's loop is
    busy opening thousands of connections and would delay its own probes); returns the
    probe times and the proxy-loop lag each answer reported, in ms."""
    probe_ms: list[float] = []
    lag_ms: list[float] = []
    while not done.is_set():
        began = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        probe_ms.append((time.perf_counter() - began) * 1000)
        lag_ms.append(float(body.get("proxy_loop_lag_ms", 0.0)))
        time.sleep(0.1)
    return probe_ms, lag_ms


async def open_streams(fleet: Fleet, count: int
                       ) -> tuple[Counter[str], list[float], list[float]]:
    outcomes: Counter[str] = Counter()
    done = threading.Event()

    async def stream(http: aiohttp.ClientSession, n: int) -> None:
        body = {"model": "fake-model", "stream": True, "max_tokens": 20,
                "messages": [{"role": "user", "content": f"stream {n}"}]}
        try:
            async with http.post(fleet.base + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": f"stream-{n}"}) as r:
                raw = await r.read()
                outcomes["complete" if raw.rstrip().endswith(b"[DONE]") else "incomplete"] += 1
        except aiohttp.ClientError as exc:
            outcomes[type(exc).__name__] += 1

    connector = aiohttp.TCPConnector(limit=count + 10)
    watcher = asyncio.create_task(asyncio.to_thread(watch_health, fleet.admin + "/health",
                                                    done))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(stream(http, n) for n in range(count)))
    done.set()
    probe_ms, lag_ms = await watcher
    return outcomes, probe_ms, lag_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    fleet = Fleet(2, ["--ttft-ms", "5"])
    try:
        outcomes, windows = asyncio.run(steady(fleet, args.rate, args.seconds))
    finally:
        fleet.stop()
    print(f"\n### {args.rate:g} calls/s for {args.seconds:g} s (a fifth streamed)\n")
    print("| window | calls | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---|")
    for window in sorted(windows):
        values = sorted(windows[window])
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"| {window * 10}-{window * 10 + 10} s | {len(values)} | "
              f"{statistics.median(values):.1f} | {p99:.1f} |")
    print(f"outcomes: {dict(outcomes)}")

    # ~20 s per stream: 20 tokens at 1 token/s
    fleet = Fleet(4, ["--ttft-ms", "50", "--tokens-per-s", "1"],
                  env={"SIDECAR_BOUNDED_LOAD_FACTOR": "0"})
    try:
        streams, health, lag = asyncio.run(open_streams(fleet, args.streams))
    finally:
        fleet.stop()
    print(f"\n### {args.streams} concurrent streams held open (~20 s each)\n")
    print(f"streams: {dict(streams)}")
    for label, values in (("admin /health answered in", health),
                          ("proxy loop lag it reported", lag)):
        values.sort()
        print(f"{label}: {len(values)} probes, median {statistics.median(values):.1f} ms, "
              f"p99 {values[min(len(values) - 1, int(len(values) * 0.99))]:.1f} ms, "
              f"max {values[-1]:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
