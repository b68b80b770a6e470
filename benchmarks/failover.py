"""A pod dies under steady load: what does the app see?

    python benchmarks/failover.py [--seconds 12] [--rate 100] [--kill-at 4] [--stream-share 0.5]

Two fake-llm pods (separate processes) behind one sidecar process; a paced load of
sessions (a mix of streaming and non-streaming calls) runs for --seconds; at --kill-at one
pod is SIGKILLed. Every call's outcome, attempts and latency are recorded. Reported:
app-visible failures by kind, and the latency the failover added to the calls it affected
(median of calls that needed more than one attempt minus median of those that did not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import aiohttp
from common import free_port, wait_http


async def one_call(http: aiohttp.ClientSession, base: str, session: str, stream: bool
                   ) -> dict[str, object]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": f"hi {session}"}],
            "max_tokens": 20, "stream": stream}
    started = time.perf_counter()
    record: dict[str, object] = {"stream": stream, "t": time.monotonic()}
    try:
        async with http.post(base + "/v1/chat/completions", json=body,
                             headers={"x-session-id": session}) as r:
            raw = await r.read()
            record["status"] = r.status
            record["attempts"] = int(r.headers.get("x-sidecar-attempts", "0"))
            if r.status == 200 and stream and not raw.rstrip().endswith(b"[DONE]"):
                record["status"] = "truncated"
            elif stream and b"upstream_broken_mid_stream" in raw:
                record["status"] = "broken_mid_stream"
    except aiohttp.ClientPayloadError:
        record["status"] = "broken_mid_stream"
    except aiohttp.ClientError as exc:
        record["status"] = type(exc).__name__
    record["latency_ms"] = (time.perf_counter() - started) * 1000
    return record


async def drive(base: str, seconds: float, rate: float, stream_share: float,
                kill: tuple[float, subprocess.Popen[bytes]]) -> list[dict[str, object]]:
    kill_at, victim = kill
    records: list[dict[str, object]] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    killed = False
    n = 0
    rng = random.Random(7)

    async def run(session: str, stream: bool) -> None:
        records.append(await one_call(http, base, session, stream))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        while (elapsed := time.monotonic() - start) < seconds:
            if not killed and elapsed >= kill_at:
                victim.send_signal(signal.SIGKILL)
                killed = True
            # Interleaved at random (seeded): a fixed pattern could line the kill up with
            # only one kind of call in flight.
            stream = rng.random() < stream_share
            task = asyncio.create_task(run(f"session-{n % 60}", stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rate", type=float, default=100, help="calls per second")
    parser.add_argument("--kill-at", type=float, default=4)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--resume", action="store_true",
                        help="turn on mid-stream resume for the pool")
    parser.add_argument("--tokens-per-s", type=float, default=200,
                        help="fake-llm generation speed (a 20-token answer takes 0.1 s)")
    args = parser.parse_args()

    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port(), free_port()]
        for port in ports:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(port),
                 "--ttft-ms", "20", "--tokens-per-s", str(args.tokens_per_s)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        port, admin = free_port(), free_port()
        env = {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
               "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
               "SIDECAR_POOLS": json.dumps({"small": {
                   "model": "fake-model", "health_path": "/health", "health_interval_s": 1,
                   "resume": args.resume,
                   "endpoints": [f"http://127.0.0.1:{p}" for p in ports]}})}
        sidecar = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(sidecar)
        for p in ports:
            wait_http(f"http://127.0.0.1:{p}/health")
        wait_http(f"http://127.0.0.1:{admin}/ready")
        time.sleep(1.5)  # both endpoints probed ready
        records = asyncio.run(drive(f"http://127.0.0.1:{port}", args.seconds, args.rate,
                                    args.stream_share, (args.kill_at, processes[0])))
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats") as r:
            stats = json.loads(r.read())
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=10)

    outcomes = Counter(str(r["status"]) for r in records)
    ok = [r for r in records if r["status"] == 200]
    first_try = [float(r["latency_ms"]) for r in ok if r["attempts"] == 1]
    affected = [float(r["latency_ms"]) for r in ok if int(r["attempts"]) > 1]
    print(f"\n### One of two pods SIGKILLed at {args.kill_at:g} s of {args.seconds:g} s "
          f"({args.rate:g} calls/s, {args.stream_share:.0%} streaming, resume "
          f"{'on' if args.resume else 'off'})\n")
    print("| calls | succeeded | app-visible failures | needed a retry | "
          "median latency, first try (ms) | median latency, retried (ms) | added (ms) |")
    print("|---|---|---|---|---|---|---|")
    failures = len(records) - len(ok)
    added = (statistics.median(affected) - statistics.median(first_try)) if affected else 0.0
    print(f"| {len(records)} | {len(ok)} | {failures} | {len(affected)} | "
          f"{statistics.median(first_try):.1f} | "
          f"{statistics.median(affected) if affected else float('nan'):.1f} | {added:.1f} |")
    print(f"\noutcomes: {dict(outcomes)}")
    print(f"sidecar: retries {stats['proxy']['retries']}, prefill retries "
          f"{stats['proxy']['prefill_retries']}, broken streams "
          f"{stats['proxy']['broken_streams']}, resumes {stats['proxy']['resumes']}, "
          f"route changes "
          f"{stats['routes']['route_changes']}")
    retried = Counter("streaming" if r["stream"] else "non-streaming"
                      for r in ok if int(r["attempts"]) > 1)
    print(f"retried calls: {dict(retried)}")
    by_kind = Counter((r["stream"], str(r["status"])) for r in records if r["status"] != 200)
    if by_kind:
        print("failures by kind (streaming?, outcome):", dict(by_kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
