"""The Redis ACL users docs/operations.md documents, on a real server (Redis 6.2 and 7 in CI): a
sidecar and the scaler do their whole job as those users with nothing refused in `ACL LOG`,
and the users can do no more than that."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import redis

from sidecar.fleet.traffic import inflight_key, read_traffic
from sidecar.routing.store import CHANGES_CHANNEL, LEVEL_CHANNEL, connect_redis, route_key
from sidecar.scaler.nomad import NomadClient
from sidecar.scaler.service import Scaler
from sidecar.telemetry import Telemetry
from tests.conftest import admin, chat, pool
from tests.routing.test_redis_topologies import start_cluster
from tests.scaler.test_scaler import settings
from tests.support.polling import until
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def documented_acls() -> dict[str, list[str]]:
    """user → its `ACL SETUSER` arguments, as docs/operations.md shows them."""
    guide = (ROOT / "docs" / "operations.md").read_text()
    section = guide[guide.index("### Redis ACL users"):]
    end = section.find("\n#", 1)  # the next heading, if the section is not the file's last
    section = section if end < 0 else section[:end]
    users = {}
    for line in re.findall(r"^ACL SETUSER .+$", section, flags=re.M):
        words = line.split()[2:]
        users[words[0]] = words
    assert set(users) == {"llm-sidecar", "llm-monitor", "llm-scaler"}, sorted(users)
    return users


def create_users(server: RedisServer, *extra: str, passwords: dict[str, str] | None = None
                 ) -> dict[str, tuple[str, str]]:
    """Apply the documented ACLs (fresh passwords unless given); returns user → (password,
    URL). `extra` rules are appended (the guide's additions for Cluster)."""
    client = server.client()
    made = {}
    for name, words in documented_acls().items():
        password = (passwords or {}).get(name) or f"{name}-{os.urandom(6).hex()}"
        rules = [f">{password}" if w.startswith(">") else w for w in words]
        client.execute_command("ACL", "SETUSER", *rules, *extra)
        made[name] = (password, f"redis://{name}:{password}@127.0.0.1:{server.port}/0")
    client.execute_command("ACL", "LOG", "RESET")
    return made


def refusals(server: RedisServer) -> list[dict[str, object]]:
    return server.client().execute_command("ACL", "LOG")


async def test_the_documented_acl_users_do_the_whole_job_and_nothing_else(
        pods, sidecar, http, redis_server, nomad):
    users = create_users(redis_server)
    password, url = users["llm-sidecar"]
    [pod] = await pods(1)
    # Two pods of the app: route changes must reach the other over pub/sub.
    a = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=url, SIDECAR_LOAD_LEVEL="high")
    b = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=url, SIDECAR_LOAD_LEVEL="high")
    assert (await chat(http, a, "acl"))[0] == 200
    assert (await chat(http, b, "acl"))[0] == 200
    assert a.sidecar.store.counters.created == 1 and b.sidecar.store.counters.found == 1
    record = redis_server.client().get(route_key("acl"))
    await a.sidecar.store.update("acl", record)          # a failover moving the route
    await until(lambda: b.sidecar.store.changes_received == 1, "b never heard of the move")
    await a.sidecar.store.refresh(["acl"])
    await a.sidecar.flush_traffic()
    async with http.get(admin(a) + "/sessions/acl") as r:
        assert r.status == 200 and (await r.json())["store"] is not None
    async with http.delete(admin(a) + "/sessions/acl") as r:
        assert r.status == 200
    assert redis_server.client().exists(route_key("acl")) == 0

    scaler_password, scaler_url = users["llm-scaler"]
    redis_server.client().hset(inflight_key("small"), "gone-pod", "0:1.0")  # stale: pruned
    s = settings(scaler_url, nomad.addr)
    client = connect_redis(scaler_url, timeout_s=2.0)
    scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-acl")
    try:
        report = await scaler.tick()
    finally:
        await scaler.nomad.close()
        await client.aclose()
    assert report.leader and report.level == "low"
    assert redis_server.client().hexists(inflight_key("small"), "gone-pod") == 0
    await until(lambda: a.sidecar.router.level == b.sidecar.router.level == "low",
                "the published load level did not reach the sidecars")
    stats = json.dumps(a.sidecar.stats()) + json.dumps(a.sidecar.settings.redacted())
    assert password not in stats
    assert refusals(redis_server) == [], "a documented user was refused something it needs"
    assert a.sidecar.store.counters.errors == 0 and a.sidecar.store.available

    # Least privilege: neither user may do more than its job.
    as_sidecar = redis.Redis(port=redis_server.port, username="llm-sidecar", password=password)
    as_scaler = redis.Redis(port=redis_server.port, username="llm-scaler",
                            password=scaler_password)
    refused = [lambda: as_sidecar.keys("*"), lambda: as_sidecar.flushall(),
               lambda: as_sidecar.config_get("*"), lambda: as_sidecar.get("other-app:key"),
               lambda: as_sidecar.publish("other-channel", "x"),
               lambda: as_sidecar.execute_command("EVAL", "return 1", 0),
               lambda: as_scaler.get(route_key("someone")),
               lambda: as_scaler.publish(CHANGES_CHANNEL, "x"),
               lambda: as_scaler.execute_command("SUBSCRIBE", LEVEL_CHANNEL)]
    for call in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    as_sidecar.close()
    as_scaler.close()

    wrong = await sidecar({"small": pool([pod])},
                          SIDECAR_REDIS_URL=url.replace(password, "wrong"))
    assert (await chat(http, wrong, "acl-2"))[0] == 200, "a refused login still routes"
    assert not wrong.sidecar.store.available


async def test_the_documented_users_work_on_redis_cluster(pods, sidecar, http, nomad):
    nodes = start_cluster()
    try:
        # The guide's addition for Cluster, on every node (ACLs are per node).
        users = create_users(nodes[0], "+cluster|slots", "+command")
        for node in nodes[1:]:
            create_users(node, "+cluster|slots", "+command",
                         passwords={name: pw for name, (pw, _) in users.items()})
        [pod] = await pods(1)
        url = users["llm-sidecar"][1]
        running = await sidecar({"small": pool([pod])}, SIDECAR_REDIS_URL=url,
                                SIDECAR_REDIS_MODE="cluster", SIDECAR_REDIS_TIMEOUT_MS="1000")
        for i in range(12):  # sessions on every node's slots
            assert (await chat(http, running, f"acl-cluster-{i}"))[0] == 200
        await running.sidecar.flush_traffic()
        assert running.sidecar.store.counters.created == 12
        assert running.sidecar.store.counters.errors == 0
        scaler_url = users["llm-scaler"][1]
        s = settings(scaler_url, nomad.addr, SIDECAR_REDIS_MODE="cluster")
        client = connect_redis(scaler_url, "cluster", timeout_s=2.0)
        scaler = Scaler(s, client, NomadClient(s), Telemetry({}), "scaler-acl")
        try:
            # A whole tick: its lock, its state, its reads and the level it publishes.
            report = await scaler.tick()
            view = await read_traffic(client, ["small"], time.time(), 1)
        finally:
            await scaler.nomad.close()
            await client.aclose()
        assert report.leader and report.level == "low"
        assert view["small"].reporting_pods == 1
        for node in nodes:
            assert refusals(node) == [], node.port
    finally:
        for node in nodes:
            node.cleanup()
