"""Endpoint picking: rendezvous stability, reloads and load views, tested directly (passive
health: test_outlier.py)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import load_settings
from sidecar.fleet.podload import PodLoad
from sidecar.fleet.pools import PREFIXES_REMEMBERED, Endpoint, EndpointState, PoolSet


def pool_set(endpoints: list[str], health_path: str | None = None) -> PoolSet:
    spec = {"model": "m", "endpoints": endpoints}
    if health_path:
        spec["health_path"] = health_path
    return PoolSet(load_settings({"SIDECAR_POOLS": json.dumps({"p": spec})}))


urls = st.lists(st.integers(min_value=1, max_value=60000), min_size=2, max_size=8,
                unique=True).map(lambda ports: [f"http://10.0.0.1:{p}" for p in ports])


@settings(max_examples=60, deadline=None)
@given(urls, st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=60), st.data())
def test_removing_an_endpoint_moves_only_its_own_sessions(endpoints, sessions, data):
    removed = data.draw(st.sampled_from(endpoints))
    before = pool_set(endpoints).pools["p"]
    after = pool_set([u for u in endpoints if u != removed]).pools["p"]
    for session in sessions:
        key = session.encode()
        was = before.pick(key).url
        now = after.pick(key).url
        if was != removed:
            assert now == was, "a session whose endpoint stayed must not move"
        else:
            assert now != removed


@settings(max_examples=30, deadline=None)
@given(urls, st.text(min_size=1, max_size=20))
def test_every_pod_picks_the_same_endpoint_whatever_the_listing_order(endpoints, session):
    forward = pool_set(endpoints).pools["p"].pick(session.encode()).url
    backward = pool_set(list(reversed(endpoints))).pools["p"].pick(session.encode()).url
    assert forward == backward


def test_pick_prefers_a_ready_endpoint_over_a_better_ranked_ejected_one():
    pools = pool_set(["http://a:1", "http://b:1", "http://c:1"])
    pool = pools.pools["p"]
    ranked = pool.ranked(b"s")
    ranked[0].outlier.state = EndpointState.EJECTED
    assert pool.pick(b"s") is ranked[1]


def test_endpoints_of_pools_with_health_path_start_warming():
    assert pool_set(["http://a:1"], "/health").pools["p"].endpoints[0].state is \
        EndpointState.WARMING
    assert pool_set(["http://a:1"]).pools["p"].endpoints[0].state is EndpointState.READY


def test_reload_keeps_state_of_endpoints_that_stay_and_drains_removed_ones():
    pools = pool_set(["http://a:1", "http://b:1"])
    a, b = pools.pools["p"].endpoints
    a.inflight = 3
    settings_ = load_settings({"SIDECAR_POOLS": json.dumps(
        {"p": {"model": "m", "endpoints": ["http://a:1", "http://c:1"]}})})
    changes = pools.apply(settings_.pools, settings_.api_keys)
    assert changes == {"added": ["http://c:1"], "removed": ["http://b:1"]}
    assert pools.pools["p"].endpoints[0] is a and a.inflight == 3
    assert b.state is EndpointState.DRAINING


def test_a_load_view_notes_what_it_saw_and_the_slots_the_pod_ran_while_it_queued():
    endpoint = Endpoint("http://a", "p", EndpointState.READY)
    endpoint.inflight = 3
    endpoint.set_load(PodLoad(5, 0, 0.1, 1.0, "metrics"), False)
    assert endpoint.inflight_at_load == 3 and endpoint.slots == 0, "no queue: slots unknown"
    endpoint.set_load(PodLoad(8, 2, 0.3, 2.0, "metrics"), True)
    assert endpoint.slots == 8
    endpoint.inflight = 5
    endpoint.set_load(PodLoad(4, 0, 0.1, 3.0, "metrics"), False)
    assert endpoint.slots == 8 and endpoint.inflight_at_load == 5, "kept until it queues again"
    endpoint.set_load(PodLoad(6, 1, 0.95, 4.0, "metrics"), True)
    assert endpoint.slots == 6, "a queue at fewer running (KV full) is the newer limit"


def test_a_pod_remembers_the_latest_prefixes_sent_past_their_sessions_pod():
    endpoint = Endpoint("http://a", "p", EndpointState.READY)
    for i in range(PREFIXES_REMEMBERED + 1):
        endpoint.sent_prefix(b"%d" % i)
    endpoint.sent_prefix(b"1")  # sent again: the newest
    endpoint.sent_prefix(b"new")
    assert len(endpoint.prefixes) == PREFIXES_REMEMBERED
    assert b"1" in endpoint.prefixes and b"new" in endpoint.prefixes
    assert b"0" not in endpoint.prefixes and b"2" not in endpoint.prefixes
