"""The route store on Redis Cluster (3 masters) and Sentinel (a primary, a replica and a
sentinel), started from real server binaries on loopback; and the connection pool bound
under a burst of new sessions."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from sidecar.store import route_key
from tests.conftest import chat, pool
from tests.redis_server import RedisServer, free_port, redis_binary

SLOTS = 16384


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 55000)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        return port


def start_cluster(masters: int = 3, replicas: int = 0) -> list[RedisServer]:
    """`masters` masters sharing the 16384 slots, then `replicas` replicas given out to the
    masters in turn; returns masters first. The caller cleans up every node."""
    nodes = [RedisServer(port=cluster_port(),
                         args=("--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                               "--cluster-config-file", f"nodes-{i}.conf"))
             for i in range(masters + replicas)]
    try:
        for node in nodes:
            node.start()
        share = SLOTS // masters
        for i, node in enumerate(nodes[:masters]):
            last = SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1
            node.client().execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last + 1))
        for node in nodes[1:]:
            nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO")
                      for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.1)
        for i, replica in enumerate(nodes[masters:]):
            master_id = nodes[i % masters].client().execute_command("CLUSTER", "MYID")
            while True:  # the replica must know the master before it can follow it
                try:
                    replica.client().execute_command("CLUSTER", "REPLICATE", master_id)
                    break
                except redis.ResponseError:
                    assert time.monotonic() < deadline, "a replica could not follow"
                    time.sleep(0.1)
        for replica in nodes[masters:]:
            while replica.client().info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "a replica did not sync"
                time.sleep(0.1)
        return nodes
    except BaseException:
        for node in nodes:
            node.cleanup()
        raise


@pytest.fixture
def cluster():
    nodes = start_cluster()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


class Sentinel:
    def __init__(self, master_port: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="llmsc-sentinel-"))
        conf = self.dir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor primary 127.0.0.1 {master_port} 1\n"
                        "sentinel down-after-milliseconds primary 400\n"
                        "sentinel failover-timeout primary 2000\n")
        self.process = subprocess.Popen([redis_binary(), str(conf), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "sentinel did not start"
                time.sleep(0.05)

    def master(self) -> int:
        client = redis.Redis(port=self.port, socket_timeout=1)
        _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "primary")
        return int(port)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


async def test_routes_work_across_cluster_slots_and_pods_agree(pods, sidecar, http, cluster):
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
    keys_per_node = [n.client().dbsize() for n in cluster]
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
