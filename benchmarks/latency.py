"""Added latency of the sidecar over calling fake-llm directly, and its memory per session.

    python benchmarks/latency.py [--rounds 5] [--duration 5] [--redis] [--sessions 100000]

fake-llm and the load generator (wrk) run on core 0, the sidecar on core 1 (as the peers'
harness pins them). Direct and proxied runs alternate (A B A B …) and the table gives
medians over rounds; "added" is the per-round difference, then its median. Raw figures go
to benchmarks/results/. Timings are for a shared, noisy 2-core machine: compare within
one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
from common import HERE, ROOT, free_port, pinned, rss_bytes, wait_http, wrk

from tests.support.redis_server import RedisServer


async def drive_sessions(base: str, count: int, concurrency: int = 32) -> int:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1}
    failures = 0
    queue = iter(range(count))

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal failures
        for i in queue:
            async with http.post(base + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": f"bench-session-{i}"}) as r:
                await r.read()
                failures += r.status != 200

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return failures


def first_touch_us(url: str, calls: int) -> tuple[float, float]:
    """Median µs of a call on a warm session and of a call on a new session, interleaved
    one by one at c=1 on one keep-alive connection; the difference is what a session's
    first touch costs (with Redis: its one round trip)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body = json.dumps({"model": "fake-model", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi"}]})
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    warm: list[float] = []
    new: list[float] = []
    marker = time.monotonic_ns()
    for i in range(calls * 2):
        session = "bench" if i % 2 == 0 else f"first-touch-{marker}-{i}"
        started = time.perf_counter()
        connection.request("POST", parts.path, body=body,
                           headers={"Content-Type": "application/json",
                                    "x-session-id": session})
        connection.getresponse().read()
        (warm if i % 2 == 0 else new).append((time.perf_counter() - started) * 1e6)
    connection.close()
    return statistics.median(warm), statistics.median(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--redis", action="store_true", help="use a real Redis route store")
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--dogstatsd", action="store_true",
                        help="send telemetry to a DogStatsD socket this script reads")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2

    processes: list[subprocess.Popen[bytes]] = []
    redis = None
    try:
        fake_port, port, admin_port = free_port(), free_port(), free_port()
        processes.append(subprocess.Popen(
            pinned(0, [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(fake_port)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        env = {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
               "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
               "SIDECAR_POOLS": json.dumps({"small": {
                   "model": "fake-model", "endpoints": [f"http://127.0.0.1:{fake_port}"]}}),
               "SIDECAR_ROUTE_CACHE_SIZE": str(max(args.sessions * 2, 1000))}
        if args.redis:
            redis = RedisServer().start()
            env["SIDECAR_REDIS_URL"] = redis.url
        if args.dogstatsd:
            agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            agent.bind(("127.0.0.1", 0))
            agent.settimeout(0.2)
            received = [0]

            def read() -> None:
                while received[0] >= 0:
                    with contextlib.suppress(OSError):
                        received[0] += agent.recv(65536).count(b"\n") + 1

            threading.Thread(target=read, daemon=True).start()
            env["DD_AGENT_HOST"] = "127.0.0.1"
            env["DD_DOGSTATSD_PORT"] = str(agent.getsockname()[1])
        sidecar = subprocess.Popen(pinned(1, [sys.executable, "-m", "sidecar", "serve"]),
                                   env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        processes.append(sidecar)
        direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
        proxied = f"http://127.0.0.1:{port}/v1/chat/completions"
        wait_http(f"http://127.0.0.1:{fake_port}/health")
        wait_http(f"http://127.0.0.1:{admin_port}/ready")
        wrk(proxied, 1, 1, "bench")  # warm connections and the session's route
        rss_idle = rss_bytes(sidecar.pid)

        rounds = []
        for _ in range(args.rounds):
            row = {"direct_c1": wrk(direct, 1, args.duration, "bench"),
                   "sidecar_c1": wrk(proxied, 1, args.duration, "bench"),
                   "direct_c32": wrk(direct, 32, args.duration, "bench"),
                   "sidecar_c32": wrk(proxied, 32, args.duration, "bench", sidecar.pid)}
            rounds.append(row)

        warm_us, new_us = first_touch_us(proxied, 2000)
        # Per-route memory is counted from here: the load rounds above grow buffers and
        # telemetry reservoirs that have nothing to do with routes.
        rss_loaded = rss_bytes(sidecar.pid)
        failures = asyncio.run(drive_sessions(f"http://127.0.0.1:{port}", args.sessions))
        time.sleep(0.5)
        rss_after = rss_bytes(sidecar.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats") as r:
            stats = json.loads(r.read())
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
        if redis is not None:
            redis.cleanup()

    def med(key: str, field: str) -> float:
        return statistics.median(r[key][field] for r in rounds)

    def added(field: str) -> float:
        return statistics.median(r["sidecar_c1"][field] - r["direct_c1"][field]
                                 for r in rounds)

    store = ("Redis" if args.redis else "in-memory") + (
        ", telemetry to a DogStatsD socket" if args.dogstatsd else "")
    print(f"\n### Sidecar vs direct fake-llm ({args.rounds} rounds × {args.duration:g} s, "
          f"store: {store})\n")
    print("| target | p50 c=1 (µs) | p99 c=1 (µs) | req/s c=1 | req/s c=32 | p99 c=32 (µs) "
          "| CPU µs/req c=32 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("direct", "sidecar"):
        cpu = f"{med('sidecar_c32', 'cpu_us'):.0f}" if name == "sidecar" else "–"
        print(f"| {name} | {med(name + '_c1', 'p50_us'):.0f} | {med(name + '_c1', 'p99_us'):.0f}"
              f" | {med(name + '_c1', 'rps'):.0f} | {med(name + '_c32', 'rps'):.0f}"
              f" | {med(name + '_c32', 'p99_us'):.0f} | {cpu} |")
    print(f"\nadded by the sidecar at c=1: p50 +{added('p50_us'):.0f} µs, "
          f"p99 +{added('p99_us'):.0f} µs (median of per-round differences)")
    print(f"first touch of a session (c=1, 2 000 each, interleaved): warm session "
          f"{warm_us:.0f} µs, new session {new_us:.0f} µs: +{new_us - warm_us:.0f} µs")
    cached = stats["routes"]["cached"]
    print(f"RSS: idle {rss_idle / 2**20:.1f} MiB, after the load rounds "
          f"{rss_loaded / 2**20:.1f} MiB, after {args.sessions} distinct sessions "
          f"{rss_after / 2**20:.1f} MiB ({cached} routes cached, "
          f"{(rss_after - rss_loaded) / max(cached, 1):.0f} bytes per route); "
          f"failed session calls: {failures}")
    errors = sum(r[k]["errors"] + r[k]["non_2xx"] for r in rounds for k in r)
    print(f"wrk errors / non-2xx over all runs: {errors}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "rounds": rounds, "rss_idle": rss_idle,
                                "rss_loaded": rss_loaded, "rss_after": rss_after,
                                "stats": stats}, indent=1))
    print(f"raw: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
