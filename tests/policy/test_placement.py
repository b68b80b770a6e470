"""Sticky until saturated, as pure decisions, and the metrics parser that feeds them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.fleet.podload import MetricsParseError, PodLoad, parse_metrics, with_rate
from sidecar.policy.placement import (
    SATURATED_KV,
    SPILL_CHOICES,
    SpillPod,
    choose_move,
    choose_new,
    choose_seed,
    choose_spill,
    full_now,
    longest_wait_s,
    move_budget,
    occupancy_now,
    reprefill_s,
    saturated,
    wait_now_s,
)
from sidecar.tools.fakellm.engine import Engine


def load(running: float = 0, waiting: float = 0, kv: float = 0.0, rate: float = 0.0
         ) -> PodLoad:
    return PodLoad(running, waiting, kv, 1000.0, "metrics", 0.0, rate)


loads = st.builds(load, st.integers(0, 64), st.integers(0, 64),
                  st.floats(0, 1), st.floats(0, 50))
prompts = st.integers(0, 200_000)


def test_a_sidecars_own_reading_moves_as_many_sessions_as_the_pod_queues():
    assert move_budget(load(8, 3), 0, shared=False, draw=0.99) == 3
    assert move_budget(load(8, 2.5), 5, shared=False, draw=0.0) == 3
    assert move_budget(load(7, 0), 7, shared=False, draw=0.0) == 0  # not saturated


def test_a_shared_reading_moves_this_sidecars_share_of_the_queue():
    # All of the pod's calls are this sidecar's: the whole queue, as from its own reading.
    assert move_budget(load(8, 4), 12, shared=True, draw=0.99) == 4
    # None of them: nothing to move (the sidecars with calls there move them).
    assert move_budget(load(8, 4), 0, shared=True, draw=0.0) == 0
    # A third of them: 4/3 → 1, or 2 when the draw falls under the third left over.
    assert move_budget(load(8, 4), 4, shared=True, draw=0.5) == 1
    assert move_budget(load(8, 4), 4, shared=True, draw=0.2) == 2
    assert move_budget(None, 4, shared=True, draw=0.0) == 0


@given(st.integers(1, 64), st.integers(1, 64),
       st.lists(st.integers(0, 16), min_size=1, max_size=12), st.floats(0, 0.999))
def test_a_fleet_sharing_one_reading_moves_at_most_the_queue_plus_rounding(
        running, waiting, inflights, draw):
    """Sidecars whose calls add up to the pod's: the budgets sum to the queue, give or take
    one per sidecar for the rounding (never each sidecar the whole queue)."""
    total = sum(inflights)
    if total == 0 or total > running + waiting:
        return
    budgets = [move_budget(load(running, waiting), n, shared=True, draw=draw)
               for n in inflights]
    assert sum(budgets) <= waiting * total / (running + waiting) + len(inflights)
    assert all(b <= waiting for b in budgets)


@given(loads, st.integers(1, 7), prompts)
def test_no_session_moves_when_all_pods_are_equally_loaded(pod, others, prompt):
    assert choose_move(pod, [pod] * others, prompt) is None


@given(loads, loads, prompts)
def test_moves_never_oscillate(a, b, prompt):
    """If a session would move A → B, a session on B never moves back to A."""
    if choose_move(a, [b], prompt) == 0:
        assert choose_move(b, [a], prompt) is None


@given(loads, st.lists(loads, min_size=1, max_size=7), prompts)
def test_a_move_only_when_the_avoided_wait_exceeds_the_reprefill(current, others, prompt):
    index = choose_move(current, others, prompt)
    if index is not None:
        assert saturated(current) and not saturated(others[index])
        assert wait_now_s(SpillPod(current)) - wait_now_s(SpillPod(others[index])) \
            > reprefill_s(prompt)
        assert others[index].running + others[index].waiting + 1 <= current.running


def test_a_move_counts_this_sidecars_calls_since_the_readings():
    """The reading shows room on the target; this sidecar's moves since have filled it."""
    current = SpillPod(load(running=8, waiting=4, rate=8.0), slots=8)
    target = SpillPod(load(running=4), slots=8)
    assert choose_move(current, [target], 1_000) == 0
    assert choose_move(current, [target._replace(local=4, since_view=4)], 1_000) is None
    assert choose_move(current, [target._replace(ready=False)], 1_000) is None
    # the wait at home grows with this sidecar's own calls there since its reading
    short = SpillPod(load(running=8, waiting=1, rate=20.0), slots=8)
    assert choose_move(short, [target], 1_500) is None  # 0.1 s of wait < 0.15 s of prefill
    assert choose_move(short._replace(local=3, since_view=3), [target], 1_500) == 0


