"""A request's plan from the router's one door: its placement is decided when it is made
(before the first send), trying candidates decides nothing more, and only what served is
reported back."""

from __future__ import annotations

import asyncio
import json

from sidecar.config import load_settings
from sidecar.fleet.podload import PodLoad
from sidecar.fleet.pools import EndpointState, PoolSet
from sidecar.routing.router import Router
from sidecar.routing.store import MemoryStore

URLS = [f"http://127.0.0.1:{9100 + i}" for i in range(4)]
SMALL = ["http://127.0.0.1:9200"]
IDLE = PodLoad(2, 0, 0.2, 0.0, "metrics", 0.0, 5.0)
QUEUED = PodLoad(8, 6, 0.95, 0.0, "metrics", 0.0, 4.0)


def make_router() -> Router:
    settings = load_settings({"SIDECAR_POOLS": json.dumps({
        "big": {"model": "m", "endpoints": URLS, "fallback": "small",
                "metrics_path": "/metrics"},
        "small": {"model": "s", "endpoints": SMALL}})})
    router = Router(settings, PoolSet(settings), MemoryStore(60))
    for endpoint in router.pools.all_endpoints():
        endpoint.outlier.state = EndpointState.READY
        endpoint.set_load(IDLE, False)
    return router


async def test_open_counts_the_call_on_its_session_until_close() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    again = await router.open("s-1", 1.0, local=False)
    assert plan.route is again.route and plan.route.inflight == 2
    plan.close()
    again.close()
    assert plan.route.inflight == 0


async def test_candidates_run_home_then_the_pool_by_rank_then_the_fallback() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    home = plan.route.endpoint
    assert home is not None and plan.ahead is None
    order = [(pool.name, e.url) for pool, e in plan.candidates(1.0)]
    ranked = [e.url for e in router.pools.pools["big"].ranked(b"s-1") if e is not home]
    assert order == [("big", home.url), *[("big", url) for url in ranked],
                     ("small", SMALL[0])]


async def test_a_saturated_home_moves_when_the_plan_is_made_not_while_it_is_tried() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    home = plan.route.endpoint
    assert home is not None
    plan.close()
    home.set_load(QUEUED, True)
    budget = home.move_budget
    assert budget > 0
    plan = await router.open("s-1", 2.0, local=False, body=b"x" * 400)
    assert plan.ahead is not None and plan.ahead is not home
    assert home.move_budget == budget - 1
    moved = plan.moved
    tried = list(plan.candidates(2.0))
    # Walking every candidate (every attempt failing) decides no further move.
    assert moved is not None and moved.startswith(f"moved from {home.url}: saturated")
    assert home.move_budget == budget - 1 and plan.moved == moved
    assert [e for _, e in tried][:2] == [plan.ahead, home]
    plan.served(*tried[0])
    assert plan.route.endpoint is plan.ahead and router.counters.session_moves == 1
    assert plan.route.reason == moved


async def test_a_spilled_call_and_its_resumes_leave_the_route_as_it_was() -> None:
    router = make_router()
    first = await router.open("s-1", 1.0, local=False)
    home = first.route.endpoint
    assert home is not None
    home.set_load(QUEUED, True)
    home.move_budget = 0  # this sidecar has moved its share: the session stays home
    second = await router.open("s-1", 1.0, local=False)
    assert second.spill is not None and second.ahead is second.spill
    pool = router.pools.pools["big"]
    second.served(pool, second.spill)
    elsewhere = next(e for e in pool.endpoints if e not in (home, second.spill))
    second.served(pool, elsewhere, "resumed after a break mid-stream")
    assert second.route.endpoint is home and router.counters.route_changes == 0
    assert router.counters.spills == 1


async def test_a_failover_answer_moves_the_route_once() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    pool = router.pools.pools["big"]
    home = plan.route.endpoint
    other = next(e for e in pool.ranked(b"s-1") if e is not home)
    plan.served(pool, other, "connect_error from home")
    plan.served(pool, other, "resumed after a break mid-stream")
    assert plan.route.endpoint is other and plan.route.reason == "connect_error from home"
    assert router.counters.route_changes == 1


