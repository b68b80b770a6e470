"""`simulate --sweep`: each policy's frontier over its knobs — requests without warm capacity
(after the first cold-start window) against replica-minutes — beside the clairvoyant
point, as a table and a plot, and whether ours dominates the baseline's."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.scaler.config import load_prior
from sidecar.scaler.policy import Bounds, PredictivePolicy, TargetValuePolicy
from sidecar.tools.simulate import Call, Model, pyplot, run

# Knob values: wide enough that both frontiers span cheap-and-leaky to costly-and-safe.
BASELINE_TARGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# (burst quantile, headroom)
PREDICTIVE_KNOBS = ((0.01, -0.5), (0.01, -0.25), (0.01, 0.0), (0.25, 0.0), (0.5, 0.0),
                    (0.8, 0.0), (0.9, 0.0), (0.95, 0.0), (0.99, 0.0), (0.995, 0.0),
                    (0.995, 0.25), (0.995, 0.5), (0.995, 1.0), (0.995, 2.0))


@dataclass(frozen=True, slots=True)
class Point:
    policy: str
    knob: str
    late_share: float          # no warm capacity after the first cold-start window
    p95_queue_delay_s: float
    replica_minutes: float

    def covers(self, other: Point) -> bool:
        """At most `other`'s misses for at most its replica-minutes."""
        return (self.late_share <= other.late_share
                and self.replica_minutes <= other.replica_minutes)


def grid() -> list[tuple[str, str, Callable[[Bounds], Any]]]:
    out: list[tuple[str, str, Callable[[Bounds], Any]]] = []
    for target in BASELINE_TARGETS:
        out.append(("baseline", f"target {target:g}",
                    lambda b, t=target: TargetValuePolicy(b, target=t, window_s=60.0,
                                                          cooldown_s=300.0)))
    # The scaler's prior settings at every knob (the young pool's floor is on by default):
    # each point is what the scaler would run with that quantile and headroom.
    cv, samples, floor = load_prior()
    for quantile, margin in PREDICTIVE_KNOBS:
        label = f"quantile {quantile:g}" + (f", headroom {margin:+g}" if margin else "")
        out.append(("predictive", label,
                    lambda b, q=quantile, m=margin: PredictivePolicy(
                        b, quantile=q, headroom=m, prior_cv=cv, prior_samples=samples,
                        prior_floor=floor)))
    return out


def sweep(work: Sequence[Call], model: Model) -> list[Point]:
    points = []
    for policy, knob, factory in grid():
        r = run(work, factory, model)
        points.append(Point(policy, knob, r.late_share, r.p95_queue_delay_s,
                            r.replica_minutes))
    return points


def frontier(points: Sequence[Point], policy: str) -> list[Point]:
    """The policy's points no other of its points covers, cheapest first."""
    mine = [p for p in points if p.policy == policy]
    best = [p for p in mine if not any(o is not p and o.covers(p) and
                                       (o.late_share, o.replica_minutes)
                                       != (p.late_share, p.replica_minutes) for o in mine)]
    return sorted(best, key=lambda p: p.replica_minutes)


def misses_at(points: Sequence[Point], policy: str, replica_minutes: float) -> float | None:
    """The policy's frontier at `replica_minutes`: linear between its two neighbouring
    points (mixing two settings in time reaches any point between them); None outside."""
    line = frontier(points, policy)
    if not line or not line[0].replica_minutes <= replica_minutes:
        return None
    best = line[0].late_share
    for a, b in itertools.pairwise(line):
        if a.replica_minutes <= replica_minutes <= b.replica_minutes:
            span = b.replica_minutes - a.replica_minutes
            w = (replica_minutes - a.replica_minutes) / span if span else 1.0
            return a.late_share + w * (b.late_share - a.late_share)
        best = b.late_share
    return best  # beyond our costliest point: what that point already achieves


def undominated(points: Sequence[Point], ours: str = "predictive",
                theirs: str = "baseline") -> list[Point]:
    """`theirs`' frontier points where ours, for the same replica-minutes, leaves more
    requests without warm capacity, or that are cheaper than any setting of ours (empty:
    ours dominates)."""
    out = []
    for p in frontier(points, theirs):
        ours_share = misses_at(points, ours, p.replica_minutes)
        if ours_share is None or ours_share > p.late_share:
            out.append(p)
    return out


def table(points: Sequence[Point], clairvoyant_minutes: float) -> str:
    lines = ["| policy | knob | no warm capacity after the first window | p95 queue delay (s) "
             "| replica-minutes | × clairvoyant | on the frontier |",
             "|---|---|---|---|---|---|---|",
             f"| clairvoyant | — | 0.00% | 0.00 | {clairvoyant_minutes:.0f} | 1.00 | yes |"]
    on = {id(p) for name in ("baseline", "predictive") for p in frontier(points, name)}
    for p in points:
        lines.append(f"| {p.policy} | {p.knob} | {p.late_share:.2%} | "
                     f"{p.p95_queue_delay_s:.2f} | {p.replica_minutes:.0f} | "
                     f"{p.replica_minutes / clairvoyant_minutes:.2f} | "
                     f"{'yes' if id(p) in on else ''} |")
    return "\n".join(lines)


def plot(points: Sequence[Point], clairvoyant_minutes: float, path: str, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, colour in (("baseline", "tab:orange"), ("predictive", "tab:blue")):
        mine = sorted((p for p in points if p.policy == policy),
                      key=lambda p: p.replica_minutes)
        ax.plot([p.replica_minutes / clairvoyant_minutes for p in mine],
                [100 * p.late_share for p in mine], "o-", color=colour, label=policy)
        for p in mine:
            ax.annotate(p.knob.replace("quantile ", "q").replace("target ", "t"),
                        (p.replica_minutes / clairvoyant_minutes, 100 * p.late_share),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([1.0], [0.0], "k*", markersize=12, label="clairvoyant")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("replica-minutes ÷ the clairvoyant schedule's")
    ax.set_ylabel("% requests without warm capacity (after the first window)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