def test_a_queued_pod_moves_a_short_conversation_to_an_idle_one():
    hot = load(running=8, waiting=6, kv=0.5, rate=4.0)  # wait ≈ 7 / 4 s = 1.75 s
    assert choose_move(hot, [load(running=8, waiting=1), load(running=2)], 2_000) == 1


def test_a_long_conversation_stays_when_reprefilling_costs_more_than_the_queue():
    hot = load(running=8, waiting=1, rate=8.0)   # wait ≈ 2 / 8 s = 0.25 s
    assert choose_move(hot, [load(running=0)], 2_000) == 0   # 0.2 s to re-prefill
    assert choose_move(hot, [load(running=0)], 50_000) is None  # 5 s to re-prefill


def test_a_pod_with_room_keeps_its_sessions():
    assert choose_move(load(running=7, kv=0.5), [load()], 0) is None
    assert choose_move(None, [load()], 0) is None


def test_full_kv_cache_is_saturation():
    assert saturated(load(running=3, kv=SATURATED_KV))
    assert choose_move(load(running=3, kv=0.95), [load(running=1)], 10) == 0


@given(st.lists(st.integers(0, 20), min_size=2, max_size=8))
def test_new_sessions_keep_their_first_choice_when_pods_are_equal(counts):
    n = counts[0]
    pods = [load(running=n)] * len(counts)
    assert choose_new(pods, [0] * len(counts), 1.25) == 0


def test_new_sessions_avoid_a_saturated_first_choice():
    pods = [load(running=8, waiting=5), load(running=3), load(running=2), load()]
    assert choose_new(pods, [0, 0, 0, 0], 1.25) == 1


def test_new_sessions_look_only_at_their_first_three_choices():
    pods = [load(running=8, waiting=5)] * 3 + [load()]
    assert choose_new(pods, [0] * 4, 1.25) in (0, 1, 2)


def test_new_sessions_pass_over_a_pod_this_sidecars_burst_filled_since_its_reading():
    pods = [load(running=5), load(running=6), load(running=6)]
    assert choose_new(pods, [3, 0, 0], 1.25, [0, 0, 0], [8, 8, 8]) == 0
    assert choose_new(pods, [3, 0, 0], 1.25, [3, 0, 0], [8, 8, 8]) == 1
    assert choose_new(pods, [3, 0, 0], 1.25, [3, 0, 0], [0, 0, 0]) == 0, "slots unknown"


def test_without_a_load_view_the_local_in_flight_counts_bound_the_load():
    assert choose_new([None, None, None], [9, 0, 0], 1.25) == 1
    assert choose_new([None, None], [0, 0], 1.25) == 0


# -- the metrics page --------------------------------------------------------------------

