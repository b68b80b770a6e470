"""The route store on Redis Cluster (3 masters) and Sentinel (a primary, a replica and a
sentinel), started from real server binaries on loopback; and the connection pool bound
under a burst of new sessions."""

from __future__ import annotations

import asyncio
import time

import redis

from sidecar.routing.store import route_key
from tests.conftest import chat, pool

# The Cluster and Sentinel helpers live with the other server fixtures; other test modules
# import them from here too.
from tests.support.redis_server import (  # noqa: F401
    SLOTS,
    RedisServer,
    Sentinel,
    cluster,
    start_cluster,
)


async def test_routes_work_across_cluster_slots_and_pods_agree(
        pods, sidecar, http, cluster):  # noqa: F811 (the imported fixture)
    small = await pods(3)
    url = cluster[0].url
    env = {"SIDECAR_REDIS_URL": url, "SIDECAR_REDIS_MODE": "cluster",
           "SIDECAR_REDIS_TIMEOUT_MS": "1000"}
    a = await sidecar({"small": pool(small)}, **env)
    b = await sidecar({"small": pool(small)}, **env)
    sessions = [f"cluster-{i}" for i in range(30)]
    for session in sessions:
        status, _, _ = await chat(http, a, session)
        assert status == 200
    assert a.sidecar.store.counters.created == 30 and a.sidecar.store.counters.errors == 0
    # Route keys only (each store also keeps a short-lived reconnect-probe key).
    keys_per_node = [sum(1 for _ in n.client().scan_iter(match="llmsc:{*"))
                     for n in cluster]
    assert sum(keys_per_node) == 30 and sum(k > 0 for k in keys_per_node) >= 2, keys_per_node
    # Another pod reads the same routes (one round trip each, found not created).
    for session in sessions:
        _, ha, _ = await chat(http, a, session)
        _, hb, _ = await chat(http, b, session)
        assert ha["x-sidecar-endpoint"] == hb["x-sidecar-endpoint"]
    assert b.sidecar.store.counters.found == 30
    # The traffic flush's pipeline spans slots too.
    await a.sidecar.flush_traffic()
    assert a.sidecar.store.counters.errors == 0


def holds(node: RedisServer, key: str) -> bool:
    """Whether this node has the key, asked as a replica may be (READONLY first)."""
    client = redis.Redis(port=node.port, socket_timeout=2, single_connection_client=True)
    try:
        client.execute_command("READONLY")
        return bool(client.exists(key))
    finally:
        client.close()


def slot_owner(node: RedisServer, slot: int) -> int:
    for start, end, master, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(master[1])
    return -1


async def test_a_cluster_master_failover_loses_no_request(pods, sidecar, http):
    nodes = start_cluster(masters=3, replicas=3)
    masters, replicas = nodes[:3], nodes[3:]
    victim, heir = masters[1], replicas[1]  # replica i follows master i
    try:
        [pod] = await pods(1)
        running = await sidecar({"small": pool([pod])},
                                SIDECAR_REDIS_URL=masters[0].url, SIDECAR_REDIS_MODE="cluster",
                                SIDECAR_REDIS_TIMEOUT_MS="200")
        owner = victim.client()
        # Sessions whose keys live on the victim's slots, found by asking the victim.
        sessions = [f"fo-{i}" for i in range(400)
                    if owner.execute_command("CLUSTER", "KEYSLOT", route_key(f"fo-{i}"))
                    in range(SLOTS // 3, 2 * (SLOTS // 3))]
        assert len(sessions) > 50
        assert (await chat(http, running, sessions[0]))[0] == 200
        assert owner.exists(route_key(sessions[0])) == 1
        for _ in range(50):  # the replica has the route before its master dies
            if holds(heir, route_key(sessions[0])):
                break
            await asyncio.sleep(0.05)
        victim_slot = SLOTS // 3
        victim.stop()
        statuses, i = [], 1
        deadline = time.monotonic() + 30
        while (slot_owner(masters[0], victim_slot) != heir.port
               or not running.sidecar.store.available):
            assert time.monotonic() < deadline, "no cluster failover"
            statuses.append((await chat(http, running, sessions[i]))[0])
            i += 1
            await asyncio.sleep(0.05)
        assert statuses and set(statuses) == {200}, "no request lost while the cluster failed over"
        assert running.sidecar.store.incidents >= 1, "the outage was seen, not missed"
        # The promoted replica kept the route, and new routes on those slots go to it.
        assert holds(heir, route_key(sessions[0]))
        fresh = sessions[i:i + 20]
        for session in fresh:
            assert (await chat(http, running, session))[0] == 200
        assert all(holds(heir, route_key(s)) for s in fresh)
    finally:
        for node in nodes:
            node.cleanup()


async def test_a_sentinel_failover_loses_no_request(pods, sidecar, http):
    primary = RedisServer().start()
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(primary.port))).start()
    sentinel = Sentinel(primary.port)
    try:
        [pod] = await pods(1)
        running = await sidecar({"small": pool([pod])},
                                SIDECAR_REDIS_URL=f"redis://127.0.0.1:{sentinel.port}/0",
                                SIDECAR_REDIS_MODE="sentinel",
                                SIDECAR_REDIS_SENTINEL_MASTER="primary",
                                SIDECAR_REDIS_TIMEOUT_MS="200")
        assert (await chat(http, running, "before"))[0] == 200
        assert primary.client().exists(route_key("before")) == 1
        primary.stop()  # the primary dies; the sentinel promotes the replica
        statuses = []
        deadline = time.monotonic() + 20
        i = 0
        while sentinel.master() != replica.port or not running.sidecar.store.available:
            assert time.monotonic() < deadline, "no failover"
            statuses.append((await chat(http, running, f"during-{i}"))[0])
            i += 1
            await asyncio.sleep(0.05)
        assert statuses and set(statuses) == {200}, "no request lost while Redis failed over"
        for j in range(20):  # once the store is back, routes go to the new primary
            if replica.client().exists(route_key(f"after-{j - 1}")):
                break
            assert (await chat(http, running, f"after-{j}"))[0] == 200
            await asyncio.sleep(0.1)
        assert any(replica.client().exists(route_key(f"after-{j}")) for j in range(20))
    finally:
        sentinel.stop()
        replica.cleanup()
        primary.cleanup()


async def test_the_connection_pool_bound_holds_under_a_burst(pods, sidecar, http, redis_server):
    small = await pods(2)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url,
                            SIDECAR_REDIS_MAX_CONNECTIONS="8", SIDECAR_REDIS_TIMEOUT_MS="5000")
    watcher = redis_server.client()
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            clients = await asyncio.to_thread(watcher.client_list)
            peak = max(peak, sum(c["cmd"] not in ("client|list", "client") for c in clients))
            await asyncio.sleep(0.01)

    watching = asyncio.create_task(watch())
    results = await asyncio.gather(*(chat(http, running, f"burst-{i}") for i in range(500)))
    done.set()
    await watching
    assert {status for status, _, _ in results} == {200}
    assert running.sidecar.router.counters.resolved_without_store == 0
    # 8 pooled connections plus the pub/sub listener's
    # the burst used the pool (measured 8), and never more than it (101 without the bound)
    assert 4 <= peak <= 9, peak
