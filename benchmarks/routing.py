"""Where routing pays: multi-turn sessions against pods with a prefix cache.

    python benchmarks/routing.py [--sessions 96] [--turns 4] [--concurrency 24]

Four fake-llm pods model a per-pod prefix cache (time to first token = 20 ms + 0.1 ms per
prompt token the pod has not seen for this conversation) and a concurrency limit of 8.
Each session is a conversation whose prompt grows every turn (first-turn sizes drawn from
the Azure trace's ContextTokens, seeded). Targets, one at a time, in the same run: the
sidecar (sessions by header), nginx round robin, Envoy round robin, Envoy ring hash on the
session header, and vllm-router's round_robin, consistent_hash (X-Session-ID) and
cache_aware policies when it is installed. Reported per target: mean and p99 time to first
token (first SSE content event, as the app sees it) and completed sessions per second;
then the same with a skewed load (a quarter of the sessions have four times the turns) and
a hot load (four agent sessions whose every turn is six calls at once: where consistent
hashing puts two of them on one pod, that pod is past its limit and every session hashed
there waits). Failed calls are counted, never timed. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from common import ROOT, free_port, pinned, wait_http
from peers import ENVOY, answers, nginx_conf

VLLM_ROUTER = str(Path(ENVOY).parent / "vllm-router")

TRACE = ROOT.parent / "shared" / "data" / "azure-llm-conv-2023.csv"


def first_turn_sizes(count: int, seed: int) -> list[int]:
    with TRACE.open() as fh:
        sizes = [int(r["ContextTokens"]) for r in csv.DictReader(fh)]
    rng = random.Random(seed)
    return [min(rng.choice(sizes), 4000) for _ in range(count)]


def nginx_round_robin(folder: Path, port: int, pods: list[int]) -> list[str]:
    servers = " ".join(f"server 127.0.0.1:{p};" for p in pods)
    body = (f"upstream model {{ {servers} keepalive 64; }} "
            f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://model; "
            "proxy_http_version 1.1; proxy_set_header Connection \"\"; "
            "proxy_buffering off; } }")
    return ["nginx", "-c", str(nginx_conf(folder, f"rr-{port}", body)), "-p", str(folder)]


def vllm_router(port: int, pods: list[int], policy: str) -> list[str]:
    return [VLLM_ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
            "--worker-urls", *[f"http://127.0.0.1:{p}" for p in pods],
            "--prometheus-port", str(free_port()), "--log-level", "warning",
            "--worker-startup-check-interval", "1"]


def envoy(folder: Path, port: int, pods: list[int], ring_hash: bool) -> list[str]:
    route: dict[str, object] = {"cluster": "model", "timeout": "0s"}
    if ring_hash:
        route["hash_policy"] = [{"header": {"header_name": "x-session-id"}}]
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
          "HttpConnectionManager"
    conf = folder / f"envoy-{port}.json"
    conf.write_text(json.dumps({"static_resources": {
        "listeners": [{"address": {"socket_address": {"address": "127.0.0.1",
                                                      "port_value": port}},
                       "filter_chains": [{"filters": [{
                           "name": "envoy.filters.network.http_connection_manager",
                           "typed_config": {
                               "@type": hcm, "stat_prefix": "routing",
                               "route_config": {"virtual_hosts": [{
                                   "name": "all", "domains": ["*"],
                                   "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
                               "http_filters": [{"name": "envoy.filters.http.router",
                                                 "typed_config": {
                                                     "@type": "type.googleapis.com/envoy."
                                                     "extensions.filters.http.router.v3."
                                                     "Router"}}]}}]}]}],
        "clusters": [{"name": "model", "type": "STATIC", "connect_timeout": "1s",
                      "lb_policy": "RING_HASH" if ring_hash else "ROUND_ROBIN",
                      "load_assignment": {"cluster_name": "model", "endpoints": [{
                          "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                              "address": "127.0.0.1", "port_value": p}}}}
                              for p in pods]}]}}]}}))
    return [ENVOY, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "error", "--base-id", str(port % 10000)]


async def call(http: aiohttp.ClientSession, base: str, session: str, body: dict
               ) -> tuple[int, float | None, str]:
    """One streamed call: its status, time to first content token (s) and the answer."""
    started = time.perf_counter()
    answer = []
    first_token = None
    async with http.post(base + "/v1/chat/completions", json=body,
                         headers={"x-session-id": session}) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content":"tok' in line:
                if first_token is None:
                    first_token = time.perf_counter() - started
                answer.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
        return r.status, first_token, "".join(answer)


async def conversation(http: aiohttp.ClientSession, base: str, session: str, first: int,
                       turns: int, ttfts: list[float], failures: list[str],
                       fanout: int = 1) -> None:
    """A conversation; with `fanout` > 1 every turn is that many calls at once (an agent
    sampling several continuations or calling tools in parallel)."""
    messages = [{"role": "system", "content": f"{session} " + "s" * (first * 4)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"turn {turn} " + "u" * 400})
        body = {"model": "fake-model", "stream": True, "max_tokens": 8, "messages": messages}
        results = await asyncio.gather(*(call(http, base, session, body)
                                         for _ in range(fanout)))
        for status, first_token, _ in results:
            if status != 200 or first_token is None:
                failures.append(f"status {status}")
                return  # a failed call ends the conversation; it is counted, not timed
            ttfts.append(first_token * 1000)
        messages.append({"role": "assistant", "content": results[0][2]})


async def workload(base: str, sizes: list[int], turns: list[int], concurrency: int,
                   fanouts: list[int]) -> tuple[list[float], float, list[str]]:
    ttfts: list[float] = []
    failures: list[str] = []
    slots = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(i: int) -> None:
        async with slots:
            await conversation(http, base, f"session-{i}-{started:.0f}", sizes[i], turns[i],
                               ttfts, failures, fanouts[i])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2),
                                     timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(one(i) for i in range(len(sizes))))
    return ttfts, len(sizes) / (time.monotonic() - started), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=96)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("nginx") or not Path(ENVOY).exists():
        print("needs nginx and Envoy (see benchmarks/peers.py)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="llmsc-routing-"))
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        pods = [free_port() for _ in range(4)]
        for port in pods:
            processes.append(subprocess.Popen(
                pinned(0, [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(port),
                           "--ttft-ms", "20", "--prefill-ms-per-token", "0.1",
                           "--max-concurrency", "8", "--prefix-cache-entries", "4000",
                           "--max-tokens", "8"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        targets: dict[str, int] = {}
        sidecar_port, admin = free_port(), free_port()
        env = {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{sidecar_port}",
               "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_REQUEST_LOG": "off",
               "SIDECAR_POOLS": json.dumps({"pods": {
                   "model": "fake-model", "endpoints": [f"http://127.0.0.1:{p}" for p in pods]}})}
        processes.append(subprocess.Popen(pinned(1, [sys.executable, "-m", "sidecar", "serve"]),
                                          env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        targets["llm-sidecar"] = sidecar_port
        peers = [("nginx round robin", lambda p: nginx_round_robin(folder, p, pods)),
                 ("envoy round robin", lambda p: envoy(folder, p, pods, False)),
                 ("envoy ring hash", lambda p: envoy(folder, p, pods, True))]
        if Path(VLLM_ROUTER).exists():
            peers += [(f"vllm-router {policy}", lambda p, policy=policy:
                       vllm_router(p, pods, policy))
                      for policy in ("round_robin", "consistent_hash", "cache_aware")]
        for name, argv_of in peers:
            port = free_port()
            processes.append(subprocess.Popen(pinned(1, argv_of(port)),
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            targets[name] = port
        for port in pods:
            wait_http(f"http://127.0.0.1:{port}/health")
        wait_http(f"http://127.0.0.1:{admin}/ready")
        for name, port in targets.items():  # every proxy answers before measuring
            if not answers(port, 60):
                raise RuntimeError(f"{name} did not come up")
        sizes = first_turn_sizes(args.sessions, args.seed)
        rng = random.Random(args.seed)
        hot = set(rng.sample(range(args.sessions), args.sessions // 4))
        # hot: the first four sessions (so they run from the start) are agents whose every
        # turn is 6 calls at once, for 4× the turns; where two of them share a pod it is
        # past its concurrency limit, and every other session placed there waits.
        hot_agents = range(4)
        shapes = {"even": ([args.turns] * args.sessions, [1] * args.sessions),
                  "skewed": ([args.turns * 4 if i in hot else args.turns
                              for i in range(args.sessions)], [1] * args.sessions),
                  "hot": ([args.turns * 4 if i in hot_agents else args.turns
                           for i in range(args.sessions)],
                          [6 if i in hot_agents else 1 for i in range(args.sessions)])}
        for shape, (turns, fanouts) in shapes.items():
            for name, port in targets.items():
                for pod in pods:  # every target starts with cold caches
                    subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "POST",
                                    "-H", "content-type: application/json",
                                    "-d", '{"reset": true}',
                                    f"http://127.0.0.1:{pod}/_control"], check=False)
                ttfts, rate, failures = asyncio.run(workload(
                    f"http://127.0.0.1:{port}", sizes, turns, args.concurrency, fanouts))
                ttfts.sort()
                results.setdefault(shape, {})[name] = {
                    "mean": statistics.mean(ttfts),
                    "p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
                    "sessions_per_s": rate, "calls": len(ttfts),
                    "failures": len(failures), "failure_kinds": dict(Counter(failures))}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    for shape, rows in results.items():
        detail = {"skewed": "a quarter of them with 4× the turns",
                  "hot": "four agents with 4× the turns, each turn 6 calls at once"}.get(
                      shape, f"{args.turns} turns each")
        print(f"\n### {shape} load: {args.sessions} sessions, {args.concurrency} at a time "
              f"({detail})\n")
        print("| target | mean TTFT (ms) | p99 TTFT (ms) | sessions/s | timed calls | "
              "failed calls |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['mean']:.1f} | {r['p99']:.1f} | {r['sessions_per_s']:.2f} | "
                  f"{r['calls']:.0f} | {r['failures']:.0f} |")
        kinds = {n: r["failure_kinds"] for n, r in rows.items() if r["failure_kinds"]}
        if kinds:
            print(f"\nfailed calls by answer: {kinds}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"routing-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