VLLM_PAGE = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
vllm:num_requests_running_created 1.7e9
process_cpu_seconds_total 12.5
"""


def test_parser_sums_engines_and_averages_kv_usage():
    parsed = parse_metrics(VLLM_PAGE, 5.0)
    assert (parsed.running, parsed.waiting, parsed.kv_usage, parsed.completed) == \
        (8.0, 2.0, pytest.approx(0.6), 12.0)


def test_parser_reads_the_pre_v1_kv_gauge():
    page = (b"vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n"
            b'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n')
    assert parse_metrics(page, 0).kv_usage == 0.25


@pytest.mark.parametrize("page", [b"", b'{"object": "list"}', b"vllm:num_requests_running x\n",
                                  b"vllm:num_requests_running{a=\"1\" 3\n",
                                  b"vllm:num_requests_running 1\n"])
def test_parser_refuses_what_is_not_a_vllm_page(page):
    with pytest.raises(MetricsParseError):
        parse_metrics(page, 0)


def test_parser_reads_fake_llms_own_page():
    engine = Engine()
    engine.lookup(["a" * 400], 4096, 0)
    page = engine.metrics('model "x"', 1000).encode()
    parsed = parse_metrics(page, 0)
    assert (parsed.running, parsed.waiting, parsed.kv_usage) == (0.0, 0.0, 0.0)


def test_completion_rate_is_measured_between_scrapes():
    first = PodLoad(1, 0, 0, 10.0, "metrics", 100.0)
    second = PodLoad(1, 0, 0, 12.0, "metrics", 110.0)
    assert with_rate(first, second).rate == 5.0
    restarted = PodLoad(1, 0, 0, 14.0, "metrics", 3.0)
    assert with_rate(second, restarted).rate == 0.0


def test_a_pod_at_half_speed_counts_its_sessions_twice_for_new_sessions():
    # Same requests on each pod, but the first completes them at half the rate.
    slow, fast = load(running=4, rate=2.0), load(running=4, rate=4.0)
    assert choose_new([slow, fast, fast, fast], [0] * 4, 1.25) == 1
    assert choose_new([fast, slow, fast, fast], [0] * 4, 1.25) == 0


# -- a session's parallel calls spill (one call at a time; the route stays) -------------

maybe_loads = st.one_of(st.none(), loads)
spill_pods = st.builds(SpillPod, maybe_loads, st.integers(0, 64), st.integers(-8, 16),
                       st.sampled_from([0.0, 1.0, 4.0, 8.0, 64.0]), st.booleans())
choice_lists = st.lists(spill_pods, max_size=4)


@given(spill_pods, choice_lists)
def test_a_lone_call_never_spills(home, choices):
    assert choose_spill(home, 0, choices) is None


@given(spill_pods, st.integers(1, 16), st.integers(1, 4))
def test_nothing_spills_when_all_pods_are_equally_loaded(pod, inflight, n):
    assert choose_spill(pod, inflight, [pod] * n) is None


@given(spill_pods, st.integers(1, 16), choice_lists)
def test_a_spill_goes_only_to_a_ready_pod_with_room_less_loaded_than_home(
        home, inflight, choices):
    index = choose_spill(home, inflight, choices)
    if index is None:
        return
    target = choices[index]
    assert full_now(home) and target.ready and target.load is not None
    assert not saturated(target.load) and not full_now(target)
    assert occupancy_now(target) + 1 <= occupancy_now(home)


def eligible(home: SpillPod, pod: SpillPod) -> bool:
    return (pod.ready and pod.load is not None and not saturated(pod.load)
            and not full_now(pod) and occupancy_now(pod) + 1 <= occupancy_now(home))


@given(spill_pods, st.integers(1, 16), choice_lists, prompts, st.lists(st.booleans()))
def test_a_spill_goes_where_the_prefix_is_else_only_where_prefilling_beats_the_wait(
        home, inflight, choices, prompt, warm):
    index = choose_spill(home, inflight, choices, prompt, warm)
    if not full_now(home):
        assert index is None
        return
    ok = [i for i, pod in enumerate(choices) if eligible(home, pod)]
    hot = [i for i in ok if i < len(warm) and warm[i]]
    cold = [i for i in ok if i < SPILL_CHOICES and reprefill_s(prompt) < wait_now_s(home)]
    if hot:
        assert index == hot[0]  # the first choice that has it cached, however loaded
    elif cold:
        def cost(i: int) -> float:
            return occupancy_now(choices[i]) + choices[i].load.kv_usage
        assert index in cold and all(cost(index) <= cost(i) for i in cold)
        assert all(cost(index) < cost(i) for i in cold if i < index)  # rendezvous ties
    else:
        assert index is None


@given(spill_pods, st.integers(1, 16), choice_lists, prompts)
def test_a_spill_to_a_cold_pod_pays_for_its_prefill_with_the_wait_it_avoids(
        home, inflight, choices, prompt):
    index = choose_spill(home, inflight, choices, prompt)
    if index is not None:
        assert reprefill_s(prompt) < wait_now_s(home) and index < SPILL_CHOICES


def test_a_parallel_call_spills_to_an_idle_next_choice_and_not_to_a_busy_one():
    home = SpillPod(load(running=8, waiting=3), local=6)
    busy, idle = SpillPod(load(running=8, waiting=1)), SpillPod(load(running=1))
    assert choose_spill(home, 5, [busy, idle]) == 1
    assert choose_spill(home, 5, [busy, idle._replace(ready=False)]) is None
    # the less loaded of the two, unless the other had this prefix sent to it before
    assert choose_spill(home, 5, [SpillPod(load(running=6)), idle]) == 1
    assert choose_spill(home, 5, [SpillPod(load(running=6)), idle], 0, [True, False]) == 0
    # this sidecar's own calls there count even when the view has not seen them yet
    assert choose_spill(home, 5, [idle._replace(local=11)]) is None
    assert choose_spill(SpillPod(load(running=8), 8), 5, [idle]) is None  # home has room


def test_a_long_prompt_waits_at_home_unless_its_prefix_is_cached_elsewhere():
    """Home queues three calls at 20 completions/s: 0.2 s of wait. A 1 000-token prompt
    prefills in 0.1 s anywhere; a 10 000-token one takes 1 s cold, so it spills only to the
    pod that had its prefix sent there before, wherever that pod is in the order."""
    home = SpillPod(load(running=8, waiting=3, rate=20.0), local=4)
    first, second, third = (SpillPod(load(running=2, rate=20.0)) for _ in range(3))
    assert wait_now_s(home) == pytest.approx(0.2)
    assert choose_spill(home, 1, [first, second, third], 1_000) == 0
    assert choose_spill(home, 1, [first, second, third], 10_000) is None
    assert choose_spill(home, 1, [first, second, third], 10_000, [False, False, True]) == 2


def test_a_subagent_starts_on_its_parents_pod_else_on_the_next_one_with_room():
    room, full = SpillPod(load(running=3), slots=8), SpillPod(load(running=8, waiting=2))
    assert choose_seed([room, room]) == 0
    assert choose_seed([full, room]) == 1
    assert choose_seed([full, full, room]) is None  # the child's own pick, not a third pod
    assert choose_seed([room._replace(local=6, since_view=5), room]) == 1  # filled since
    assert choose_seed([room._replace(ready=False), room]) == 1


def test_a_subagent_with_a_long_prompt_queues_briefly_at_its_parents_pod():
    """The parent's pod runs 8 calls at 20 completions/s (0.4 s each) and one more is
    ahead: the wait is 0.1 s on average, 0.4 s at most (all 8 started together). A
    500-token prompt prefills in 0.05 s on the next choice; a 6 000-token one would take
    0.6 s there, so it waits at the parent's pod, where the parent's prompt is cached,
    unless a sibling has already taken that prompt to the next choice."""
    parents = SpillPod(load(running=8, rate=20.0), local=1, since_view=1, slots=8)
    room = SpillPod(load(running=2, rate=20.0), slots=8)
    assert wait_now_s(parents) == pytest.approx(0.1)
    assert longest_wait_s(parents) == pytest.approx(0.4)
    assert choose_seed([parents, room], 500) == 1
    assert choose_seed([parents, room], 6_000) == 0
    assert choose_seed([parents, room], 6_000, [True, True]) == 1
    # nine calls ahead: two pod-fulls, 0.8 s, longer than the prefill: the next choice (or,
    # both full, a pick of its own)
    long_queue = parents._replace(local=8, since_view=8)
    assert longest_wait_s(long_queue) == pytest.approx(0.8)
    assert choose_seed([long_queue, room], 6_000) == 1
    assert choose_seed([long_queue, long_queue], 6_000) is None
    # where a sibling already started cold, the prompt is cached: the next one follows
    assert choose_seed([long_queue, long_queue, room], 6_000, [False, False, True]) == 2
    assert choose_seed([long_queue, long_queue, room], 6_000) is None  # not a third cold pod


@given(spill_pods)
def test_the_longest_wait_is_never_shorter_than_the_average(pod):
    assert longest_wait_s(pod) >= wait_now_s(pod) * (1 - 1e-9)
    assert (longest_wait_s(pod) > 0) == full_now(pod)


@given(st.lists(spill_pods, min_size=1, max_size=4), prompts, st.lists(st.booleans()))
def test_a_subagent_never_waits_longer_than_the_prefill_it_saves(pods, prompt, warm):
    """Wherever a child starts it is ready; a full pod only while its wait costs no more
    than a cold prefill; its parent's pod whenever that pod has room."""
    index = choose_seed(pods, prompt, warm)
    if pods[0].ready and not full_now(pods[0]):
        assert index == 0
    if index is None:
        return
    chosen = pods[index]
    assert chosen.ready and (index < 2 or (index < len(warm) and warm[index]))
    if full_now(chosen):
        assert longest_wait_s(chosen) <= reprefill_s(prompt)


def test_a_burst_spills_before_the_view_shows_the_queue():
    """The view (taken before the burst) shows room; the pod's slots are known from an
    earlier queue, and this sidecar's calls since fill them: the next call spills."""
    idle = SpillPod(load(running=1), slots=8)
    before = SpillPod(load(running=6), local=2, since_view=0, slots=8)
    assert choose_spill(before, 1, [idle]) is None
    filled = before._replace(local=4, since_view=2)
    assert full_now(filled) and choose_spill(filled, 3, [idle]) == 0
    drained = SpillPod(load(running=8, waiting=2), local=0, since_view=-4, slots=8)
    assert not full_now(drained), "calls that ended since the view free their slots"