async def test_resume_candidates_skip_the_broken_pod_and_keep_the_rank() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    pool = router.pools.pools["big"]
    broken = plan.route.endpoint
    assert broken is not None
    assert [e for _, e in plan.resume_candidates(pool, broken, 1.0)] == \
        [e for e in pool.ranked(b"s-1") if e is not broken]


async def test_a_request_naming_another_pool_writes_no_route() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    plan.close()
    other = await router.open("s-1", 1.0, local=False, named="small")
    assert other.serving is not other.route and other.local
    assert [pool.name for pool, _ in other.candidates(1.0)] == ["small"]
    other.served(router.pools.pools["small"], router.pools.pools["small"].endpoints[0])
    assert other.route.pool == "big" and router.counters.route_changes == 0
    other.close()
    assert other.route.inflight == 0


async def test_a_call_still_in_flight_when_its_session_ended_writes_no_route_back() -> None:
    router = make_router()
    plan = await router.open("s-1", 1.0, local=False)
    assert await router.store.get("s-1") is not None
    await router.end("s-1", local=False)  # a sibling call carried x-session-final
    pool = router.pools.pools["big"]
    other = next(e for e in pool.ranked(b"s-1") if e is not plan.route.endpoint)
    plan.served(pool, other, "connect_error from home")  # this call failed over
    await router.close()
    assert await router.store.get("s-1") is None and router.unwritten_moves == 0


class HeldStore(MemoryStore):
    """A store whose first touch answers only when released, with the record it holds."""

    def __init__(self) -> None:
        super().__init__(60)
        self.release = asyncio.Event()
        self.fails = False

    async def get_or_create(self, session: str, record: bytes) -> bytes:
        await self.release.wait()
        if self.fails:
            raise RuntimeError("the store broke")
        return await super().get_or_create(session, record)


async def test_calls_waiting_on_a_first_touch_count_where_it_lands() -> None:
    """While a session's first touch is in flight, the calls waiting on it count at the pod
    it proposes; when the store answers with another pod's route (another sidecar placed
    the session), they count there instead; when it fails, nowhere."""
    router = make_router()
    store = HeldStore()
    router.store = store
    proposed, held = router.pools.pools["big"].ranked(b"elsewhere")[:2]
    other = router.propose("elsewhere", None)
    other.endpoint = held
    await MemoryStore.get_or_create(store, "elsewhere", other.record())
    for endpoint in router.pools.all_endpoints():
        endpoint.set_load(IDLE, False)  # a reading: the counts start over
    calls = [asyncio.create_task(router.resolve("elsewhere", None, local=False))
             for _ in range(3)]
    await asyncio.sleep(0)
    assert (proposed.since_load(), held.since_load()) == (3, 0)  # its pick and two waiting
    store.release.set()
    routes = await asyncio.gather(*calls)
    assert {route.endpoint for route in routes} == {held}
    assert (proposed.since_load(), held.since_load()) == (1, 2)

    # Taken over (the first request's app went away): the waiting calls follow the new
    # proposal; failed: they count nowhere.
    for fails in (False, True):
        router = make_router()
        router.store = store = HeldStore()
        store.fails = fails
        big = router.pools.pools["big"].endpoints
        for endpoint in big:
            endpoint.set_load(IDLE, False)
        calls = [asyncio.create_task(router.resolve("s-2", None, local=False))
                 for _ in range(3)]
        await asyncio.sleep(0)
        calls[0].cancel()
        await asyncio.sleep(0)
        store.release.set()
        answers = await asyncio.gather(*calls[1:], return_exceptions=True)
        # Two picks (the first touch's and the take-over's), plus the waiting calls unless
        # the touch failed.
        assert sum(e.since_load() for e in big) == (2 if fails else 4)
        if not fails:
            landed = answers[0].endpoint
            assert answers[1].endpoint is landed and landed.since_load() >= 3
