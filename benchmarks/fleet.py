"""A fleet of S sidecar processes over four fake-llm pods and one Redis, with the fleet monitor
and without it (each sidecar probing and scraping by itself, as before the monitor), in one
run. Per mode and S: monitoring requests per pod per interval, Redis commands per sidecar per
second for the view (HMGET) and in all, the age of the pod load a routing decision sees
(p50/p99, sampled from each sidecar's /stats), and a pod's return to health → the first new
session routed to it.

    python benchmarks/fleet.py [--sizes 1,10,40] [--seconds 10] [--interval 1] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer, free_port  # noqa: E402

PODS = 4
COLD_S = 5.0  # past 3 failed probes at the default 1 s interval: the pod is ejected first


def spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "sidecar", *argv],
                            env={**os.environ, "SIDECAR_LOG_FORMAT": "text", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        return await response.json()


async def wait_up(http: aiohttp.ClientSession, url: str) -> None:
    timeout = 60.0
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s")
        await asyncio.sleep(0.1)


async def control(http: aiohttp.ClientSession, pod: str, **changes: Any) -> Any:
    async with http.post(pod + "/_control", json=changes) as response:
        return await response.json()


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(http: aiohttp.ClientSession, sidecars: list[str], rate: float,
                seconds: float, prefix: str) -> int:
    """New sessions at `rate` per second spread over the sidecars (each call a placement)."""
    sent = 0
    started = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()

    async def one(base: str, session: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.post(base + "/v1/chat/completions", headers={
                    "x-session-id": session}, json={"model": "auto", "messages": [
                    {"role": "user", "content": "hi"}], "max_tokens": 4}) as response:
                await response.read()

    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) + 1
        while sent < due:
            task = asyncio.create_task(one(sidecars[sent % len(sidecars)], f"{prefix}-{sent}"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.01)
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    return sent


async def sample_ages(http: aiohttp.ClientSession, admins: list[str], seconds: float,
                      ages: list[float]) -> None:
    """The age of each endpoint's load as each sidecar holds it, every 0.25 s."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for admin in admins[:10]:  # enough samples; the rest only add load
            with contextlib.suppress(aiohttp.ClientError):
                stats = await get_json(http, admin + "/stats")
                now = time.time()
                ages.extend(now - e["load"]["at"] for e in stats["endpoints"] if e["load"])
        await asyncio.sleep(0.25)


async def run(size: int, monitored: bool, pods: list[str], redis: RedisServer,
              args: argparse.Namespace) -> dict[str, Any]:
    redis.client().flushall()
    pools = {"small": {"model": "m", "endpoints": pods, "health_path": "/health",
                       "metrics_path": "/metrics", "health_interval_s": args.interval}}
    env = {"SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REDIS_URL": redis.url}
    processes: list[subprocess.Popen[bytes]] = []
    bases, admins = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                     connector=aiohttp.TCPConnector(limit=256)) as http:
        try:
            if monitored:
                port = free_port()
                processes.append(spawn(["monitor", "--stats-listen", f"127.0.0.1:{port}"],
                                       env))
                await wait_up(http, f"http://127.0.0.1:{port}/health")
                await asyncio.sleep(args.interval * 2)  # its first view is written
            for _ in range(size):
                listen, admin = free_port(), free_port()
                processes.append(spawn(["serve"], {
                    **env, "SIDECAR_LISTEN": f"127.0.0.1:{listen}",
                    "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}"}))
                bases.append(f"http://127.0.0.1:{listen}")
                admins.append(f"http://127.0.0.1:{admin}")
            for admin in admins:
                await wait_up(http, admin + "/ready")
            await asyncio.sleep(args.interval * 2)
            for pod in pods:
                await control(http, pod, reset=True)
            redis.client().config_resetstat()
            ages: list[float] = []
            started = time.monotonic()
            await asyncio.gather(drive(http, bases, args.rate, args.seconds, "steady"),
                                 sample_ages(http, admins, args.seconds, ages))
            window = time.monotonic() - started
            paths = [(await control(http, pod))["paths"] for pod in pods]
            stats = redis.client().info("commandstats")
            hits = sum(p.get("/health", 0) + p.get("/metrics", 0) for p in paths)
            total_cmds = sum(v["calls"] for k, v in stats.items()
                             if k not in ("cmdstat_config", "cmdstat_info"))
            hmget = stats.get("cmdstat_hmget", {}).get("calls", 0)

            # A pod goes away and comes back: its return → the first new session on it.
            cold = pods[0]
            await control(http, cold, restart_cold=True, cold_start_s=COLD_S, reset=True)
            load = asyncio.create_task(drive(http, bases, args.rate, COLD_S + 20, "cold"))
            healthy_at = routed_at = None
            deadline = time.monotonic() + COLD_S + 20
            while time.monotonic() < deadline:
                state = await control(http, cold)
                now = time.monotonic()
                if healthy_at is None and state["warm"]:
                    healthy_at = now
                # Requests made while it was down count too (503, retried elsewhere):
                # compare with the count when it turned healthy.
                if healthy_at is not None and state["counters"]["completed"] > 0:
                    routed_at = now
                    break
                await asyncio.sleep(0.02)
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    return {"mode": "monitor" if monitored else "each sidecar", "sidecars": size,
            "per_pod_per_interval": hits / len(pods) / (window / args.interval),
            "hmget_per_sidecar_s": hmget / size / window,
            "redis_per_sidecar_s": total_cmds / size / window,
            "age_p50": quantile(ages, 0.5), "age_p99": quantile(ages, 0.99),
            "return_to_routed_s": None if routed_at is None or healthy_at is None
            else routed_at - healthy_at}


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)
    out = [f"health_interval_s={args.interval}, {args.seconds:.0f} s of {args.rate:.0f} new "
           f"sessions/s, {PODS} fake-llm pods", "",
           "| probing | sidecars | monitoring req per pod per interval | view HMGET per "
           "sidecar/s | Redis cmds per sidecar/s | load age p50 / p99 (s) | back healthy → "
           "first session (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['sidecars']} | {r['per_pod_per_interval']:.2f} | "
                   f"{r['hmget_per_sidecar_s']:.2f} | {r['redis_per_sidecar_s']:.1f} | "
                   f"{num(r['age_p50'], '.2f')} / {num(r['age_p99'], '.2f')} | "
                   f"{num(r['return_to_routed_s'], '.2f')} |")
    return "\n".join(out)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,40")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args()
    redis = RedisServer().start()
    pod_processes, pods = [], []
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(PODS):
                port = free_port()
                pod_processes.append(spawn(["fake-llm", "--port", str(port), "--serves", "*",
                                            "--name", f"pod{i}"]))
                pods.append(f"http://127.0.0.1:{port}")
            for pod in pods:
                await wait_up(http, pod + "/_control")
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            for monitored in (True, False):
                rows.append(await run(size, monitored, pods, redis, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print(table(rows, args))
    finally:
        for process in pod_processes:
            process.terminate()
            process.wait(timeout=10)
        redis.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
