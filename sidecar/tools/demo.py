"""`llm-sidecar demo`: the design's story on one machine, then the sidecar keeps serving.

Three simulated model pods run as their own processes (a "small" pool of two, a "large"
pool of one that falls back to small, cold starts scaled down to seconds) behind the
sidecar on embedded defaults (in-memory route store). With `--engine llama` the pods are
llama.cpp servers with a real (small) model instead, when `make engine` installed them.
A scripted client then plays four acts — sessions stick to pods; a pod is killed
mid-traffic; the large pool finishes its cold start while its sessions wait on the small
model; the load level rises — and prints a summary. Afterwards it serves on
127.0.0.1:7878 until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
from rich.console import Console
from rich.table import Table

from sidecar.config import ROUTING_ALIAS, load_settings
from sidecar.fleet.pools import EndpointState, PoolSet
from sidecar.server import Running, start

SMALL_MODEL = "llama-3.1-8b-instruct"
LARGE_MODEL = "llama-3.1-70b-instruct"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_environment(small: list[int], large: list[int], listen: str, admin_listen: str,
                     engine: str = "fake") -> dict[str, str]:
    pools: dict[str, dict[str, object]] = {
        "small": {"model": SMALL_MODEL, "health_path": "/health", "health_interval_s": 0.25,
                  "cold_start_s": 600, "resume": True,
                  "endpoints": [f"http://127.0.0.1:{p}" for p in small]},
        "large": {"model": LARGE_MODEL, "health_path": "/health", "health_interval_s": 0.25,
                  "cold_start_s": 900, "fallback": "small",
                  "endpoints": [f"http://127.0.0.1:{p}" for p in large]},
    }
    if engine == "llama":
        # The pods' own load (busy slots, deferred requests) steers placement and `top`.
        for spec in pools.values():
            spec.update(engine="llamacpp", metrics_path="/metrics")
    routes = {"low": {"small": 12, "large": 4}, "medium": {"small": 8, "large": 8},
              "high": {"small": 4, "large": 12}}
    return {"SIDECAR_LISTEN": listen, "SIDECAR_ADMIN_LISTEN": admin_listen,
            "SIDECAR_POOLS": json.dumps(pools), "SIDECAR_ROUTES": json.dumps(routes),
            "SIDECAR_FALLBACK_HOLD_S": "2", "SIDECAR_DRAIN_TIMEOUT_S": "2",
            "SIDECAR_REQUEST_LOG": "off"}


def warm_pools(pools: PoolSet, cold: tuple[str, ...] = ("large",)) -> bool:
    """Every pod the story expects warm is ready: with one small pod still warming, every
    new session would land on the other and Act 1 would show no spread at all."""
    return all(e.state is EndpointState.READY for name, pool in pools.pools.items()
               if name not in cold for e in pool.endpoints)


def usage(listen: str, admin_listen: str) -> str:
    base = f"http://{listen}"
    return f"""
llm-sidecar is serving on {base}  (admin: http://{admin_listen})

Call it with curl:
  curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\
       -H 'x-session-id: my-session' \\
       -d '{{"model": "{SMALL_MODEL}", "messages": [{{"role": "user", "content": "hi"}}]}}'

Or from the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused",
                  default_headers={{"x-session-id": "my-session"}})
  print(client.chat.completions.create(model="{SMALL_MODEL}",
        messages=[{{"role": "user", "content": "hi"}}]).choices[0].message.content)

"model": "auto" lets the sidecar's routing table pick the pool; naming a pool's model
({SMALL_MODEL} or {LARGE_MODEL}) picks that pool. What it serves:
  curl -s {base}/v1/models

