"""The Redis fault matrix: every fault in every topology (one server, a Sentinel group, a 3+3
Cluster) on real servers, with two sidecars (one in this process, one its own process) and
three fake-llm pods, driven before, during and after the fault. Each cell asserts counts: every
call answered, no route lost, the store and pub/sub back without a restart, nothing leaked.

`python benchmarks/fault_matrix.py` runs this file and prints the outcomes as a table (each
cell appends its outcome to the file named by LLMSC_FAULT_MATRIX_OUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from redis.crc import key_slot

from sidecar.routing.store import route_key
from sidecar.server import Running
from tests.conftest import CHAT, Pod, SidecarProcess, pool, sidecar_env
from tests.deploy.test_redis_acl import create_users
from tests.support.polling import within
from tests.support.redis_server import (  # noqa: F401  (RedisServer marks this module `redis`)
    Cluster,
    Deployment,
    RedisServer,
    SentinelGroup,
    SlotMigration,
    Standalone,
    redis_binary,
    redis_version,
)

# The store's budget in every cell; each fault outlasts it many times over.
BUDGET_MS = 200
# Bounds that only catch a hang (the machine is shared: no timing is asserted finer).
CALL_BOUND_S = 10.0      # one chat call, answered
RECOVERY_BOUND_S = 15.0  # from the fault's end until both sidecars use the store again
PUBSUB_BOUND_S = 10.0    # until a route moved by one sidecar reaches the other
WRITE_BACK_BOUND_S = 5.0  # once the store is back, until a route moved meanwhile is in Redis
MAX_BATCHES = 60         # calls made during a fault: at most this many rounds of ~8
SESSIONS = 10            # sessions made before the fault
POLL_S = 0.05            # each poll asks the other process over HTTP: not too often

TOPOLOGIES = ("standalone", "sentinel", "cluster")


class Fault:
    """One fault: `begin` puts it in place, `progress` lets it run its course (a failover, a
    migration) while calls go on, `heal` ends it; the cell measures recovery from there."""

    name = ""
    hold_s = 1.0  # the least time calls run against the fault
    # A master killed before its replica had a write loses it (asynchronous replication):
    # routes first stored during such a fault are counted, not failed, when missing after.
    loses_unreplicated = False
    # A failover is over once the replica is promoted (the old master rejoins afterwards).
    over_after_progress = False

    def begin(self, d: Deployment, cell: Cell) -> None:
        raise NotImplementedError

    def progress(self, d: Deployment, cell: Cell) -> None:
        return None

    def heal(self, d: Deployment, cell: Cell) -> None:
        raise NotImplementedError


class Killed(Fault):
    name = "killed (all of it) and restarted"

    def begin(self, d: Deployment, cell: Cell) -> None:
        d.kill()

    def heal(self, d: Deployment, cell: Cell) -> None:
        d.restart()


class Hung(Fault):
    name = "hung (SIGSTOP 1.5 s, then SIGCONT)"
    hold_s = 1.5

    def begin(self, d: Deployment, cell: Cell) -> None:
        d.pause()

    def heal(self, d: Deployment, cell: Cell) -> None:
        d.resume()


class Slow(Fault):
    name = "slow (CLIENT PAUSE 300 ms of every 350, 2 s)"
    hold_s = 2.0

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    def begin(self, d: Deployment, cell: Cell) -> None:
        self.stack.enter_context(d.slow())

    def heal(self, d: Deployment, cell: Cell) -> None:
        self.stack.close()


class AclRevoked(Fault):
    name = "ACL user revoked (-@all, channels reset), then restored"

    def begin(self, d: Deployment, cell: Cell) -> None:
        for server in d.servers():
            server.client().execute_command("ACL", "SETUSER", "llm-sidecar", "-@all",
                                            "resetchannels")

    def heal(self, d: Deployment, cell: Cell) -> None:
        grant_users(d, cell.passwords)


class ClusterMasterKilled(Fault):
    name = "a master killed, its replica promoted"
    loses_unreplicated = True
    over_after_progress = True

    def begin(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, Cluster)
        # The master holding the session that moves during the fault.
        self.victim = d.owner(route_key(cell.sessions[0]))
        self.victim.stop()

    def progress(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, Cluster)
        slot = key_slot(route_key(cell.sessions[0]).encode())
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(Exception):
                if d.slot_owner(slot) is not self.victim:
                    return
            assert time.monotonic() < deadline, "no replica was promoted"
            time.sleep(0.05)

    def heal(self, d: Deployment, cell: Cell) -> None:
        self.victim.start()  # it rejoins as a replica of the promoted one


class SlotsMigrating(Fault):
    name = "slots migrating under load (ASK, then MOVED)"
    hold_s = 1.0

    def begin(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, Cluster)
        slot = key_slot(route_key(cell.sessions[0]).encode())
        source = d.slot_owner(slot)
        target = next(m for m in d.masters() if m is not source)
        self.migration: SlotMigration = d.migrate(slot, target)
        self.migration.step(SESSIONS // 2)  # half the slot's keys moved: the rest answer ASK

    def progress(self, d: Deployment, cell: Cell) -> None:
        deadline = time.monotonic() + self.hold_s
        while self.migration.step(1) and time.monotonic() < deadline:
            time.sleep(0.1)
        while time.monotonic() < deadline:  # new sessions keep landing with ASK meanwhile
            time.sleep(0.05)

    def heal(self, d: Deployment, cell: Cell) -> None:
        self.migration.finish()
        assert self.migration.moved >= SESSIONS, self.migration.moved


class SentinelFailover(Fault):
    name = "Sentinel failover (the primary killed)"
    loses_unreplicated = True
    over_after_progress = True

    def begin(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, SentinelGroup)
        [self.old] = d.masters()
        self.old.stop()

    def progress(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, SentinelGroup)
        [self.heir] = [n for n in d.servers() if n is not self.old]
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(Exception):
                if d.sentinel.master() == self.heir.port and \
                        self.heir.client().info("replication")["role"] == "master":
                    return
            assert time.monotonic() < deadline, "the sentinel did not promote the replica"
            time.sleep(0.05)

    def heal(self, d: Deployment, cell: Cell) -> None:
        assert isinstance(d, SentinelGroup)
        d.rejoin(self.old, self.heir)


FAULTS: dict[str, tuple[type[Fault], tuple[str, ...]]] = {
    "killed": (Killed, TOPOLOGIES),
    "hung": (Hung, TOPOLOGIES),
    "slow": (Slow, TOPOLOGIES),
    "master-failover": (ClusterMasterKilled, ("cluster",)),
    "slot-migration": (SlotsMigrating, ("cluster",)),
    "sentinel-failover": (SentinelFailover, ("sentinel",)),
    "acl-revoked": (AclRevoked, TOPOLOGIES),
}
CELLS = [(fault, topology) for topology in TOPOLOGIES for fault, (_, where) in FAULTS.items()
         if topology in where]


# -- the deployments, shared by the cells of a topology -----------------------------------

@pytest.fixture(scope="module")
def standalone() -> Iterator[Deployment]:
    d = Standalone()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def sentinel() -> Iterator[Deployment]:
    d = SentinelGroup()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Deployment]:
    d = Cluster()
    yield d
    d.cleanup()


SIDECAR_USER = "llm-sidecar"


def grant_users(d: Deployment, passwords: dict[str, str]) -> dict[str, tuple[str, str]]:
    """docs/operations.md's ACL users on every data node (ACLs are per node), same passwords."""
    extra = ("+cluster|slots", "+command") if d.mode == "cluster" else ()
    made: dict[str, tuple[str, str]] = {}
    for server in d.servers():
        made = create_users(server, *extra, passwords=passwords)
    return made


