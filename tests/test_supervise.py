"""No background task dies of an exception: one of each tree (redis-py's RedisError and
RedisClusterException, the socket's OSError, a timeout, pool exhaustion, and one that is not
about Redis at all) is injected into each task of a running sidecar; each restarts, says so
once, is counted in /stats, and does its job again."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from redis.exceptions import (
    MaxConnectionsError,
    RedisClusterException,
    RedisClusterUnreachableError,
    RedisError,
)

from sidecar import telemetry
from sidecar.fleet import traffic
from sidecar.routing import router as routing
from sidecar.routing import store
from sidecar.routing.store import route_key
from sidecar.server import Running
from sidecar.supervise import Supervisor, cancel_and_wait, supervised
from tests.conftest import admin, chat, pool
from tests.support.polling import until

INJECTED: list[BaseException] = [
    RedisError("injected"),
    RedisClusterUnreachableError("Redis Cluster cannot be connected (injected)"),
    RedisClusterException("No way to dispatch this command to Redis Cluster (injected)"),
    OSError(errno.ECONNRESET, "Connection reset by peer (injected)"),
    TimeoutError(),
    MaxConnectionsError("Too many connections (injected)"),
    ValueError("not about Redis (injected)"),
]


def injecting(original: Callable[..., Any], errors: list[BaseException]) -> Callable[..., Any]:
    """`original`, raising each of `errors` once first."""
    pending = list(errors)

    def call(*args: Any, **kwargs: Any) -> Any:
        if pending:
            raise pending.pop(0)
        return original(*args, **kwargs)
    return call


@pytest.fixture
async def running(pods, sidecar, redis_server, monkeypatch) -> Running:
    for module, name in ((traffic, "FLUSH_INTERVAL_S"), (telemetry, "FLUSH_INTERVAL_S"),
                         (routing, "REFRESH_FLUSH_INTERVAL_S"), (routing, "SWEEP_INTERVAL_S"),
                         (store, "RECONNECT_INTERVAL_S")):
        monkeypatch.setattr(module, name, 0.02)
    started = await sidecar({"small": pool(await pods(1))}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_REDIS_TIMEOUT_MS="1000")
    started.sidecar.supervisor.backoff_scale = 0.01
    return started


def said_once(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(r.name == "sidecar.supervise" and r.getMessage().startswith(f"{name} failed")
               for r in caplog.records)


async def restarted(running: Running, name: str, times: int) -> None:
    supervisor = running.sidecar.supervisor
    await until(lambda: supervisor.restarts.get(name, 0) >= times, f"{name} did not restart")
    assert supervisor.restarts[name] == times
    assert name in supervisor.running()


async def test_the_traffic_flush_restarts(running, caplog):
    s = running.sidecar
    s.store.write = injecting(s.store.write, INJECTED)  # type: ignore[method-assign]
    await restarted(running, "traffic flush", len(INJECTED))
    flushes = s.traffic.flushes
    await until(lambda: s.traffic.flushes > flushes, "no flush after the restarts")
    assert said_once(caplog, "traffic flush") == 1


async def test_the_ttl_refresh_restarts_and_keeps_what_it_owed(running, redis_server, http):
    s = running.sidecar
    assert (await chat(http, running, "ttl"))[0] == 200
    redis_server.client().expire(route_key("ttl"), 5)
    s.store.refresh = injecting(s.store.refresh, INJECTED)  # type: ignore[method-assign]
    s.router._pending_refresh.add("ttl")
    await restarted(running, "route TTL refresh", len(INJECTED))
    await until(lambda: redis_server.client().ttl(route_key("ttl")) > 5,
                "the refresh owed before the failures was lost")


async def test_the_cache_sweep_restarts(running):
    cache = running.sidecar.router.cache
    swept = 0

    def counted(now: float) -> int:
        nonlocal swept
        swept += 1
        return 0
    cache.expire_idle = injecting(counted, INJECTED)  # type: ignore[method-assign]
    await restarted(running, "route cache sweep", len(INJECTED))
    await until(lambda: swept > 0, "no sweep after the restarts")


async def test_the_telemetry_flush_restarts(running):
    t = running.sidecar.telemetry
    snapshots = 0

    def counted() -> list[Any]:
        nonlocal snapshots
        snapshots += 1
        return []
    t.snapshot = injecting(counted, INJECTED)  # type: ignore[method-assign]
    await restarted(running, "telemetry flush", len(INJECTED))
    await until(lambda: snapshots > 0, "no telemetry flush after the restarts")


async def test_the_admin_heartbeat_restarts(running, http):
    beat = running.admin.heartbeat
    beat.tick = injecting(beat.tick, INJECTED)  # type: ignore[method-assign]
    await restarted(running, "admin heartbeat", len(INJECTED))
    async with http.get(admin(running) + "/health") as response:
        assert response.status == 200
    async with http.get(admin(running) + "/stats") as response:
        tasks = (await response.json())["background_tasks"]
    assert tasks["restarts"]["admin heartbeat"] == len(INJECTED)
    assert "admin heartbeat" in tasks["running"]
    assert tasks["last_error"]["admin heartbeat"] == "ValueError"
    ticked = beat.last
    await until(lambda: beat.last > ticked, "the heartbeat does not tick")


async def test_each_route_write_behind_is_retried(running, redis_server):
    s = running.sidecar
    original = s.store.update
    record = redis_server.client().get(route_key("w")) or b"{}"
    for i, exc in enumerate(INJECTED):
        s.store.update = injecting(original, [exc])  # type: ignore[method-assign]
        s.router._write_behind(f"w{i}", record)
        await until(lambda i=i: redis_server.client().exists(route_key(f"w{i}")) == 1,
                    f"write {i} was lost")
        assert s.supervisor.restarts["route write-behind"] == i + 1


async def test_the_pubsub_listener_restarts(running, redis_server):
    s = running.sidecar
    assert s.store.subscriptions == 1
    s.store.client.pubsub = injecting(s.store.client.pubsub, INJECTED)
    redis_server.client().client_kill_filter(_type="pubsub")
    await restarted(running, "redis pub/sub listener", len(INJECTED) + 1)
    await until(lambda: s.store.subscriptions == 2, "the listener never subscribed again")
    redis_server.client().publish(store.LEVEL_CHANNEL, "high")
    await until(lambda: s.router.level == "high", "no level after the restarts")


async def test_the_reconnect_restarts_until_redis_answers(running):
    s = running.sidecar
    s.store.client.script_load = injecting(s.store.client.script_load, INJECTED)
    s.store._trip()
    await restarted(running, "redis reconnect", len(INJECTED))
    await until(lambda: s.store.available, "the store never came back")


async def test_a_task_that_keeps_failing_logs_once_and_backs_off_to_the_bound(caplog):
    supervisor = Supervisor(backoff_scale=0.001)
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        if runs < 20:
            raise aiohttp.ClientConnectionError("down")

    await asyncio.wait_for(supervised("flaky", body, supervisor=supervisor), 10)
    assert runs == 20 and supervisor.restarts == {"flaky": 19}
    assert said_once(caplog, "flaky") == 1
    assert supervisor.last_error == {"flaky": "ClientConnectionError"}


async def test_a_one_shot_job_gives_up_after_its_attempts():
    supervisor = Supervisor(backoff_scale=0.001)

    async def body() -> None:
        raise RedisError("always")

    await asyncio.wait_for(supervised("write", body, supervisor=supervisor, attempts=3), 10)
    assert supervisor.restarts == {"write": 3}


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


async def test_stopping_a_task_that_swallows_its_cancellation_still_ends_it():
    """A dependency can turn a cancellation into an error the task catches and retries on;
    stopping cancels again instead of waiting on it forever (the monitor's step-down did)."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed < 2:
                    swallowed += 1
                    continue
                raise

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await Supervisor().stop(task)
    assert task.cancelled() and swallowed == 2


async def test_a_caller_cancelled_while_stopping_a_task_is_cancelled_itself():
    """Waiting for a task to end never eats the caller's own cancellation."""
    release = False

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if release:
                    raise

    task = asyncio.ensure_future(stubborn())
    caller = asyncio.ensure_future(cancel_and_wait([task]))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not task.done()  # it swallowed every cancel so far: the caller gave up, as asked
    release = True
    async with asyncio.timeout(10):
        await cancel_and_wait([task])
    assert task.cancelled()


def swallowing_once(original: Callable[..., Any], entered: asyncio.Event
                    ) -> Callable[..., Any]:
    """`original`, but its first call hangs until cancelled and then raises TimeoutError in
    place of the cancellation, as redis-py can when its own timeout races the cancel
    (Python 3.11): the loop calling it catches the error and goes on."""
    swallowed = False

    async def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal swallowed
        if swallowed:
            return await original(*args, **kwargs)
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed = True
            raise TimeoutError("the command's own timeout won the race (injected)") from None
    return call


async def test_the_redis_loops_stop_though_a_command_swallows_their_cancellation(running):
    """The traffic flush and the route refresh stop at shutdown even when the command they
    were in turned their cancellation into an error they restart on."""
    s = running.sidecar
    writing, refreshing = asyncio.Event(), asyncio.Event()
    s.store.write = swallowing_once(s.store.write, writing)  # type: ignore[method-assign]
    s.store.refresh = swallowing_once(s.store.refresh, refreshing)  # type: ignore[method-assign]
    s.router._pending_refresh.add("stubborn")
    async with asyncio.timeout(10):
        await writing.wait()
        await refreshing.wait()
    # Each stop is its own task, awaited with a bound: a stop that waits on a loop which
    # never ends could also eat the cancellation a timeout around it would send.
    for what, stop in (("the traffic flush", lambda: s.traffic.stop(s.fleet.flush)),
                       ("the route loops", s.router.close)):
        task = asyncio.ensure_future(stop())
        await asyncio.wait({task}, timeout=10)
        assert task.done(), f"{what} never stopped"
    assert s.traffic._task is not None and s.traffic._task.done()
    assert all(task.done() for task in s.router._tasks)
