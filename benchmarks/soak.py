"""A bounded soak: mixed streaming and non-streaming traffic with injected faults, sampling
the sidecar's RSS, open file descriptors and asyncio tasks. After warm-up the curves
should be flat.

    python benchmarks/soak.py [--seconds 600] [--rate 100] [--sample-s 10]

Faults, in turn every 20 s: a pod answers its next 30 calls with 503 + Retry-After; a pod
drops its next 10 streams mid-answer (resumed); a pod hangs its next calls past the
deadlines (504 `upstream_timeout`, never retried). Everything targets 127.0.0.1 and stops
by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import Counter

import aiohttp
from common import Fleet, chat_outcome, get_json, paced, post_json


async def drive(fleet: Fleet, seconds: float, rate: float, sample_s: float
                ) -> tuple[Counter[str], list[dict[str, float]]]:
    outcomes: Counter[str] = Counter()
    samples: list[dict[str, float]] = []
    rng = random.Random(11)
    start = time.monotonic()

    async def call(http: aiohttp.ClientSession, n: int) -> None:
        outcomes[await chat_outcome(http, fleet.base, f"soak-{n % 300}",
                                    f"turn {n} " + "x" * (n % 200),
                                    stream=rng.random() < 0.5, max_tokens=20)] += 1

    async def faults() -> None:
        kinds = [{"fail_next": 30, "fail_status": 503, "retry_after": "2"},
                 {"drop_after_chunks": 5, "drop_next": 10},
                 {"hang": True}]
        step = 0
        while time.monotonic() - start < seconds:
            await asyncio.sleep(20)
            pod = fleet.pod(step % len(fleet.pod_ports))
            change = kinds[step % len(kinds)]
            await asyncio.to_thread(post_json, pod + "/_control", change)
            if change.get("hang"):
                await asyncio.sleep(3)
                await asyncio.to_thread(post_json, pod + "/_control", {"hang": False})
            step += 1

    async def sample() -> None:
        while time.monotonic() - start < seconds:
            stats = await asyncio.to_thread(get_json, fleet.admin + "/stats")
            samples.append({"t": time.monotonic() - start, **stats["process"],
                            "requests": stats["proxy"]["requests"],
                            "inflight": stats["proxy"]["inflight"]})
            await asyncio.sleep(sample_s)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=500),
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:
        background = [asyncio.create_task(faults()), asyncio.create_task(sample())]
        await paced(rate, seconds, lambda n: call(http, n))
        for task in background:
            task.cancel()
    stats = get_json(fleet.admin + "/stats")
    samples.append({"t": time.monotonic() - start, **stats["process"],
                    "requests": stats["proxy"]["requests"], "inflight": stats["proxy"]["inflight"]})
    return outcomes, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--sample-s", type=float, default=10)
    args = parser.parse_args()
    fleet = Fleet(3, ["--ttft-ms", "20", "--tokens-per-s", "400"],
                  env={"SIDECAR_FIRST_BYTE_TIMEOUT_S": "1", "SIDECAR_RESPONSE_TIMEOUT_S": "1"})
    try:
        outcomes, samples = asyncio.run(drive(fleet, args.seconds, args.rate, args.sample_s))
    finally:
        fleet.stop()
    print(f"\n### Soak: {args.seconds:g} s at {args.rate:g} calls/s, half streamed, faults "
          "every 20 s\n")
    print("| t (s) | requests | in flight | RSS (MiB) | open fds | asyncio tasks |")
    print("|---|---|---|---|---|---|")
    for s in samples:
        print(f"| {s['t']:.0f} | {s['requests']:.0f} | {s['inflight']:.0f} | "
              f"{s['rss_bytes'] / 2**20:.1f} | {s['open_fds']:.0f} | {s['asyncio_tasks']:.0f} |")
    third = max(1, len(samples) // 3)
    middle, last = samples[third:2 * third], samples[-third:]
    for key in ("rss_bytes", "open_fds", "asyncio_tasks"):
        a = statistics.mean(s[key] for s in middle) if middle else 0
        b = statistics.mean(s[key] for s in last)
        print(f"{key}: middle third mean {a:.0f}, last third mean {b:.0f} "
              f"({(b - a) / a:+.1%})" if a else f"{key}: {b:.0f}")
    print(f"outcomes: {dict(outcomes)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
