"""A session's first touch is shared by the requests that arrive while it is in flight: one
of them going away must not take the others' answers with it. A real Redis made slow with
`DEBUG SLEEP`, a fake-llm pod and raw client sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sidecar.fleet.loads import take_reading
from sidecar.fleet.podload import PodLoad
from tests.conftest import pool
from tests.support.polling import until
from tests.support.raw_http import post
from tests.support.raw_peers import Client
from tests.support.redis_server import RedisServer, debug_args

SLEEP_S = 2.0


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A redis-server that accepts DEBUG from loopback (to stall it on purpose)."""
    server = RedisServer(args=debug_args()).start()
    try:
        yield server
    finally:
        server.cleanup()


def stall(server: RedisServer) -> threading.Thread:
    """Block the whole server for SLEEP_S, from a thread (the call blocks its caller)."""
    def sleep() -> None:
        client = server.client()
        client.connection_pool.connection_kwargs["socket_timeout"] = SLEEP_S + 5
        try:
            client.execute_command("DEBUG", "SLEEP", SLEEP_S)
        finally:
            client.close()

    thread = threading.Thread(target=sleep, daemon=True)
    thread.start()
    return thread


async def wait_blocked(server: RedisServer) -> None:
    """Until the server is inside its DEBUG SLEEP (a PING gets no answer)."""
    def ping_times_out() -> bool:
        client = redis.Redis(port=server.port, socket_timeout=0.1,
                             retry=Retry(NoBackoff(), 0))  # one try: no waiting it out
        try:
            client.ping()
            return False
        except (redis.TimeoutError, redis.ConnectionError):
            return True
        finally:
            client.close()

    await until(lambda: asyncio.to_thread(ping_times_out), "redis-server blocked in DEBUG SLEEP")


async def test_a_waiter_leaving_does_not_cancel_the_shared_first_touch(
        debug_redis, pods, sidecar):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=debug_redis.url,
                            SIDECAR_REDIS_TIMEOUT_MS="8000")
    router = running.sidecar.router
    request = post(body=b'{"model":"auto","messages":[]}',
                   headers=[b"x-session-id: shared-first-touch"])
    first = await Client.open(running.port)
    second = await Client.open(running.port)
    thread = stall(debug_redis)
    try:
        await wait_blocked(debug_redis)
        await first.send(request)
        await until(lambda: "shared-first-touch" in router._first_touch,
                    "the first touch to start")
        await second.send(request)
        await until(lambda: router.counters.coalesced == 1, "the second request to wait")
        first.close()  # the first app goes away while the store is still slow
        answer = await second.final(b"POST", timeout=SLEEP_S + 8)
        assert answer.status == 200, answer.raw[:300]
        assert answer.header("x-sidecar-session") == b"shared-first-touch"
    finally:
        second.close()
        thread.join(SLEEP_S + 10)
    assert pod.requests == 1, "the second request reached the pod, the first never did"


async def test_calls_waiting_on_a_first_touch_count_toward_the_next_sessions_pod(
        debug_redis, pods, sidecar):
    """An agent sends a turn's parallel calls at once: while its first touch is in flight,
    the calls waiting on it are calls headed for its pod, so a new session placed meanwhile
    sees three calls there, not one, and starts on the other pod (bounded load: 3 + 1 is
    over 1.25 × the pool's mean)."""
    idle = PodLoad(running=0, waiting=0, kv_usage=0.0, at=0.0, source="metrics")
    running = await sidecar({"small": pool(await pods(2))}, SIDECAR_REDIS_URL=debug_redis.url,
                            SIDECAR_REDIS_TIMEOUT_MS="8000")
    [pool_] = running.sidecar.pools.pools.values()
    for endpoint in pool_.endpoints:
        take_reading(endpoint, idle)
    router = running.sidecar.router
    agent_pod = pool_.ranked(b"agent")[0]
    # A session whose first choice is the agent's pod: it goes elsewhere only by counting.
    newcomer = next(f"next-{i}" for i in range(200)
                    if pool_.ranked(f"next-{i}".encode())[0] is agent_pod)
    clients = [await Client.open(running.port) for _ in range(4)]
    thread = stall(debug_redis)
    try:
        await wait_blocked(debug_redis)
        for client in clients[:3]:
            await client.send(post(body=b'{"model":"auto","messages":[]}',
                                   headers=[b"x-session-id: agent"]))
        await until(lambda: router.counters.coalesced == 2, "the agent's calls to wait")
        await clients[3].send(post(body=b'{"model":"auto","messages":[]}',
                                   headers=[f"x-session-id: {newcomer}".encode()]))
        answers = [await client.final(b"POST", timeout=SLEEP_S + 8) for client in clients]
    finally:
        for client in clients:
            client.close()
        thread.join(SLEEP_S + 10)
    assert [a.status for a in answers] == [200] * 4, [a.raw[:300] for a in answers]
    assert {a.header("x-sidecar-endpoint") for a in answers[:3]} == {agent_pod.url.encode()}
    assert answers[3].header("x-sidecar-endpoint") != agent_pod.url.encode()
