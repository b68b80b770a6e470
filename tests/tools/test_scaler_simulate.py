"""The simulator's yardstick and modes: the clairvoyant schedule (checked by hand), the
--sweep frontier, the two-pool mode, the synthetic traces, and the goals on them."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.scaler import policy
from sidecar.tools import frontier, traces, twopool
from sidecar.tools import simulate as sim

TRACE = Path(os.environ.get("LLMSC_TRACE") or Path(__file__).resolve().parents[3] / "shared"
             / "data" / "azure-llm-conv-2023.csv")


def conv_hour() -> traces.Trace:
    if not TRACE.exists():
        if os.environ.get("LLMSC_REQUIRE_TRACE"):
            pytest.fail(f"the Azure trace is required here and missing: {TRACE}")
        pytest.skip(f"the Azure trace is not beside this clone ({TRACE}); set LLMSC_TRACE")
    return traces.read_trace(str(TRACE))


def test_clairvoyant_schedule_on_a_trace_checked_by_hand():
    model = sim.Model(slots=2, cold_start_s=100, minimum=1)
    work = [sim.Call(0, 50), sim.Call(10, 30), sim.Call(20, 10),     # 3 at once in 20..30
            sim.Call(300, 20), sim.Call(305, 5), sim.Call(310, 10),  # 305..310 ends as 310
            sim.Call(500, 10), sim.Call(500, 10), sim.Call(500, 10),  # starts: never 3
            sim.Call(550, 5), sim.Call(550, 5), sim.Call(550, 5)]
    # Replica 1: the whole 600 s. Replica 2 is needed in 20..30 (asked for before the
    # window opened: it counts from 0, 20 s), 500..510 (the gap since 30 is over a cold
    # start: asked for 100 s ahead, + 10 s) and 550..555 (a 40 s gap: kept, + 5 s).
    # The call ending at 310 frees its slot for the one arriving at 310: no third slot.
    seconds = 600 + (20 + 10) + (100 + 10) + (40 + 5)
    assert sim.clairvoyant(work, model, horizon=600) == pytest.approx(seconds / 60)
    # nothing but the floor when one replica always suffices
    assert sim.clairvoyant([sim.Call(0, 5)], model, horizon=600) == pytest.approx(10.0)


def test_clairvoyant_on_the_conv_hour_is_about_400_replica_minutes_at_peak_8():
    model = sim.Model()
    work = sim.calls(conv_hour(), model)
    assert 390 <= sim.clairvoyant(work, model) <= 410
    events = sorted([(c.arrival, 1) for c in work] + [(c.arrival + c.hold_s, -1) for c in work])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    assert math.ceil(peak / model.slots) == 8


def test_on_the_conv_hour_ours_meets_the_smooth_goal():
    model = sim.Model()
    work = sim.calls(conv_hour(), model)
    limit = sim.clairvoyant(work, model)
    ours = sim.run(work, sim.predictive, model)
    assert ours.late_share <= 0.005 and ours.p95_queue_delay_s == 0
    assert ours.replica_minutes <= 1.2 * limit


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_on_bursty_code_completion_traffic_ours_meets_the_bursty_goal(seed):
    model = sim.Model()
    work = sim.calls(traces.code_completion(seed), model)
    limit = sim.clairvoyant(work, model)
    base, ours = sim.compare(work, model)
    assert ours.late_share <= 0.02 and ours.p95_queue_delay_s <= 1.0
    assert ours.replica_minutes <= 1.5 * limit
    assert base.late_share > 10 * ours.late_share  # the baseline leaves far more waiting


def test_on_a_working_day_ours_meets_the_smooth_goal():
    model = sim.Model()
    work = sim.calls(traces.working_day(1), model)
    ours = sim.run(work, sim.predictive, model)
    assert ours.late_share <= 0.005 and ours.p95_queue_delay_s == 0
    assert ours.replica_minutes <= 1.2 * sim.clairvoyant(work, model)


def test_synthetic_traces_have_their_shape_and_are_seeded():
    bursty = traces.code_completion(1)
    assert bursty == traces.code_completion(1) and bursty != traces.code_completion(2)
    per_second: dict[int, int] = {}
    for t, _, _ in bursty:
        per_second[int(t)] = per_second.get(int(t), 0) + 1
    assert max(per_second.values()) >= 20, "bursts of tens of requests within a second"
    first = sum(1 for t, _, _ in bursty if t < 600)
    last = sum(1 for t, _, _ in bursty if t >= 3000)
    assert last > 1.8 * first, "a climbing rate (and a step in the last fifth)"
    assert sorted(c for _, c, _ in bursty)[len(bursty) // 2] > 2000, "contexts of thousands"
    day = traces.working_day(1)
    hourly = [0] * 24
    for t, _, _ in day:
        hourly[int(t // 3600)] += 1
    assert hourly[3] < hourly[10] / 3, "a quiet night, a busy day"
    assert hourly[12] > 1.2 * hourly[10], "the lunch burst"
    # the batch step: up while the evening declines, and down by more than the decline
    assert hourly[19] > hourly[18] and hourly[20] - hourly[21] > 5000, "the batch step"


def test_sweep_traces_each_policys_frontier_and_ours_dominates_on_bursts(monkeypatch):
    # The margins' knobs alone: the young pool's floor is a fixed cost of the first cold
    # start that moves ours' cheap end (docs/design.md's frontier column shows it).
    monkeypatch.setenv("SIDECAR_SCALER_PRIOR_FLOOR", "0")
    model = sim.Model()
    work = sim.calls(traces.code_completion(3), model)
    points = frontier.sweep(work, model)
    assert {p.policy for p in points} == {"baseline", "predictive"}
    assert len(points) == len(frontier.BASELINE_TARGETS) + len(frontier.PREDICTIVE_KNOBS)
    for name in ("baseline", "predictive"):
        line = frontier.frontier(points, name)
        assert line and all(a.replica_minutes <= b.replica_minutes and
                            a.late_share >= b.late_share
                            for a, b in itertools.pairwise(line))
    # Where the baseline leaves under 29 % waiting, ours dominates; above, both are useless
    # (docs/design.md's frontier goal states the exception).
    assert [p for p in frontier.undominated(points) if p.late_share < 0.29] == []
    text = frontier.table(points, sim.clairvoyant(work, model))
    assert text.splitlines()[2].startswith("| clairvoyant |")


def test_dominance_compares_at_equal_replica_minutes():
    p = frontier.Point
    points = [p("predictive", "a", 0.20, 0, 100), p("predictive", "b", 0.02, 0, 200),
              p("baseline", "x", 0.15, 0, 150), p("baseline", "y", 0.05, 0, 150)]
    # ours at 150: halfway, 11 % — better than x's 15 %, worse than y's 5 %
    assert frontier.misses_at(points, "predictive", 150) == pytest.approx(0.11)
    assert [q.knob for q in frontier.undominated(points)] == ["y"]
    assert frontier.misses_at(points, "predictive", 50) is None


def test_two_pools_fall_back_to_the_small_model_when_large_has_no_warm_capacity():
    model = sim.Model(slots=2, cold_start_s=100, minimum=1, maximum=1)
    routes = {level: {"large": 16} for level in ("low", "medium", "high")}
    work = [sim.Call(0.0, 10.0) for _ in range(4)] + [sim.Call(0.5, 1.0)]
    result = twopool.run_pools(work, sim.baseline, model, routes=routes,
                               large_cold_start_s=100)
    # large has one replica of two slots: two served there, two by small, the fifth waits
    assert result.served_by_smaller_model == 2
    assert result.waited == 1
    assert result.pools["large"].requests == 3 and result.pools["small"].requests == 2


def test_two_pools_on_bursty_traffic_report_per_pool_and_use_the_levels():
    model = sim.Model()
    work = sim.calls(traces.code_completion(1), model)
    base, ours = (twopool.run_pools(work, f, model) for f in sim.POLICIES.values())
    for r in (base, ours):
        assert set(r.pools) == {"small", "large"}
        assert all(p.replica_minutes > 0 for p in r.pools.values())
        assert r.clairvoyant_minutes["small"] > 0
        assert sum(r.levels.values()) == pytest.approx(math.ceil(work[-1].arrival + 1))
    assert base.levels.get("high", 0) > 0 and base.served_by_smaller_model > 0
    assert ours.waited_after_first_window < base.waited_after_first_window / 10
    assert "served by the smaller model" in twopool.table([base, ours])


def test_two_pools_refuse_a_routing_table_that_is_not_16_slots():
    with pytest.raises(ValueError, match="16 slots"):
        twopool.tables({"low": {"small": 15}})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "simulate", *args],
                          capture_output=True, text=True, timeout=300)


def test_simulate_prints_the_clairvoyant_row_and_says_what_it_counts(tmp_path):
    done = run_cli("--synthetic", "code-completion", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert "| clairvoyant |" in done.stdout and "× clairvoyant" in done.stdout
    assert "after the first cold-start window" in done.stdout
    rows = json.loads(run_cli("--synthetic", "code-completion", "--json").stdout)
    assert [r["policy"] for r in rows] == ["baseline", "predictive"]
    assert all(r["vs_clairvoyant"] > 0 for r in rows)


def test_simulate_sweep_and_pools_commands(tmp_path):
    plot = tmp_path / "frontier.png"
    done = run_cli("--synthetic", "code-completion", "--seed", "3", "--sweep", "--plot",
                   str(plot))
    assert done.returncode == 0, done.stderr
    # The verdict is printed (which one: test_sweep_traces_each_policys_frontier_…).
    assert "ours dominates the baseline's frontier" in done.stdout or \
        "baseline points ours does not dominate: " in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = run_cli("--synthetic", "code-completion", "--pools", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert set(rows[0]["replica_minutes"]) == {"small", "large"}
    assert "served_by_smaller_model" in rows[1]
    bad = run_cli("--synthetic", "code-completion", "--pools", "--routes", '{"low": 3}')
    assert bad.returncode == 2 and "--routes" in bad.stderr
    neither = run_cli()
    assert neither.returncode == 2 and "--trace FILE or --synthetic NAME" in neither.stderr


def test_the_simulated_pods_queue_each_their_own_and_the_signal_is_the_worst_one():
    fleet = sim._Fleet(3, slots=2)
    for i in range(7):  # six slots, then one call queues at the shortest queue
        fleet.arrive(sim.Call(0.0, 10.0 + i))
    assert fleet.busy == 6 and fleet.queued == 1
    assert max(s.waiting / s.running for s in fleet.samples()) == 0.5, \
        "one waiting per two running at that pod"
    assert fleet.queued / fleet.busy < 0.5, "the fleet's mean is diluted by the others"
    signal = policy.pressure(fleet.samples())
    assert signal.queued == 0.5 and signal.gpu_utilization == 1.0
    fleet.resize(5, 1.0)  # new replicas start empty; the queue stays at its pod
    assert fleet.queued == 1 and fleet.has_room(1.0)
    fleet.resize(1, 2.0)  # the least loaded replicas go: the one with the queue stays
    assert len(fleet.pods) == 1 and fleet.queued == 1
    fleet.drain()
    assert fleet.queued == 0 and fleet.busy == 0 and len(fleet.waits) == 7