# -- one cell ----------------------------------------------------------------------------

@dataclass
class Cell:
    sessions: list[str]
    fresh: Iterator[str]          # sessions first seen during the fault
    passwords: dict[str, str] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # the details, for pytest's report
    in_place: bool = False  # the fault began and has not healed: heal it whatever happens
    failed: list[str] = field(default_factory=list)    # one short phrase each, for the table

    def check(self, ok: bool, short: str, detail: str = "") -> bool:
        if not ok:
            if short not in self.failed:
                self.failed.append(short)
            self.problems.append(f"{short}: {detail}" if detail else short)
        return ok


def session_names(prefix: str, same_slot: bool) -> Iterator[str]:
    """Session ids; with `same_slot` all of them in the first one's Cluster slot."""
    slot = key_slot(route_key(f"{prefix}-0").encode())
    i = 0
    while True:
        name = f"{prefix}-{i}"
        i += 1
        if not same_slot or key_slot(route_key(name).encode()) == slot:
            yield name


class Target:
    """A sidecar to call: in this process or its own."""

    def __init__(self, base: str, admin: str) -> None:
        self.base = base
        self.admin = admin


ANSWERS: dict[str, bytes] = {}  # the last answer that was not a 200, for the failure text


async def ask(http: aiohttp.ClientSession, target: Target, session: str
              ) -> tuple[int, str | None]:
    try:
        async with http.post(target.base + "/v1/chat/completions", json=CHAT,
                             headers={"x-session-id": session},
                             timeout=aiohttp.ClientTimeout(total=CALL_BOUND_S)) as r:
            body = await r.read()
            if r.status != 200:
                ANSWERS[session] = body[:200]
            return r.status, r.headers.get("x-sidecar-endpoint")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return -1, type(exc).__name__  # counted as unanswered


