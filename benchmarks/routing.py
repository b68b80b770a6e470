"""Where placement pays: multi-turn sessions from several app pods against four model pods
that queue, cache prefixes and can be saturated.

    python benchmarks/routing.py [--sessions 96] [--turns 4] [--concurrency 24] [--sidecars 3]
                                 [--loads even,skewed,hot,slow,agents] [--targets NAME,...]
                                 [--no-monitor] [--children-as-parent] [--oracle]

Four fake-llm pods run the simulated engine: 8 running sequences at most (more wait in a
queue), a KV cache of 60 000 tokens shared by the cached prefixes (least recently used
leave first), time to first token = 20 ms + 0.1 ms per prompt token not cached, 100
generated tokens/s per sequence. Each session is a conversation whose prompt grows every
turn (first-turn sizes drawn from the Azure trace's ContextTokens, seeded). The sidecar
runs as `--sidecars` processes (app pods) sharing one Redis and scraping the pods'
`/metrics`, and again (unless `--no-monitor`) as many processes sharing another Redis with
the fleet monitor, which probes the pods once and publishes the view they route on;
session i enters through app pod i mod N. Peers, one process each: nginx and
Envoy round robin, Envoy ring hash on the session header and least_request, vllm-router
round_robin, consistent_hash, cache_aware and power_of_two (those installed). Loads: even;
skewed (a quarter of the sessions with 4× the turns); hot (four agent sessions whose every
turn is six calls at once, 4× the turns); slow (the first pod at half speed); agents (parent
agents with a long shared prefix fanning out to subagents — child sessions carrying
`x-parent-session-id`, turns of parallel calls — every session's last call carrying
`x-session-final: true`; see `agent`). Reported per target:
mean and p99 time to first token (first SSE content event, as the app sees it), completed
sessions per second, and the prefix-cache hit rate from the pods' own counters (cached /
queried prompt tokens). Failed calls are counted, never timed. With `--oracle`, one more
row for reference, not a peer: `oracle_router.py`, a central router that knows every
pod's queue and cache exactly. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from common import ROOT, free_port, get_json, pinned, wait_http
from peers import ENVOY, answers, nginx_conf

from sidecar.tools.fakellm.engine import Clairvoyant
from tests.support.redis_server import RedisServer

VLLM_ROUTER = str(Path(ENVOY).parent / "vllm-router")

TRACE = Path(os.environ.get("LLMSC_TRACE",
                           ROOT.parent / "shared" / "data" / "azure-llm-conv-2023.csv"))
ENGINE = ["--ttft-ms", "20", "--prefill-ms-per-token", "0.1", "--tokens-per-s", "100",
          "--max-num-seqs", "8", "--kv-cache-tokens", "60000",
          "--prefix-cache-entries", "1000000"]
NORMAL = {"ttft_ms": 20.0, "prefill_ms_per_token": 0.1, "tokens_per_s": 100.0}
SLOW = {"ttft_ms": 40.0, "prefill_ms_per_token": 0.2, "tokens_per_s": 50.0}
SCRAPE_INTERVAL_S = 0.5
MAX_TOKENS = 32  # ~0.3 s of decode per call: as in real serving, decode outlasts prefill
STICKY = ("envoy ring hash", "vllm-router consistent_hash")
ORACLE = "reference: one router that sees every queue and cache"
# agents: a parent per 8 sessions of --sessions, a quarter of --concurrency at a time, each
# with this many subagents whose turns are this many calls at once; a parent's own prompt
# is at least AGENT_CONTEXT_TOKENS (a long system prompt and context its subagents share).
AGENT_CHILDREN = 3
AGENT_FANOUT = 2
AGENT_CONTEXT_TOKENS = 2000
SEEDED = " (children keyed as parent: seeding's upper bound)"
# Floor: what no router can beat, for the calls a run actually sent (see `Floor`).
FLOOR: Floor


class Floor:
    """A clairvoyant bound on a run (fake-llm's `Clairvoyant` cache): every pod holds every
    prompt prefix any earlier call sent, and no call ever waits for a slot. A call then
    costs the engine's fixed time plus the prefill of only the tokens no earlier call had.
    Each call's real TTFT is at least its floor, so the floors' mean and p99 bound the
    run's from below, and its hit rate bounds the pods' from above, whatever the placement."""

    def __init__(self) -> None:
        self.cache = Clairvoyant()
        self.ttfts: list[float] = []

    def send(self, messages: list[dict]) -> int:
        """Counts a call about to be sent: the tokens of its prompt no earlier call had."""
        new = self.cache.lookup([m["content"] for m in messages])
        self.ttfts.append(NORMAL["ttft_ms"] + NORMAL["prefill_ms_per_token"] * new)
        return new

    def summary(self) -> dict[str, float]:
        ttfts = sorted(self.ttfts)
        return {"mean": statistics.mean(ttfts), "p99": percentile99(ttfts),
                "hit_rate": self.cache.hit_rate}


def percentile99(ordered: list[float]) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered \
        else float("nan")


# --calls: one record per call (which pod, the queue it met, its wait, its uncached prefill
# and the tokens no earlier call had sent), tagged with the load and target being run.
CALLS: list[dict[str, object]] | None = None
CALLS_TAG: dict[str, str] = {}


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


def envoy(folder: Path, port: int, pods: list[int], lb_policy: str) -> list[str]:
    route: dict[str, object] = {"cluster": "model", "timeout": "0s"}
    if lb_policy == "RING_HASH":
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
                      "lb_policy": lb_policy,
                      "load_assignment": {"cluster_name": "model", "endpoints": [{
                          "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                              "address": "127.0.0.1", "port_value": p}}}}
                              for p in pods]}]}}]}}))
    return [ENVOY, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "error", "--base-id", str(port % 10000)]


async def call(http: aiohttp.ClientSession, base: str, session: str, body: dict,
               headers: dict[str, str] | None = None) -> tuple[int, float | None, str]:
    """One streamed call: its status, time to first content token (s) and the answer."""
    unseen = FLOOR.send(body["messages"])
    started = time.perf_counter()
    answer = []
    first_token = None
    async with http.post(base + "/v1/chat/completions", json=body,
                         headers={"x-session-id": session, **(headers or {})}) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content":"tok' in line:
                if first_token is None:
                    first_token = time.perf_counter() - started
                answer.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
        if CALLS is not None:
            arrival = r.headers.get("x-fake-arrival", "-1 -1").split()
            CALLS.append({**CALLS_TAG, "session": session, "at": started,
                          "messages": len(body["messages"]), "status": r.status,
                          "ttft": None if first_token is None else first_token * 1000,
                          "pod": r.headers.get("x-fake-pod"),
                          "running": int(arrival[0]), "waiting": int(arrival[1]),
                          "queued_ms": float(r.headers.get("x-fake-queued-ms", "nan")),
                          "uncached": int(r.headers.get("x-fake-uncached-tokens", "-1")),
                          "unseen": unseen,
                          "parent": (headers or {}).get("x-parent-session-id")})
        return r.status, first_token, "".join(answer)


async def conversation(http: aiohttp.ClientSession, base: str, session: str, first: int,
                       turns: int, ttfts: list[float], failures: list[str],
                       fanout: int = 1) -> None:
    """A conversation; with `fanout` > 1 every turn is that many calls at once (an agent
    sampling several continuations or calling tools in parallel)."""
    messages = [{"role": "system", "content": f"{session} " + "s" * (first * 4)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"turn {turn} " + "u" * 400})
        body = {"model": "fake-model", "stream": True, "max_tokens": MAX_TOKENS,
                "messages": messages}
        results = await asyncio.gather(*(call(http, base, session, body)
                                         for _ in range(fanout)))
        for status, first_token, _ in results:
            if status != 200 or first_token is None:
                failures.append(f"status {status}")
                return  # a failed call ends the conversation; it is counted, not timed
            ttfts.append(first_token * 1000)
        messages.append({"role": "assistant", "content": results[0][2]})


async def turn(http: aiohttp.ClientSession, base: str, session: str, messages: list[dict],
               fanout: int, ttfts: list[float], failures: list[str],
               headers: dict[str, str]) -> str | None:
    """One turn of `fanout` calls at once on `messages`: the first answer, None on failure."""
    body = {"model": "fake-model", "stream": True, "max_tokens": MAX_TOKENS,
            "messages": messages}
    results = await asyncio.gather(*(call(http, base, session, body, headers)
                                     for _ in range(fanout)))
    for status, first_token, _ in results:
        if status != 200 or first_token is None:
            failures.append(f"status {status}")
            return None
        ttfts.append(first_token * 1000)
    return results[0][2]


async def agent(http: aiohttp.ClientSession, base: str, session: str, first: int,
                turns: int, ttfts: list[float], failures: list[str],
                children_as_parent: bool) -> None:
    """A parent agent: a long system prompt and context, one planning turn, then
    AGENT_CHILDREN subagents at once (child sessions naming the parent in
    `x-parent-session-id`, sharing its whole prompt so far as their prefix, `turns` turns of
    AGENT_FANOUT parallel calls, then one closing call), then the parent's closing turn.
    The last call of every session carries `x-session-final: true`. With
    `children_as_parent` a child sends the parent's id as its own (the upper bound of what
    seeding a child's first placement from its parent can give)."""
    messages = [{"role": "system", "content": f"{session} " + "s" * (first * 4)},
                {"role": "user", "content": "plan the work " + "u" * 400}]
    answer = await turn(http, base, session, messages, 1, ttfts, failures, {})
    if answer is None:
        return
    messages.append({"role": "assistant", "content": answer})

    async def child(j: int) -> str | None:
        own = [*messages, {"role": "user", "content": f"subtask {j} " + "u" * 400}]
        key = session if children_as_parent else f"{session}-sub{j}"
        headers = {"x-parent-session-id": session}
        for t in range(turns):
            got = await turn(http, base, key, own, AGENT_FANOUT, ttfts, failures, headers)
            if got is None:
                return None
            own += [{"role": "assistant", "content": got},
                    {"role": "user", "content": f"tool result {t} " + "r" * 800}]
        return await turn(http, base, key, own, 1, ttfts, failures,
                          {**headers, "x-session-final": "true"})

    results = await asyncio.gather(*(child(j) for j in range(AGENT_CHILDREN)))
    if any(r is None for r in results):
        return
    messages.append({"role": "user", "content": "results: " + " | ".join(
        r[:200] for r in results if r)})
    await turn(http, base, session, messages, 1, ttfts, failures, {"x-session-final": "true"})


async def drive(count: int, concurrency: int, connections: int,
                one: Callable[[aiohttp.ClientSession, int], Awaitable[None]]) -> float:
    """`one(http, i)` for every i < count, `concurrency` at a time; the seconds it took."""
    slots = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def limited(http: aiohttp.ClientSession, i: int) -> None:
        async with slots:
            await one(http, i)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                     timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(limited(http, i) for i in range(count)))
    return time.monotonic() - started