Where a session lives:  curl -s http://{admin_listen}/sessions/my-session
Live view:              llm-sidecar top --admin http://{admin_listen}
Ctrl-C stops everything.
"""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the pod gets SIGTERM if the demo dies, even by SIGKILL (no orphaned pods)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Pod:
    """A simulated model server in its own process (so killing it is a real kill)."""

    def __init__(self, name: str, model: str, cold_start_s: float) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(self.port),
             "--model", model, "--name", name, "--cold-start-s", str(cold_start_s),
             "--ttft-ms", "30", "--tokens-per-s", "150", "--max-tokens", "12"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class LlamaDemoPod:
    """A llama.cpp server with the real small model, started `delay_s` late: the large pod's
    cold start (refused, then 503 "Loading model", then ready) scaled down."""

    def __init__(self, name: str, model: str, delay_s: float = 0.0) -> None:
        from sidecar.tools.llamaserver import LlamaPod

        self.name = name
        self.pod = LlamaPod(alias=model, slots=2)
        self.port = self.pod.port
        self.url = self.pod.url
        self._starting: asyncio.TimerHandle | None = None
        if delay_s > 0:
            self._starting = asyncio.get_running_loop().call_later(delay_s, self.pod.start)
        else:
            self.pod.start()

    def kill(self) -> None:
        self.pod.kill()

    def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
        self.pod.stop()


@dataclass
class Tally:
    calls: int = 0
    failures: int = 0
    streams: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    overheads_ms: list[float] = field(default_factory=list)
    endpoints: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    pools: dict[str, str] = field(default_factory=dict)


class Story:
    def __init__(self, running: Running, base: str, pods: dict[str, Pod | LlamaDemoPod],
                 console: Console) -> None:
        self.running = running
        self.base = base
        self.pods = pods
        self.console = console
        self.tally = Tally()
        self.names = {pod.url: name for name, pod in pods.items()}

    def say(self, text: str) -> None:
        self.console.print(text)

    async def call(self, http: aiohttp.ClientSession, session: str, turn: int,
                   stream: bool) -> str:
        # "auto": the session's selector and the load level's table choose the pool, and the
        # sidecar names the model of the pool that serves (the pods refuse any other).
        body = {"model": ROUTING_ALIAS, "stream": stream, "max_tokens": 12,
                "messages": [{"role": "user", "content": f"turn {turn} of {session}"}]}
        started = time.perf_counter()
        self.tally.calls += 1
        self.tally.streams += stream
        try:
            async with http.post(self.base + "/v1/chat/completions", json=body,
                                 headers={"x-session-id": session}) as r:
                raw = await r.read()
                ok = r.status == 200 and (not stream or raw.rstrip().endswith(b"[DONE]"))
                endpoint = r.headers.get("x-sidecar-endpoint", "")
                self.tally.pools[session] = r.headers.get("x-sidecar-pool", "?")
                if "x-sidecar-overhead-ms" in r.headers:
                    self.tally.overheads_ms.append(float(r.headers["x-sidecar-overhead-ms"]))
        except aiohttp.ClientError:
            ok, endpoint = False, ""
        self.tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        if not ok:
            self.tally.failures += 1
        self.tally.endpoints[session].add(endpoint)
        return endpoint

    async def turns(self, http: aiohttp.ClientSession, sessions: list[str], turns: int,
                    first_turn: int = 0) -> None:
        for turn in range(first_turn, first_turn + turns):
            await asyncio.gather(*(self.call(http, s, turn, stream=(i + turn) % 2 == 0)
                                   for i, s in enumerate(sessions)))

    def where(self, sessions: list[str]) -> Table:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("session")
        table.add_column("pool")
        table.add_column("pod(s) that served it")
        for session in sessions:
            pods = sorted(self.names.get(e, e or "-") for e in self.tally.endpoints[session])
            table.add_row(session, self.tally.pools.get(session, "?"), ", ".join(pods))
        return table

    async def play(self) -> None:
        sidecar = self.running.sidecar
        async with aiohttp.ClientSession() as http:
            self.say("\n[bold]Act 1 — sessions stick to pods[/bold]: 8 conversations, 3 turns "
                     "each, half of them streamed. The large pool is still in its cold "
                     "start, so sessions routed to it are served by the small model.")
            sessions = [f"chat-{i}" for i in range(8)]
            await self.turns(http, sessions, 3)
            self.console.print(self.where(sessions))
            moved = sum(len(self.tally.endpoints[s]) > 1 for s in sessions)
            spread = Counter(self.names.get(e, e) for s in sessions
                             for e in self.tally.endpoints[s])
            per_pod = ", ".join(f"{name} {count}" for name, count in sorted(spread.items()))
            self.say(f"→ {len(sessions) - moved} of {len(sessions)} sessions stayed on one "
                     f"pod for every turn; failed calls so far: {self.tally.failures}; "
                     f"sessions per pod: {per_pod}")

            victim = max(("small-0", "small-1"), key=lambda n: sum(
                self.pods[n].url in e for e in self.tally.endpoints.values()))
            self.say(f"\n[bold]Act 2 — a pod dies[/bold]: {victim} is killed (SIGKILL) while "
                     "the conversations go on, some of them mid-stream.")
            ongoing = asyncio.create_task(self.turns(http, sessions, 2, first_turn=3))
            await asyncio.sleep(0.1)
            self.pods[victim].kill()
            await ongoing
            await self.turns(http, sessions, 1, first_turn=5)
            self.console.print(self.where(sessions))
            counters = sidecar.proxy.counters if sidecar.proxy else None
            self.say(f"→ {victim} is gone; its sessions moved to the other small pod. "
                     f"Retries: {counters.retries if counters else 0}, streams resumed: "
                     f"{counters.resumes if counters else 0}, failed calls: "
                     f"{self.tally.failures}")

            self.say("\n[bold]Act 3 — the large pool finishes its cold start[/bold]: its "
                     "sessions were on the small model meanwhile (a fallback, not an error).")
            for _ in range(200):
                if sidecar.prober.cold_starts and any(
                        c.pool == "large" for c in sidecar.prober.cold_starts):
                    break
                await asyncio.sleep(0.1)
            for event in sidecar.prober.cold_starts:
                if event.pool == "large":
                    self.say(f"→ cold start event: {self.names.get(event.endpoint)} ready "
                             f"after {event.duration_s:.1f} s")
            await asyncio.sleep(2.2)  # the fallback hold (2 s here, 5 min by default)
            await self.turns(http, sessions, 1, first_turn=6)
            on_large = [s for s in sessions if self.tally.pools.get(s) == "large"]
            self.say(f"→ {len(on_large)} session(s) back on their own pool (large) once the "
                     f"fallback hold expired; cold-start fallbacks counted: "
                     f"{sidecar.router.counters.cold_start_fallbacks}")

            self.say("\n[bold]Act 4 — the load level rises[/bold]: the scaler publishes "
                     "'high' (here set directly); new sessions use the high table (12 of 16 "
                     "selector slots on large), existing ones keep their pool.")
            before = dict(self.tally.pools)
            sidecar.router.set_level("high")
            newcomers = [f"new-{i}" for i in range(8)]
            await self.turns(http, newcomers + sessions, 1, first_turn=7)
            kept = sum(self.tally.pools[s] == before[s] for s in sessions)
            spread = Counter(self.tally.pools[s] for s in newcomers)
            self.say(f"→ new sessions: {dict(spread)}; existing sessions that kept their "
                     f"pool: {kept} of {len(sessions)}")

    def summary(self) -> Table:
        sidecar = self.running.sidecar
        store = sidecar.store.counters
        sessions = len(self.tally.endpoints)
        table = Table(title="llm-sidecar demo — summary", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        counters = sidecar.proxy.counters if sidecar.proxy else None
        rows = [
            ("calls", str(self.tally.calls)),
            ("  of them streamed", str(self.tally.streams)),
            ("failures seen by the app", str(self.tally.failures)),
            ("fallbacks (served by another pool)", str(counters.fallbacks if counters else 0)),
            ("retries (another pod, before any byte)", str(counters.retries if counters else 0)),
            ("streams resumed mid-answer", str(counters.resumes if counters else 0)),
            ("route store round trips per session",
             f"{(store.found + store.created) / max(sessions, 1):.2f}"),
            ("median added latency (x-sidecar-overhead-ms)",
             f"{statistics.median(self.tally.overheads_ms):.2f} ms"
             if self.tally.overheads_ms else "n/a"),
            ("median call latency", f"{statistics.median(self.tally.latencies_ms):.0f} ms"
             if self.tally.latencies_ms else "n/a"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table


def _pods(engine: str, cold_start_s: float) -> dict[str, Pod | LlamaDemoPod]:
    if engine == "llama":
        return {"small-0": LlamaDemoPod("small-0", SMALL_MODEL),
                "small-1": LlamaDemoPod("small-1", SMALL_MODEL),
                "large-0": LlamaDemoPod("large-0", LARGE_MODEL, cold_start_s)}
    return {"small-0": Pod("small-0", SMALL_MODEL, 0.5),
            "small-1": Pod("small-1", SMALL_MODEL, 0.5),
            "large-0": Pod("large-0", LARGE_MODEL, cold_start_s)}


def _describe(engine: str, cold_start_s: float) -> str:
    if engine == "llama":
        from sidecar.tools.llamaserver import engine_version, model_path

        return (f"[bold]llm-sidecar demo[/bold] on llama.cpp ({engine_version()}): every pod "
                f"serves {model_path().name} on one CPU thread; small pool = small-0, "
                f"small-1 (as {SMALL_MODEL}); large pool = large-0 (as {LARGE_MODEL}, "
                f"started {cold_start_s:g} s late: its cold start; falls back to small). "
                "Route store: in-memory.")
    return (f"[bold]llm-sidecar demo[/bold]: small pool = small-0, small-1 "
            f"({SMALL_MODEL}); large pool = large-0 ({LARGE_MODEL}, cold start "
            f"{cold_start_s:g} s here, ~15 min for real; falls back to small). "
            "Route store: in-memory.")


async def run_demo(listen: str, admin_listen: str, cold_start_s: float,
                   story: bool = True, engine: str = "fake") -> int:
    console = Console(highlight=False)
    if engine == "llama":
        from sidecar.tools.llamaserver import EngineMissing, binary_path, model_path

        try:
            binary_path()
            model_path()
        except EngineMissing as exc:
            console.print(f"llm-sidecar demo --engine llama: {exc}")
            return 2
    # The story is the output; the sidecar's own log lines would interleave with it.
    quiet = logging.getLogger("sidecar")
    level = quiet.level
    if story:
        quiet.setLevel(logging.ERROR)
    pods = _pods(engine, cold_start_s)
    running: Running | None = None
    try:
        env = demo_environment([pods["small-0"].port, pods["small-1"].port],
                               [pods["large-0"].port], listen, admin_listen, engine)
        running = await start(load_settings(env), env=env)
        console.print(_describe(engine, cold_start_s))
        sidecar = running.sidecar
        for _ in range(1200):  # the small pods' (scaled-down) cold start
            if warm_pools(sidecar.pools):
                break
            await asyncio.sleep(0.05)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if story:
            play = Story(running, f"http://{listen}", pods, console)
            telling = asyncio.create_task(play.play())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({telling, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not telling.done():  # Ctrl-C during the story
                telling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await telling
                return 0
            stopping.cancel()
            telling.result()
            console.print()
            console.print(play.summary())
        quiet.setLevel(level)
        console.print(usage(listen, admin_listen))
        await stop.wait()
        console.print("stopping…")
    finally:
        if running is not None:
            await running.stop()
        for pod in pods.values():
            pod.stop()
    return 0