async def stats(http: aiohttp.ClientSession, target: Target) -> dict[str, Any]:
    async with http.get(target.admin + "/stats",
                        timeout=aiohttp.ClientTimeout(total=CALL_BOUND_S)) as r:
        data: dict[str, Any] = await r.json()
        return data


def drain(process: SidecarProcess) -> threading.Thread:
    """Read the process's output as it comes (a full pipe would block its logging)."""
    assert process.process is not None and process.process.stdout is not None
    stdout = process.process.stdout

    def read() -> None:
        while chunk := stdout.read1(65536):
            process.log += chunk

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


async def move(http: aiohttp.ClientSession, cell: Cell, via: Target, session: str,
               pods: list[Pod], current: str) -> str | None:
    """Fail the session's pod once, so the sidecar fails the call over and moves the route."""
    [pod] = [p for p in pods if p.url == current]
    pod.fake.behaviour.update({"fail_next": 1})
    status, endpoint = await ask(http, via, session)
    cell.statuses[status] += 1
    pod.fake.behaviour.update({"fail_next": 0})
    if not cell.check(status == 200 and endpoint not in (None, current),
                      "a failed-over call not answered",
                      f"{session} answered {status} from {endpoint} "
                      f"{ANSWERS.get(session, b'')!r}"):
        return None
    return endpoint


class StoreWatch:
    """When the store of either sidecar was last seen down, and when both were first seen up
    after that (every 50 ms; a look at the other process is one /stats call)."""

    def __init__(self) -> None:
        self.last_down: float | None = None
        self.up_again: float | None = None

    async def run(self, here: Callable[[], bool], http: aiohttp.ClientSession,
                  there: Target) -> None:
        while True:
            try:
                up = here() and bool((await stats(http, there))["store"]["available"])
            except (aiohttp.ClientError, TimeoutError):
                up = False
            now = time.monotonic()
            if not up:
                self.last_down, self.up_again = now, None
            elif self.last_down is not None and self.up_again is None:
                self.up_again = now
            await asyncio.sleep(0.05)