async def agents_workload(bases: list[str], sizes: list[int], turns: int, concurrency: int,
                          prefix: str, children_as_parent: bool
                          ) -> tuple[list[float], float, list[str]]:
    """`len(sizes)` parent agents, `concurrency` at a time; sessions/s counts children."""
    ttfts: list[float] = []
    failures: list[str] = []

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        await agent(http, bases[i % len(bases)], f"{prefix}-{i}", sizes[i], turns,
                    ttfts, failures, children_as_parent)

    took = await drive(len(sizes), concurrency, concurrency * AGENT_CHILDREN * 4, one)
    return ttfts, len(sizes) * (1 + AGENT_CHILDREN) / took, failures


async def workload(bases: list[str], sizes: list[int], turns: list[int], concurrency: int,
                   fanouts: list[int], prefix: str) -> tuple[list[float], float, list[str]]:
    """Every target of a load gets the same session ids (the same hashing luck)."""
    ttfts: list[float] = []
    failures: list[str] = []

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        await conversation(http, bases[i % len(bases)], f"{prefix}-{i}", sizes[i], turns[i],
                           ttfts, failures, fanouts[i])

    took = await drive(len(sizes), concurrency, concurrency * 2, one)
    return ttfts, len(sizes) / took, failures


def pod_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(port), *ENGINE]


