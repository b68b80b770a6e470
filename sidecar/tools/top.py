"""`llm-sidecar top`: a live terminal view of a running sidecar, from its admin API only
(`/stats` for state and counters, `/metrics` for latency histograms), with the admin token
(`--token` or SIDECAR_ADMIN_TOKEN) when the listener needs one."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
STATE_STYLE = {"ready": "green", "warming": "yellow", "ejected": "red", "draining": "dim"}


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = _SAMPLE.match(line)
        if found:
            labels = dict(_LABEL.findall(found[2] or ""))
            samples.append((found[1], labels, float(found[3])))
    return samples


def latency_buckets(samples: list[tuple[str, dict[str, str], float]]) -> dict[float, float]:
    """Cumulative request-duration buckets (all pools summed): upper bound → count."""
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name == "llm_sidecar_request_duration_seconds_bucket":
            bound = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding quantile q (Prometheus-style, coarse)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound
    return None


@dataclass
class Snapshot:
    at: float
    stats: dict[str, Any]
    buckets: dict[float, float]


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value == float("inf"):
        return "> 600 s"
    return f"≤ {value * 1000:.1f} ms" if value < 1 else f"≤ {value:.1f} s"


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "–"


def render(now: Snapshot, before: Snapshot | None) -> Group:
    stats = now.stats
    proxy, routes, store = stats["proxy"], stats["routes"], stats["store"]
    dt = (now.at - before.at) if before else 0.0
    if before and dt > 0:
        rate = (proxy["requests"] - before.stats["proxy"]["requests"]) / dt
        window = {b: now.buckets.get(b, 0.0) - before.buckets.get(b, 0.0) for b in now.buckets}
        span = f"last {dt:.0f} s"
    else:
        rate, window, span = None, now.buckets, "since start"
    head = Table.grid(padding=(0, 2))
    head.add_row(
        Text(f"llm-sidecar {stats['version']}", style="bold"),
        f"load level [bold]{stats['load_level']}[/bold]",
        f"uptime {stats['uptime_s']:.0f} s",
        f"store {store['kind']} ({'up' if store['available'] else '[red]DOWN[/red]'})",
        "[yellow]draining[/yellow]" if stats["draining"] else "")
    figures = Table(show_header=False, box=None, pad_edge=False)
    figures.add_column(style="bold")
    figures.add_column()
    figures.add_column(style="bold")
    figures.add_column()
    hits, misses = routes["cache_hits"], routes["cache_misses"]
    figures.add_row("requests/s", "–" if rate is None else f"{rate:.1f}",
                    "in flight", str(proxy["inflight"]))
    figures.add_row(f"latency p50 ({span})", _ms(quantile(window, 0.5)),
                    f"latency p99 ({span})", _ms(quantile(window, 0.99)))
    figures.add_row("requests", str(proxy["requests"]), "5xx / 4xx",
                    f"{proxy['responses_5xx']} / {proxy['responses_4xx']}")
    figures.add_row("fallbacks", str(proxy["fallbacks"]), "retries / resumes",
                    f"{proxy['retries']} / {proxy['resumes']}")
    figures.add_row("route cache hit rate", _ratio(hits, hits + misses),
                    "Redis hit rate (first touch found)",
                    _ratio(store["found"], store["found"] + store["created"]))
    figures.add_row("cached routes", str(routes["cached"]), "Redis errors / timeouts",
                    f"{store['errors']} / {store['timeouts']}")
    endpoints = Table(title="endpoints", title_justify="left", box=None, pad_edge=False)
    # The gpu column only where the fleet monitor reads GPUs: a narrow terminal keeps the
    # endpoint URLs whole otherwise.
    gpus = any(e.get("gpu") for e in stats["endpoints"])
    for column in ("pool", "endpoint", "state", "in flight", "failures", "running",
                   "waiting", "kv", *(("gpu",) if gpus else ())):
        endpoints.add_column(column)
    for e in stats["endpoints"]:
        load = e.get("load") or {}  # the pod's own load (scraped or fleet heartbeats)
        kv = f"{load['kv_usage'] * 100:.0f}%" if load.get("source") == "metrics" else "–"
        style = STATE_STYLE.get(e["state"], "")
        gpu = (_gpu(e.get("gpu")),) if gpus else ()  # from Nomad, via the monitor's view
        endpoints.add_row(e["pool"], e["url"], Text(e["state"], style=style),
                          str(e["inflight"]), str(e["consecutive_failures"]),
                          f"{load['running']:g}" if load else "–",
                          Text(f"{load['waiting']:g}", style="red" if load.get("saturated")
                               else "") if load else "–", kv, *gpu)
    parts: list[Any] = [head, Text(""), figures, Text(""), endpoints]
    if (line := _pod_view_line(stats.get("pod_view") or {})) is not None:
        parts.append(line)
    if stats.get("pools_without_ready_capacity"):
        parts.append(Text("pools without ready capacity: "
                          + ", ".join(stats["pools_without_ready_capacity"]), style="red"))
    return Group(*parts)


def _gpu(gpu: dict[str, Any] | None) -> str:
    """Utilization and memory in use over the pod's devices, e.g. `87% · 71% mem (2)`."""
    if not gpu:
        return "–"
    devices = f" ({gpu['devices']})" if gpu.get("devices", 1) != 1 else ""
    return f"{gpu['utilization'] * 100:.0f}% · {gpu['memory'] * 100:.0f}% mem{devices}"


