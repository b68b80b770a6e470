"""The tables peers.py prints: targets side by side, ratios to nginx and Envoy, streaming,
the overhead header's accuracy and the performance goals; the raw figures go to results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import overhead
from common import HERE, ROOT

Rounds = list[dict[str, dict[str, dict[str, float]]]]
Figure = Callable[[dict[str, dict[str, dict[str, float]]], str], float]


def rps(r: dict[str, Any], name: str) -> float:
    return float(r[name]["c32"]["rps"])


def cpu(r: dict[str, Any], name: str) -> float:
    return float(r[name]["c32"]["cpu_us"])


def p99_c32(r: dict[str, Any], name: str) -> float:
    return float(r[name]["c32"]["p99_us"])


def added_p50(r: dict[str, Any], name: str) -> float:
    return float(r[name]["c1"]["p50_us"] - r["direct"]["c1"]["p50_us"])


def added_p99(r: dict[str, Any], name: str) -> float:
    return float(r[name]["c1"]["p99_us"] - r["direct"]["c1"]["p99_us"])


def content_added(r: dict[str, Any], name: str) -> float:
    return float(r[name]["sse_ttft_us"]["p50"] - r["direct"]["sse_ttft_us"]["p50"])


def stream_cpu(r: dict[str, Any], name: str) -> float:
    return float(r[name]["sse_c16"]["cpu_us"])


def median(rounds: Rounds, figure: Figure, name: str) -> float:
    return statistics.median(figure(r, name) for r in rounds)


def ratio(rounds: Rounds, figure: Figure, name: str, reference: str) -> float:
    """Median of the per-round ratios: each round's targets ran minutes apart at most."""
    return statistics.median(figure(r, name) / figure(r, reference) for r in rounds)


def main_table(args: argparse.Namespace, rounds: Rounds, rss_mib: dict[str, float]) -> None:
    def med(name: str, load: str, key: str) -> float:
        return statistics.median(r[name][load][key] for r in rounds)

    refs = [ref for ref in ("nginx", "envoy") if ref in rounds[0]]
    print(f"\n### Side by side ({args.rounds} alternating rounds × {args.duration:g} s; "
          "proxies on core 1, nginx upstream and wrk on core 0)\n")
    print("| target | p50 c=1 (µs) | p99 c=1 (µs) | added p50 | added p99 | req/s c=32 | "
          "p99 c=32 (µs) | proxy CPU µs/req (c=32) | "
          + "".join(f"req/s ÷ {ref} | CPU ÷ {ref} | " for ref in refs)
          + "RSS after (MiB) | errors |")
    print("|---" * (10 + 2 * len(refs)) + "|")
    for name in rounds[0]:
        proxy = name != "direct"
        cpu_us = f"{med(name, 'c32', 'cpu_us'):.0f}" if proxy else "–"
        errors = sum(r[name][load]["errors"] + r[name][load]["non_2xx"] for r in rounds
                     for load in ("c1", "c32"))
        add = (f"{median(rounds, added_p50, name):+.0f}",
               f"{median(rounds, added_p99, name):+.0f}") if proxy else ("–", "–")
        ratios = "".join(
            f"{ratio(rounds, rps, name, ref):.2f} | "
            + (f"{ratio(rounds, cpu, name, ref):.2f} | " if proxy else "– | ") for ref in refs)
        rss = f"{rss_mib[name]:.0f}" if name in rss_mib else "–"
        print(f"| {name} | {med(name, 'c1', 'p50_us'):.0f} | {med(name, 'c1', 'p99_us'):.0f} | "
              f"{add[0]} | {add[1]} | {med(name, 'c32', 'rps'):,.0f} | "
              f"{med(name, 'c32', 'p99_us'):.0f} | {cpu_us} | {ratios}{rss} | {errors} |")


def stream_table(rounds: Rounds) -> None:
    print("\n| target | first SSE event p50 c=1 (µs) | added | first content event p50 "
          "(µs) | added | streams/s c=16 (20 events) | proxy CPU µs/stream (c=16) | errors |")
    print("|---|---|---|---|---|---|---|---|")

    def sse(name: str, key: str) -> tuple[float, str]:
        value = statistics.median(r[name][key]["p50"] for r in rounds)
        extra = "–" if name == "direct" else "{:+.0f}".format(statistics.median(
            r[name][key]["p50"] - r["direct"][key]["p50"] for r in rounds))
        return value, extra

    for name in rounds[0]:
        (event, event_added), (token, token_added) = (sse(name, "sse_ttfb_us"),
                                                      sse(name, "sse_ttft_us"))
        errors = sum(r[name]["sse_c16"]["errors"] + r[name]["sse_c16"]["non_2xx"]
                     for r in rounds)
        streams = statistics.median(r[name]["sse_c16"]["rps"] for r in rounds)
        per_stream = "–" if name == "direct" else f"{median(rounds, stream_cpu, name):.0f}"
        print(f"| {name} | {event:.0f} | {event_added} | {token:.0f} | {token_added} | "
              f"{streams:,.0f} | {per_stream} | {errors} |")