def sidecar_env(port: int, admin: int, pods: list[int], redis_url: str) -> dict[str, str]:
    return {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
            "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_REQUEST_LOG": "off",
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_POOLS": json.dumps({"pods": {
                "model": "fake-model", "endpoints": [f"http://127.0.0.1:{p}" for p in pods],
                "metrics_path": "/metrics", "health_interval_s": SCRAPE_INTERVAL_S}})}


def control(pod: int, changes: dict) -> None:
    subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "POST", "-H",
                    "content-type: application/json", "-d", json.dumps(changes),
                    f"http://127.0.0.1:{pod}/_control"], check=False)


def prefix_hit_rate(pods: list[int]) -> float:
    """Cached prompt tokens / prompt tokens looked up, from the pods' own vLLM counters."""
    hits = queries = 0.0
    for pod in pods:
        text = subprocess.run(["curl", "-s", f"http://127.0.0.1:{pod}/metrics"],
                              capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits / queries if queries else 0.0


def peer_targets(folder: Path, pods: list[int]) -> list[tuple[str, Callable[[int], list[str]]]]:
    peers: list[tuple[str, Callable[[int], list[str]]]] = []
    if shutil.which("nginx"):
        peers.append(("nginx round robin", lambda p: nginx_round_robin(folder, p, pods)))
    if Path(ENVOY).exists():
        peers += [(f"envoy {name}", lambda p, lb=lb: envoy(folder, p, pods, lb))
                  for name, lb in (("round robin", "ROUND_ROBIN"), ("ring hash", "RING_HASH"),
                                   ("least_request", "LEAST_REQUEST"))]
    if Path(VLLM_ROUTER).exists():
        peers += [(f"vllm-router {policy}", lambda p, policy=policy:
                   vllm_router(p, pods, policy))
                  for policy in ("round_robin", "consistent_hash", "cache_aware",
                                 "power_of_two")]
    return peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=96)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--sidecars", type=int, default=3, help="app pods, one sidecar each")
    parser.add_argument("--loads", default="even,skewed,hot,slow")
    parser.add_argument("--targets", default="",
                        help="comma-separated name filter, run in this order")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-monitor", dest="monitor", action="store_false",
                        help="leave out the sidecars that follow the fleet monitor's view")
    parser.add_argument("--children-as-parent", action="store_true",
                        help="agents load: also run the sidecar with each subagent sending "
                        "its parent's session id (seeding's upper bound)")
    parser.add_argument("--oracle", action="store_true",
                        help="also run oracle_router.py (a reference row, not a peer)")
    parser.add_argument("--calls", default="",
                        help="write one JSON line per call to this file (diagnosis)")
    args = parser.parse_args()
    global CALLS, FLOOR
    if args.calls:
        CALLS = []
    # SIGTERM unwinds through `finally`, so every process started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = Path(tempfile.mkdtemp(prefix="llmsc-routing-"))
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, dict[str, float]]] = {}
    redis = RedisServer().start()
    servers = [redis]
    try:
        pods = [free_port() for _ in range(4)]
        for port in pods:
            processes.append(subprocess.Popen(pinned(0, pod_argv(port)),
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        targets: dict[str, list[int]] = {}
        admins: dict[str, list[int]] = {}

        def sidecar_fleet(name: str, redis_url: str) -> None:
            targets[name], admins[name] = [], []
            for _ in range(args.sidecars):
                port, admin = free_port(), free_port()
                processes.append(subprocess.Popen(
                    pinned(1, [sys.executable, "-m", "sidecar", "serve"]),
                    env=sidecar_env(port, admin, pods, redis_url),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                targets[name].append(port)
                admins[name].append(admin)

        sidecar_fleet(f"llm-sidecar ×{args.sidecars}", redis.url)
        monitor_stats = None
        if args.monitor:
            # Its own Redis: a sidecar follows any fresh view in its Redis, so the scraping
            # fleet above must not see the monitor's.
            monitored = RedisServer().start()
            servers.append(monitored)
            monitor_stats = free_port()
            processes.append(subprocess.Popen(
                pinned(1, [sys.executable, "-m", "sidecar", "monitor", "--stats-listen",
                           f"127.0.0.1:{monitor_stats}"]),
                env=sidecar_env(free_port(), free_port(), pods, monitored.url),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            sidecar_fleet(f"llm-sidecar ×{args.sidecars} + monitor", monitored.url)
        for name, argv_of in peer_targets(folder, pods):
            port = free_port()
            processes.append(subprocess.Popen(pinned(1, argv_of(port)),
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
            targets[name] = [port]
        if args.oracle:
            port = free_port()
            processes.append(subprocess.Popen(
                pinned(1, [sys.executable, str(ROOT / "benchmarks" / "oracle_router.py"),
                           str(port), *map(str, pods)]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            targets[ORACLE] = [port]
        wanted = [t for t in args.targets.split(",") if t]
        if wanted:  # in the order asked (the order a load's targets run in)
            targets = {n: targets[n] for w in wanted for n in targets if w in n}
        for port in pods:
            wait_http(f"http://127.0.0.1:{port}/health")
        if monitor_stats is not None:
            wait_http(f"http://127.0.0.1:{monitor_stats}/health")
        for admin in (a for fleet in admins.values() for a in fleet):
            wait_http(f"http://127.0.0.1:{admin}/ready")
        for name, ports in targets.items():  # every proxy answers before measuring
            if not all(answers(port, 60) for port in ports):
                raise RuntimeError(f"{name} did not come up")
        sizes = first_turn_sizes(args.sessions, args.seed)
        rng = random.Random(args.seed)
        heavy = set(rng.sample(range(args.sessions), args.sessions // 4))
        # hot: the first four sessions (so they run from the start) are agents whose every
        # turn is 6 calls at once, for 4× the turns; where two of them share a pod it is
        # past its max_num_seqs, and every other session placed there waits.
        hot_agents = range(4)
        even = ([args.turns] * args.sessions, [1] * args.sessions)
        shapes = {"even": even,
                  "skewed": ([args.turns * 4 if i in heavy else args.turns
                              for i in range(args.sessions)], [1] * args.sessions),
                  "hot": ([args.turns * 4 if i in hot_agents else args.turns
                           for i in range(args.sessions)],
                          [6 if i in hot_agents else 1 for i in range(args.sessions)]),
                  "slow": even, "agents": even}
        parents = max(1, args.sessions // 8)
        agent_sizes = [max(size, AGENT_CONTEXT_TOKENS) for size in sizes[:parents]]
        moved_before: Counter[str] = Counter()
        spilled_before: Counter[str] = Counter()
        run_id = os.urandom(3).hex()  # routes of an earlier run in the same Redis never apply
        for shape in args.loads.split(","):
            turns, fanouts = shapes[shape]
            control(pods[0], SLOW if shape == "slow" else NORMAL)
            runs = list(targets.items())
            if shape == "agents" and args.children_as_parent:
                runs[1:1] = [(name + SEEDED, ports) for name, ports in runs
                             if name.startswith("llm-sidecar")]
            for name, ports in runs:
                for pod in pods:  # every target starts with cold caches
                    control(pod, {"reset": True})
                bases = [f"http://127.0.0.1:{port}" for port in ports]
                tag = f"{shape}-{args.seed}-{run_id}-{len(results.get(shape, {}))}"
                CALLS_TAG.update(load=shape, target=name)
                FLOOR = Floor()
                if shape == "agents":
                    ttfts, rate, failures = asyncio.run(agents_workload(
                        bases, agent_sizes, args.turns, max(1, args.concurrency // 4), tag,
                        SEEDED in name))
                else:
                    ttfts, rate, failures = asyncio.run(workload(
                        bases, sizes, turns, args.concurrency, fanouts, tag))
                ttfts.sort()
                moves = spills = 0
                fleet = name.removesuffix(SEEDED)
                if fleet in admins:
                    stats = [get_json(f"http://127.0.0.1:{a}/stats") for a in admins[fleet]]
                    total = sum(s["routes"]["session_moves"] for s in stats)
                    moves, moved_before[fleet] = total - moved_before[fleet], total
                    total = sum(s["routes"].get("spills", 0) for s in stats)
                    spills, spilled_before[fleet] = total - spilled_before[fleet], total
                    if fleet.endswith("monitor"):  # the sidecars routed on the view
                        sources = {p["source"] for s in stats
                                   for p in s["pod_view"]["pools"].values()}
                        if sources != {"monitor"}:
                            raise RuntimeError(f"{name}: pod view sources {sources}")
                per_pod = [get_json(f"http://127.0.0.1:{pod}/_control")["counters"]["completed"]
                           for pod in pods]
                results.setdefault(shape, {})[name] = {
                    "moves": moves, "spills": spills, "per_pod_requests": per_pod,
                    "mean": statistics.mean(ttfts) if ttfts else float("nan"),
                    "p99": percentile99(ttfts), "floor": FLOOR.summary(),
                    "sessions_per_s": rate, "calls": len(ttfts),
                    "hit_rate": prefix_hit_rate(pods),
                    "failures": len(failures), "failure_kinds": dict(Counter(failures))}
        control(pods[0], NORMAL)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for server in servers:
            server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
    report(results, args)
    if CALLS is not None:
        Path(args.calls).write_text("".join(json.dumps(c) + "\n" for c in CALLS))
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"routing-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def floor_of(rows: dict[str, dict]) -> dict[str, float]:
    """The loosest of the targets' floors (their calls differ only in the answers they got
    back), so it bounds every target's run."""
    floors = [r["floor"] for r in rows.values()]
    return {"mean": min(f["mean"] for f in floors), "p99": min(f["p99"] for f in floors),
            "hit_rate": max(f["hit_rate"] for f in floors)}


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    details = {"even": f"{args.turns} turns each",
               "skewed": "a quarter of them with 4× the turns",
               "hot": "four agents with 4× the turns, each turn 6 calls at once",
               "slow": f"{args.turns} turns each; one pod at half speed",
               "agents": f"{max(1, args.sessions // 8)} parent agents, "
               f"{max(1, args.concurrency // 4)} at a time, each fanning out to "
               f"{AGENT_CHILDREN} subagents of {args.turns} turns × {AGENT_FANOUT} parallel "
               f"calls sharing its prefix (≥ {AGENT_CONTEXT_TOKENS} tokens)"}
    for shape, rows in results.items():
        size = "" if shape == "agents" else \
            f"{args.sessions} sessions, {args.concurrency} at a time "
        print(f"\n### {shape} load: {size}({details[shape]})\n")
        print("| target | mean TTFT (ms) | p99 TTFT (ms) | sessions/s | prefix-cache hit "
              "rate | calls served per pod | session moves | spilled calls | failed calls |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['mean']:.1f} | {r['p99']:.1f} | {r['sessions_per_s']:.2f} "
                  f"| {r['hit_rate'] * 100:.1f} % | {'/'.join(map(str, r['per_pod_requests']))}"
                  f" | {r['moves']} | {r.get('spills', 0)} | {r['failures']:.0f} |")
        floor = floor_of(rows)
        print(f"| no router can beat (every prefix cached on every pod, no queue) "
              f"| ≥ {floor['mean']:.1f} | ≥ {floor['p99']:.1f} | "
              f"| ≤ {floor['hit_rate'] * 100:.1f} % | | | | |")
        kinds = {n: r["failure_kinds"] for n, r in rows.items() if r["failure_kinds"]}
        if kinds:
            print(f"\nfailed calls by answer: {kinds}")
    print("\n### goals\n")
    for shape, rows in results.items():
        ours = next((r for n, r in rows.items()
                     if n.startswith("llm-sidecar") and SEEDED not in n), None)
        peers = {n: r for n, r in rows.items()
                 if not n.startswith("llm-sidecar") and n != ORACLE}
        if ours is None or not peers:
            continue
        floor = floor_of(rows)
        best_mean = min(r["mean"] for r in peers.values())
        best_p99 = min(r["p99"] for r in peers.values())
        line = (f"- {shape}: mean {ours['mean']:.1f} vs best peer {best_mean:.1f} ms, "
                f"p99 {ours['p99']:.1f} vs best peer {best_p99:.1f} ms")
        sticky = [r for n, r in peers.items() if n in STICKY]
        if sticky and shape in ("hot", "slow", "agents"):
            best = min(sticky, key=lambda r: r["p99"])
            below = (1 - ours['p99'] / best['p99']) * 100
            line += (f"; p99 {abs(below):.0f} % {'below' if below >= 0 else 'above'} the best "
                     f"sticky peer (goal ≥ 25 % below)")
            if best["p99"] * 0.75 < floor["p99"]:
                line += (f" — out of any router's reach in this run: 25 % below is "
                         f"{best['p99'] * 0.75:.0f} ms, under the floor's "
                         f"{floor['p99']:.0f} ms")
        if shape == "agents":
            top = max(r["hit_rate"] for r in peers.values())
            cap = floor["hit_rate"]
            line += (f"; hit rate {ours['hit_rate'] * 100:.1f} vs best peer "
                     f"{top * 100:.1f} % ({(ours['hit_rate'] - top) * 100:+.1f} points; "
                     f"goal ≥ +5, {(cap - top) * 100:+.1f} points at most for any router)")
        elif sticky:
            line += (f", hit rate {ours['hit_rate'] * 100:.1f} vs "
                     f"{max(r['hit_rate'] for r in sticky) * 100:.1f} % (goal: within 5)")
        print(line)
    for shape, rows in results.items():
        scraping = next((r for n, r in rows.items() if n.startswith("llm-sidecar")
                         and not n.endswith("monitor")), None)
        following = next((r for n, r in rows.items() if n.endswith("+ monitor")), None)
        if scraping and following:
            print(f"- {shape}, the monitor's view vs each sidecar scraping: mean "
                  f"{following['mean']:.1f} vs {scraping['mean']:.1f} ms, p99 "
                  f"{following['p99']:.1f} vs {scraping['p99']:.1f} ms (goal: no worse "
                  "beyond the run-to-run spread)")

if __name__ == "__main__":
    raise SystemExit(main())