async def run_cell(fault: Fault, d: Deployment, cell: Cell, pods: list[Pod],
                   a_running: Running, b: SidecarProcess, background: set[asyncio.Task[Any]],
                   http: aiohttp.ClientSession) -> str:
    a = Target(f"http://127.0.0.1:{a_running.port}", f"http://127.0.0.1:{a_running.admin_port}")
    bt = Target(b.base, b.admin)
    store = a_running.sidecar.store

    async def batch(pairs: list[tuple[Target, str]]) -> list[tuple[int, str | None]]:
        results = await asyncio.gather(*(ask(http, t, s) for t, s in pairs))
        cell.statuses.update(status for status, _ in results)
        return list(results)

    async def get(key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(d.get, key)
        except Exception:  # not there yet: the caller waits and asks again
            return None

    async def stored_endpoint(session: str) -> str | None:
        raw = await get(route_key(session))
        return None if raw is None else orjson.loads(raw).get("endpoint")

    # Before: every session made on one sidecar and read by the other, all in Redis.
    routes: dict[str, str] = {}
    for (_, ea), (_, eb), session in zip(await batch([(a, s) for s in cell.sessions]),
                                          await batch([(bt, s) for s in cell.sessions]),
                                          cell.sessions, strict=True):
        assert ea is not None and ea == eb, f"the sidecars disagree on {session}: {ea} {eb}"
        routes[session] = ea
    for session in cell.sessions:
        assert await stored_endpoint(session) == routes[session], f"{session} not in Redis"
    assert set(cell.statuses) == {200}, f"before the fault: {dict(cell.statuses)}"
    # Pub/sub works before the fault (else "not back" below would say the wrong thing).
    last = cell.sessions[-1]
    known = await remote_changes(http, bt, a, a_running)
    to = await move(http, cell, a, last, pods, routes[last])
    if to is not None:
        routes[last] = to
        cell.check(await within(lambda: _more(remote_changes(http, bt, a, a_running), known),
                                2.0, POLL_S) is not None,
                   "pub/sub broken before the fault",
                   "a route change did not reach the other sidecar even before the fault")
    await asyncio.to_thread(d.settle)

    # During: calls on old and new sessions from both sidecars; one route moves. A watcher
    # notes when each sidecar's store is seen down and when both are seen up again.
    watch = StoreWatch()
    watching = asyncio.ensure_future(watch.run(lambda: store.available, http, bt))
    cell.in_place = True
    await asyncio.to_thread(fault.begin, d, cell)
    started = time.monotonic()
    moved = cell.sessions[0]
    moved_to = await move(http, cell, a, moved, pods, routes[moved])
    made_during: dict[str, str] = {}
    # Sessions routed apart because only one sidecar's first touch reached Redis → the pod
    # Redis holds, where both must send them once the store is back.
    split: dict[str, str] = {}

    async def through_redis(session: str) -> tuple[bool | None, bool | None]:
        """Whether each sidecar's first touch of a new session reached Redis (its route is
        synced), as far as either can tell right after the call."""
        route = a_running.sidecar.router.cache.peek(session)
        async with http.get(f"{bt.admin}/sessions/{session}",
                            timeout=aiohttp.ClientTimeout(total=CALL_BOUND_S)) as r:
            local = (await r.json()).get("local") if r.status == 200 else None
        return (None if route is None else route.synced,
                None if local is None else bool(local["synced"]))

    async def calls_until(done: Callable[[], bool], least_s: float) -> None:
        for i in range(MAX_BATCHES):
            if done() and time.monotonic() - started >= least_s:
                return
            fresh = next(cell.fresh)
            olds = cell.sessions[1 + i % 3::3]
            results = await batch([(a, fresh), (bt, fresh),
                                   *[(a if j % 2 else bt, s) for j, s in enumerate(olds)]])
            if results[0][0] == 200 and results[0][1] is not None:
                made_during[fresh] = results[0][1]
            (sa, ea), (sb, eb) = results[0], results[1]
            if ea != eb:
                # Without Redis every sidecar computes the same pod; a sidecar that reached
                # Redis while the other did not may have placed the session by the load it
                # saw (the promise is only "same pod through Redis" and "same pod without
                # it"), and the other then takes Redis's route once its store is back.
                synced = await through_redis(fresh)
                if sa == sb == 200 and synced in ((True, False), (False, True)):
                    split[fresh] = made_during[fresh] = str(ea if synced[0] else eb)
                else:
                    cell.check(False, "sidecars disagreed during the fault",
                               f"the sidecars routed {fresh} apart during the fault: {ea} / "
                               f"{eb}, first touch through Redis: {synced[0]} / {synced[1]}")
            await asyncio.sleep(0.1)

    def timed(step: Callable[[Deployment, Cell], None]) -> float:
        step(d, cell)
        return time.monotonic()

    progressing = asyncio.ensure_future(asyncio.to_thread(timed, fault.progress))
    await calls_until(progressing.done, fault.hold_s)
    ended = await progressing
    healing = asyncio.ensure_future(asyncio.to_thread(timed, fault.heal))
    await calls_until(healing.done, 0)
    healed = await healing
    cell.in_place = False
    if not fault.over_after_progress:
        ended = healed

    # Back: the store of both sidecars usable again, without a restart.
    async def both_available() -> bool:
        return store.available and (await stats(http, bt))["store"]["available"]

    back = await within(both_available, RECOVERY_BOUND_S, POLL_S)
    cell.check(back is not None, f"store not back in {RECOVERY_BOUND_S:g} s",
               f"the store was not back within {RECOVERY_BOUND_S:g} s of the fault's end "
               f"(in process: {store.available}, "
               f"other: {(await stats(http, bt))['store']['available']})")
    await asyncio.sleep(0.1)  # the watcher's next look
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching
    if watch.last_down is None:
        recovery = "store never down"
    elif watch.up_again is None:
        recovery = "store not back"
    else:
        recovery = f"store back {max(0.0, watch.up_again - ended):.1f} s after the fault"

    # No route lost: the old sessions on their pods on both sidecars, the moved one where it
    # moved, in Redis too; sessions made during the fault keep their pod and reach Redis.
    after = await batch([(t, s) for s in cell.sessions for t in (a, bt)])
    for i, session in enumerate(cell.sessions):
        (_, ea), (_, eb) = after[2 * i], after[2 * i + 1]
        if session == last:
            continue  # moved before the fault: the pub/sub check above covers it
        if session == moved:
            cell.check(ea == moved_to, "moved route forgotten",
                       f"the moved session went to {ea}, not {moved_to}")
        else:
            cell.check(ea == eb == routes[session], "routes changed after recovery",
                       f"{session} went to {ea} / {eb} after recovery, not {routes[session]}")
    if moved_to is not None:
        cell.check(await within(lambda: _is(stored_endpoint(moved), moved_to),
                                WRITE_BACK_BOUND_S, POLL_S) is not None,
                   "route moved during the fault not in Redis",
                   f"Redis holds {await stored_endpoint(moved)}, the move went to {moved_to}")
    converged = await batch([(t, s) for s in split for t in (a, bt)])
    apart: list[str] = []
    for i, session in enumerate(split):
        if {e for _, e in converged[2 * i:2 * i + 2]} == {split[session]}:
            continue
        if fault.loses_unreplicated and await stored_endpoint(session) != split[session]:
            del made_during[session]  # Redis's route went with the dead master: counted below
            continue
        apart.append(session)
    cell.check(not apart, "sessions routed apart did not converge",
               f"{len(apart)}/{len(split)} sessions first routed apart (one first touch "
               f"through Redis) still not both on Redis's pod after recovery")
    again = await batch([(a, s) for s in made_during])
    cell.check([e for _, e in again] == list(made_during.values()),
               "routes made during the fault changed",
               "a session made during the fault changed pod after recovery")
    missing = [s for s in made_during if await stored_endpoint(s) != made_during[s]]
    missing += [s for s in split if s not in made_during]
    lost = f", {len(missing)} new routes lost with the dead master" if missing else ""
    cell.check(not missing or fault.loses_unreplicated,
               "routes made during the fault not in Redis",
               f"{len(missing)}/{len(made_during)} missing after their next call")

    # Pub/sub back: a route moved by one sidecar reaches the other, both ways.
    spare = iter(cell.sessions[1:-1])
    heard: list[str] = []
    for mover, hearer, name in ((a, bt, "to the other process"), (bt, a, "to this process")):
        deadline = time.monotonic() + PUBSUB_BOUND_S
        while time.monotonic() < deadline:
            session = next(spare, None)
            if session is None:
                break
            before = await remote_changes(http, hearer, a, a_running)
            to = await move(http, cell, mover, session, pods, routes[session])
            if to is None:
                continue
            routes[session] = to

            async def arrived(before: int = before, hearer: Target = hearer) -> bool:
                return await remote_changes(http, hearer, a, a_running) > before

            if await within(arrived, 1.5, POLL_S) is not None:
                status, endpoint = await ask(http, hearer, session)
                cell.statuses[status] += 1
                cell.check(endpoint == to, "a heard route change not followed",
                           f"{name}: the session went to {endpoint}, not {to}")
                heard.append(name)
                break
        if name not in heard:
            cell.check(False, "pub/sub not back",
                       f"no route change {name} within {PUBSUB_BOUND_S:g} s after recovery; "
                       f"the hearer's store and background tasks: "
                       f"{await state_of(http, hearer, a, a_running)}")

    # Nothing leaked: every background task of this process alive, the other process alive
    # and quiet, the deployment whole again for the next cell.
    dead = [f"{t.get_coro().__qualname__}: {_ended(t)}"  # type: ignore[union-attr]
            for t in background if t.done()]
    cell.check(not dead, f"tasks died ({', '.join(sorted(dead))})")
    assert b.process is not None
    cell.check(b.process.poll() is None, "the sidecar process died")
    try:
        await asyncio.to_thread(d.wait_whole)
    except AssertionError as exc:
        cell.check(False, "deployment not whole again", str(exc))
    ok = cell.statuses[200]
    total = sum(cell.statuses.values())
    others = {k: v for k, v in cell.statuses.items() if k != 200}
    cell.check(ok == total, f"{total - ok}/{total} not 200 ({others})",
               f"first: {next(iter(ANSWERS.values()), b'')!r}")
    apart_first = f", {len(split)} new sessions first routed apart, then one" if split else ""
    return f"200s: {ok}/{total}, routes kept{lost}{apart_first}, {recovery}"


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _more(value: Any, than: int) -> bool:
    return bool(await value > than)


def _ended(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "returned" if exc is None else type(exc).__name__


async def state_of(http: aiohttp.ClientSession, target: Target, a: Target,
                   a_running: Running) -> str:
    """What a failed check needs to be told apart: the target's store and background tasks
    as its /stats shows them."""
    try:
        view = a_running.sidecar.stats() if target is a else await stats(http, target)
    except Exception as exc:  # the report of a failure must not hide it
        return f"/stats unreadable ({type(exc).__name__})"
    return json.dumps({k: view.get(k) for k in ("store", "background_tasks")})


async def remote_changes(http: aiohttp.ClientSession, target: Target, a: Target,
                         a_running: Running) -> int:
    if target is a:
        return a_running.sidecar.router.counters.remote_changes
    return int((await stats(http, target))["routes"]["remote_changes"])


def record(fault: str, topology: str, outcome: str) -> None:
    out = os.environ.get("LLMSC_FAULT_MATRIX_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"fault": FAULTS[fault][0].name, "topology": topology,
                                "outcome": outcome,
                                "redis": redis_version(redis_binary())}) + "\n")


