"""Request traces for `llm-sidecar simulate`: read a CSV, reshape it (speed, repeat, a day
from an hour), and generate seeded synthetic traffic of known shapes (bursty
code completion, a working day with a ramp, a lunch burst and a batch step).

A trace is a list of (seconds from its start, context tokens, generated tokens), in order.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Sequence
from datetime import datetime

Trace = list[tuple[float, int, int]]


def read_trace(path: str) -> Trace:
    """(seconds since the first request, context tokens, generated tokens), in order."""
    rows: list[tuple[datetime, int, int]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            stamp = row["TIMESTAMP"].strip()
            # The Azure trace has 7 fractional digits; datetime takes at most 6.
            if "." in stamp:
                head, frac = stamp.split(".", 1)
                stamp = f"{head}.{frac[:6]}"
            rows.append((datetime.fromisoformat(stamp), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    if not rows:
        raise ValueError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [((t - start).total_seconds(), c, g) for t, c, g in rows]


def shape(trace: Sequence[tuple[float, int, int]], *, speed: float = 1.0, repeat: int = 1,
          diurnal: bool = False, seed: int = 0) -> Trace:
    """Compress or stretch time, repeat the trace back to back, and optionally thin it to a
    day-shaped load (a smooth daily curve between 30 % and 100 % of the trace's rate, with a
    morning ramp and an afternoon peak). Deterministic for a seed."""
    span = max(t for t, _, _ in trace) + 1.0
    rng = random.Random(seed)
    out = []
    copies = 24 if diurnal and repeat == 1 else repeat
    total = span * copies
    for copy in range(copies):
        for t, c, g in trace:
            at = copy * span + t
            if diurnal:
                phase = at / total  # 0..1 over the day
                keep = 0.65 - 0.35 * math.cos(2 * math.pi * (phase - 0.125))
                if rng.random() > keep:
                    continue
            out.append((at / speed, c, g))
    return out


def _conversation(rng: random.Random) -> tuple[int, int]:
    # Token sizes shaped like the Azure conversation trace (median ~1 000 in, ~200 out).
    return (min(16000, int(rng.lognormvariate(6.9, 0.8))),
            min(2000, 1 + int(rng.lognormvariate(5.2, 0.7))))


def _completion(rng: random.Random) -> tuple[int, int]:
    # Code completion: long contexts (the open files), short answers.
    return (min(16000, int(rng.lognormvariate(8.0, 0.5))),
            min(400, 4 + int(rng.lognormvariate(3.4, 0.6))))


def _poisson(rate: Callable[[float], float], peak: float, seconds: float,
             rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process with rate(t) ≤ peak (thinning)."""
    out = []
    at = 0.0
    while True:
        at += rng.expovariate(peak)
        if at >= seconds:
            return out
        if rng.random() * peak < rate(at):
            out.append(at)


def code_completion(seed: int = 1, seconds: float = 3600.0, background: float = 1.0) -> Trace:
    """Bursty traffic: a background rate climbing from 2 to 6 requests/s over the trace,
    plus bursts (tens of requests within a second) that come in clusters — a burst makes
    follow-up bursts likely in the next half minute, as editors re-request while typing.
    Clusters start at 0.02/s, climbing to 0.04/s with the background; a step doubles
    their rate for the trace's last fifth. `background` scales the background rate only
    (0.25: a quiet team whose bursts dwarf its level)."""
    rng = random.Random(seed)

    def climb(t: float) -> float:
        return t / seconds

    times = _poisson(lambda t: background * (2 + 4 * climb(t)), 6 * background, seconds, rng)
    seeds = _poisson(lambda t: (0.02 + 0.02 * climb(t)) * (2 if t > 0.8 * seconds else 1),
                     0.08, seconds, rng)
    bursts = []
    for start in seeds:
        at = start
        while at < seconds:
            bursts.append(at)
            if rng.random() > 0.6:  # a cluster of ~2.5 bursts on average
                break
            at += rng.uniform(2, 30)
    for start in bursts:
        size = max(5, int(rng.lognormvariate(3.0, 0.5)))  # median 20, tens at most
        times.extend(start + rng.uniform(0, 1.0) for _ in range(size))
    times = sorted(t for t in times if t < seconds)
    return [(t, *_completion(rng)) for t in times]


def working_day(seed: int = 1, scale: float = 1.0, batch_per_s: float = 1.0) -> Trace:
    """A smooth 24-hour day of conversation traffic: a quiet night (1 request/s), a morning
    ramp to 5/s, a lunch burst (+60 % for 40 minutes around 12:30), an afternoon plateau,
    an evening decline, and a batch job that adds a flat `batch_per_s` (1/s) from 19:00 to
    21:00 (a step up and a step down)."""
    rng = random.Random(seed)

    def rate(t: float) -> float:
        h = t / 3600
        if h < 6:
            base = 1.0
        elif h < 9:
            base = 1.0 + 4.0 * (h - 6) / 3  # the morning ramp
        elif h < 17:
            base = 5.0
        elif h < 23:
            base = 5.0 - 4.0 * (h - 17) / 6
        else:
            base = 1.0
        lunch = 0.6 * base * math.exp(-(((h - 12.5) / 0.33) ** 2))
        batch = batch_per_s if 19 <= h < 21 else 0.0
        return scale * (base + lunch + batch)

    times = _poisson(rate, scale * max(9.0, 5.0 + batch_per_s), 86400.0, rng)
    return [(t, *_conversation(rng)) for t in times]


SYNTHETIC: dict[str, Callable[[int], Trace]] = {
    "code-completion": lambda seed: code_completion(seed),
    "working-day": lambda seed: working_day(seed),
}
