"""How well `x-sidecar-overhead-ms` tells what the sidecar adds to a call, at concurrency 1.

    python benchmarks/overhead.py PORT COUNT [SESSION]    (one JSON line: latencies, headers)

A raw-socket client (one keep-alive connection, TCP_NODELAY, nothing parsed but the head)
sends COUNT sequential non-streamed chat completions and records each one's latency and
its `x-sidecar-overhead-ms`. peers.py runs it pinned to core 0 against the upstream, a copy
of the upstream on core 1 and the sidecar, then prints `table(...)`.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import pinned, tree_cpu_seconds

WARM = 200  # calls before the timed ones: connections, caches and the route are warm
BODY = json.dumps({"model": "fake-model", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "Say hello."}]}).encode()


def request_bytes(port: int, session: str) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nAuthorization: Bearer sk-llmsc-bench\r\n"
            f"x-session-id: {session}\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def exchange(sock: socket.socket, request: bytes) -> tuple[int, float | None]:
    """One call on a keep-alive connection: (status, x-sidecar-overhead-ms or None)."""
    sock.sendall(request)
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection before its head")
        data += chunk
    lines = data[:end].split(b"\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if b"content-length" not in fields:
        raise ValueError("expected a Content-Length response (a non-streamed completion), got "
                         f"{data[:end]!r}")
    remaining = end + 4 + int(fields[b"content-length"]) - len(data)
    while remaining > 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection inside a body")
        remaining -= len(chunk)
    overhead = fields.get(b"x-sidecar-overhead-ms")
    return status, float(overhead) if overhead is not None else None


def measure(port: int, count: int, session: str) -> dict[str, Any]:
    request = request_bytes(port, session)
    latencies: list[float] = []
    headers: list[float] = []
    failed = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(WARM + count):
            started = time.perf_counter_ns()
            status, overhead = exchange(sock, request)
            elapsed = (time.perf_counter_ns() - started) / 1000
            if i < WARM:
                continue
            failed += status != 200
            latencies.append(elapsed)
            if overhead is not None:
                headers.append(overhead * 1000)
    return {"latency_us": latencies, "overhead_us": headers, "non_200": failed}


def run(port: int, count: int, session: str) -> dict[str, Any]:
    """`measure` in a process of its own on core 0, beside the load generator's other tools."""
    out = subprocess.run(pinned(0, [sys.executable, str(Path(__file__).resolve()), str(port),
                                    str(count), session]),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def summary(data: dict[str, Any]) -> dict[str, float]:
    """Medians and p99 of one run (the raw lists stay out of the results file)."""
    lat = sorted(data["latency_us"])
    out = {"p50_us": statistics.median(lat), "p99_us": lat[int(len(lat) * 0.99) - 1],
           "non_200": data["non_200"]}
    if data["overhead_us"]:
        out["header_p50_us"] = statistics.median(data["overhead_us"])
        out["header_p99_us"] = sorted(data["overhead_us"])[int(len(data["overhead_us"]) * .99)
                                                           - 1]
    return out


def phase(rounds: int, calls: int, upstream: int, xcore: int, sidecar: int,
          pid: int) -> list[dict[str, dict[str, float]]]:
    """Per round: the same client against the upstream, its copy on core 1 and the sidecar
    (whose process `pid` also gives its CPU time per call)."""
    out = []
    for _ in range(rounds):
        row = {"direct": summary(run(upstream, calls, "bench-session")),
               "direct-xcore": summary(run(xcore, calls, "bench-session"))}
        before = tree_cpu_seconds(pid)
        row["llm-sidecar"] = summary(run(sidecar, calls, "bench-session"))
        row["llm-sidecar"]["cpu_us"] = (tree_cpu_seconds(pid) - before) * 1e6 / (calls + WARM)
        out.append(row)
    return out


def within(header: float, added: float) -> bool:
    """The accuracy asked of the header: within 25 % or 30 µs of the added latency."""
    return abs(header - added) <= max(0.25 * abs(added), 30.0)


def table(rounds: list[dict[str, dict[str, float]]], count: int) -> str:
    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    def per_round(expr: Any) -> float:
        return statistics.median(expr(r) for r in rounds)

    lines = [f"\n### x-sidecar-overhead-ms against the added latency (c=1, {count} sequential "
             f"calls × {len(rounds)} rounds, raw-socket keep-alive client on core 0)\n",
             "| path | p50 (µs) | p99 (µs) | header p50 (µs) | header p99 (µs) | non-200 |",
             "|---|---|---|---|---|---|"]
    names = {"direct": "direct (nginx upstream, core 0)",
             "direct-xcore": "direct-xcore (upstream copy on core 1)",
             "llm-sidecar": "through llm-sidecar (core 1)"}
    for name, label in names.items():
        if name not in rounds[0]:
            continue
        head = ("–", "–") if "header_p50_us" not in rounds[0][name] else (
            f"{med(name, 'header_p50_us'):.0f}", f"{med(name, 'header_p99_us'):.0f}")
        lines.append(f"| {label} | {med(name, 'p50_us'):.0f} | {med(name, 'p99_us'):.0f} | "
                     f"{head[0]} | {head[1]} | {sum(r[name]['non_200'] for r in rounds)} |")
    cpu = med("llm-sidecar", "cpu_us")
    lines.append(f"\nllm-sidecar's own CPU time over these calls: {cpu:.0f} µs per call "
                 "(procfs; it includes socket reads and writes the header cannot see).\n")
    header = med("llm-sidecar", "header_p50_us")
    lines += ["| added latency taken as | added p50 (µs) | header p50 (µs) | header ÷ added | "
              "header − added (µs) | within 25 % or 30 µs? |", "|---|---|---|---|---|---|"]
    rows = [("sidecar − direct", lambda r: r["llm-sidecar"]["p50_us"] - r["direct"]["p50_us"])]
    if "direct-xcore" in rounds[0]:
        # A proxied call crosses cores four times, a direct-xcore call twice: what is left
        # after two direct-xcore detours is the sidecar's own time plus its socket work.
        rows += [("sidecar − direct-xcore",
                  lambda r: r["llm-sidecar"]["p50_us"] - r["direct-xcore"]["p50_us"]),
                 ("sidecar − direct − 2 × (xcore − direct)",
                  lambda r: r["llm-sidecar"]["p50_us"] + r["direct"]["p50_us"]
                  - 2 * r["direct-xcore"]["p50_us"])]
    for label, expr in rows:
        added = per_round(expr)
        ratio = f"{header / added:.2f}" if added > 0 else "–"
        lines.append(f"| {label} | {added:.0f} | {header:.0f} | {ratio} | "
                     f"{header - added:+.0f} | {'yes' if within(header, added) else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    port, count = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps(measure(port, count, sys.argv[3] if len(sys.argv) > 3 else "bench")))