@pytest.mark.parametrize(("fault_name", "topology"), CELLS,
                         ids=[f"{t}-{f}" for f, t in CELLS])
async def test_a_redis_fault_loses_no_call_no_route_and_no_task(
        fault_name: str, topology: str, request: pytest.FixtureRequest, pods: Any,
        sidecar: Any, sidecar_process: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One cell of the matrix (docstring of the module: what each cell asserts)."""
    outcome = "FAIL: did not finish"
    ANSWERS.clear()
    cell: Cell | None = None
    d: Deployment | None = None
    fault: Fault | None = None
    try:
        d = request.getfixturevalue(topology)
        await asyncio.to_thread(d.wait_whole)
        fault = FAULTS[fault_name][0]()
        prefix = f"{fault_name}-{os.urandom(3).hex()}"
        names = session_names(prefix, same_slot=fault_name == "slot-migration")
        cell = Cell([next(names) for _ in range(SESSIONS)], names)
        # The cell moves routes by failing a pod once; the retry budget is not under test.
        env = {**d.env(), "SIDECAR_REDIS_TIMEOUT_MS": str(BUDGET_MS),
               "SIDECAR_RETRY_BUDGET_MIN": "1000"}
        if fault_name == "acl-revoked":
            cell.passwords = {"llm-sidecar": "matrix-" + os.urandom(6).hex()}
            users = await asyncio.to_thread(grant_users, d, cell.passwords)
            env.update(d.env(SIDECAR_USER, users[SIDECAR_USER][0]))
        fleet = await pods(3)
        pools = {"small": pool(fleet)}
        running = await sidecar(pools, **env)
        background = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        other = sidecar_process(sidecar_env(pools, **env))
        await other.start()
        reader = drain(other)
        async with aiohttp.ClientSession() as http:
            summary = await run_cell(fault, d, cell, fleet, running, other, background, http)
        # Stopped as an orchestrator would: SIGTERM, a clean exit, nothing on stderr.
        assert other.process is not None
        other.process.terminate()
        code = await other.wait()
        reader.join(timeout=10)
        log = other.output()
        cell.check(code == 0, f"exit {code} on SIGTERM")
        for bad in ("Traceback", "Task exception was never retrieved"):
            cell.check(bad not in log, f"{bad!r} in the process's log", "it logged: "
                       + log[log.find(bad):][:300].replace("\n", " | "))
        unretrieved = [r.getMessage() for r in caplog.records
                       if "never retrieved" in r.getMessage() or (
                           r.exc_info and r.name.startswith(("sidecar", "asyncio")))]
        cell.check(not unretrieved, "unretrieved task exceptions",
                   f"this process logged {unretrieved[:1]}")
        outcome = summary if not cell.failed else "FAIL: " + "; ".join(cell.failed)
        assert not cell.problems, "\n".join(
            [*cell.problems, "the other process's last lines:", *log.splitlines()[-20:]])
    except AssertionError as exc:
        if not outcome.startswith("FAIL: ") or outcome == "FAIL: did not finish":
            outcome = "FAIL: " + str(exc).splitlines()[0]
        raise
    except Exception as exc:
        outcome = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise
    finally:
        record(fault_name, topology, outcome)
        if cell is not None and cell.in_place and fault is not None and d is not None:
            # The next cells share the deployment: never leave it stopped, paused or revoked.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(fault.heal, d, cell)