# (goal, figure, unit, reference, higher is better, needs the streaming phase)
GOALS: list[tuple[str, Figure, str, str, bool, bool]] = [
    ("req/s c=32 ≥ Envoy's", rps, "", "envoy", True, False),
    ("req/s c=32 ≥ vllm-router's", rps, "", "vllm-router", True, False),
    ("proxy CPU per request (c=32) ≤ Envoy's", cpu, " µs", "envoy", False, False),
    ("p99 at c=32 ≤ Envoy's", p99_c32, " µs", "envoy", False, False),
    ("added p50 at c=1 ≤ Envoy's", added_p50, " µs", "envoy", False, False),
    ("added p99 at c=1 ≤ Envoy's", added_p99, " µs", "envoy", False, False),
    ("first content event, added ≤ Envoy's", content_added, " µs", "envoy", False, True),
    ("proxy CPU per stream (c=16) ≤ Envoy's", stream_cpu, " µs", "envoy", False, True),
]


def goals_table(rounds: Rounds, streamed: bool) -> None:
    print("\n| goal (llm-sidecar, ratios within this run) | llm-sidecar | peer | "
          "ratio | met? |")
    print("|---|---|---|---|---|")
    for goal, figure, unit, ref, higher, streaming in GOALS:
        if ref not in rounds[0] or (streaming and not streamed):
            print(f"| {goal} | – | not run | – | – |")
            continue
        mine, theirs = median(rounds, figure, "llm-sidecar"), median(rounds, figure, ref)
        # Ratios of added latencies only mean something when both added time.
        if figure in (added_p50, added_p99, content_added) and theirs <= 0:
            print(f"| {goal} | {mine:,.0f}{unit} | {theirs:,.0f}{unit} | – | – |")
            continue
        times = ratio(rounds, figure, "llm-sidecar", ref)
        met = times >= 1 if higher else times <= 1
        print(f"| {goal} | {mine:,.0f}{unit} | {theirs:,.0f}{unit} | {times:.2f}× | "
              f"{'yes' if met else 'no'} |")


def sidecar_lines(run: dict[str, Any]) -> None:
    stats, sent = run["stats"], run["dogstatsd"]
    proxy, store = stats["proxy"], stats["store"]
    commands = ", ".join(f"{n} {c}" for n, c in sorted(run["redis_commands"].items()))
    print(f"\nllm-sidecar configuration: {run['config']}")
    print(f"llm-sidecar start-up: {run['started'] or '(no start-up line logged)'}; answered "
          f"{run.get('sidecar_ready_s', 0):.1f} s after it was started")
    print(f"llm-sidecar during the run: {proxy['requests']:,} requests, 5xx "
          f"{proxy['responses_5xx']}, 4xx {proxy['responses_4xx']}, retries "
          f"{proxy['retries']}, budget refusals {proxy['budget_refusals']}, resumes "
          f"{proxy['resumes']}, broken streams {proxy['broken_streams']}; store "
          f"{store['kind']} available={store['available']} (errors {store['errors']}, "
          f"timeouts {store['timeouts']}); bench-session's route read back from Redis: "
          f"{'yes' if run['route_in_redis'] else 'NO'}; Redis commands during the "
          f"measurements: {commands or 'none'}; DogStatsD socket received "
          f"{sent['datagrams']} datagrams, {sent['lines']} metric lines")
    for line in run["log"][:10]:
        print(f"llm-sidecar logged: {line}")
    if len(run["log"]) > 10:
        print(f"llm-sidecar logged {len(run['log']) - 10} more warnings or errors")


def report(args: argparse.Namespace, rounds: Rounds, rss_mib: dict[str, float],
           run: dict[str, Any], skipped: list[str]) -> None:
    streamed = "sse_c16" in rounds[0]["direct"]
    sidecar_lines(run)
    main_table(args, rounds, rss_mib)
    print(overhead.table(run["overhead"], args.calls))
    if streamed:
        stream_table(rounds)
    goals_table(rounds, streamed)
    if skipped:
        print(f"\nnot installed or not answering, skipped: {', '.join(skipped)}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "rounds": rounds, "rss_mib": rss_mib,
                                **run}, indent=1))
    print(f"raw: {path.relative_to(ROOT)}")