def _pod_view_line(view: dict[str, Any]) -> Text | None:
    """Per pool: following the fleet monitor's view (its age), or probing by itself."""
    pools = view.get("pools") or {}
    if not pools:
        return None
    line = Text("pod health: ")
    for i, (name, pool) in enumerate(sorted(pools.items())):
        if i:
            line.append(", ")
        if pool["source"] == "monitor":
            line.append(f"{name} from the monitor ({pool['age_s']:.1f} s old)", style="green")
        elif pool.get("version") is not None:
            line.append(f"{name} probed here: the monitor's view is stale", style="yellow")
        else:
            line.append(f"{name} probed here")
    return line


class Refused(Exception):
    """The admin listener wants a token (401) or has none configured (403)."""


async def snapshot(http: aiohttp.ClientSession, admin: str) -> Snapshot:
    async with http.get(admin + "/stats") as r:
        if r.status in (401, 403):
            try:
                reason = (await r.json()).get("error", "")
            except (aiohttp.ContentTypeError, ValueError):
                reason = ""
            raise Refused(f"{r.status}: {reason}")
        r.raise_for_status()
        stats = await r.json()
    async with http.get(admin + "/metrics") as r:
        r.raise_for_status()
        buckets = latency_buckets(parse_metrics(await r.text()))
    return Snapshot(time.monotonic(), stats, buckets)


async def run_top(admin: str, interval: float, once: bool, token: str | None = None) -> int:
    console = Console()
    admin = admin.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        try:
            first = await snapshot(http, admin)
        except Refused as exc:
            console.print(f"[red]{admin}/stats refused[/red] ({exc})\nPass the sidecar's "
                          "SIDECAR_ADMIN_TOKEN: set that variable here too, or --token.",
                          markup=True, highlight=False)
            return 1
        except (aiohttp.ClientError, OSError) as exc:
            console.print(f"[red]cannot read {admin}/stats[/red]: {exc}\nIs the sidecar "
                          "running? Its admin listener is SIDECAR_ADMIN_LISTEN "
                          "(default 127.0.0.1:7879); pass --admin http://HOST:PORT.")
            return 1
        if once:
            await asyncio.sleep(min(interval, 1.0))
            console.print(render(await snapshot(http, admin), first))
            return 0
        before = first
        with Live(render(first, None), console=console, refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(interval)
                try:
                    now = await snapshot(http, admin)
                except (aiohttp.ClientError, OSError, Refused) as exc:
                    live.update(Text(f"lost {admin}: {exc}", style="red"))
                    continue
                live.update(render(now, before))
                before = now
