"""Fixtures: real Redis servers, fake-llm pods on loopback, in-process and subprocess sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.config import load_settings
from sidecar.server import Running, start
from sidecar.tools.fakellm import Behaviour, FakeLLM, start_fake_llm
from tests.support.fake_nomad import FakeNomad
from tests.support.redis_server import Monitor, RedisServer, free_port, redis_binary, redis_version

REDIS_FIXTURES = {"redis_server", "monitor", "topology"}


def pytest_report_header() -> str:
    try:
        binary = redis_binary()
    except RuntimeError as exc:
        return f"redis-server: {exc}"
    return f"redis-server: {binary} (Redis {redis_version(binary)})"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `-m redis` selects every test that starts a redis-server, so CI can run them again
    # on another Redis version (LLMSC_REDIS_SERVER).
    for item in items:
        module = getattr(item, "module", None)
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                any(hasattr(module, name) for name in ("RedisServer", "TlsRedis")):
            item.add_marker(pytest.mark.redis)


@dataclass
class Pod:
    fake: FakeLLM
    port: int
    runner: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        return self.fake.counters.requests


PodFactory = Callable[..., Awaitable[list[Pod]]]


@pytest.fixture
async def pods() -> AsyncIterator[PodFactory]:
    started: list[Pod] = []

    async def make(count: int = 1, **behaviour: Any) -> list[Pod]:
        # Most tests check forwarding, not model names: their pods answer any model unless
        # a test passes `serves` (tests of the model rules use pods that refuse others).
        behaviour.setdefault("serves", "*")
        made = []
        for _ in range(count):
            runner, fake, port = await start_fake_llm(Behaviour(**behaviour))
            made.append(Pod(fake, port, runner))
        started.extend(made)
        return made

    yield make
    for pod in started:
        await pod.runner.cleanup()


def pool(pods: list[Pod], model: str = "small-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "endpoints": [p.url for p in pods], **extra}


def dead_url() -> str:
    """A loopback address where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


SidecarFactory = Callable[..., Awaitable[Running]]


def sidecar_env(pools: dict[str, Any], **env: str) -> dict[str, str]:
    return {"SIDECAR_LISTEN": "127.0.0.1:0", "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
            "SIDECAR_POOLS": json.dumps(pools), "SIDECAR_CONNECT_TIMEOUT_S": "0.5",
            "SIDECAR_DRAIN_TIMEOUT_S": "2", **env}


@pytest.fixture
async def sidecar() -> AsyncIterator[SidecarFactory]:
    running: list[Running] = []

    async def make(pools: dict[str, Any], **env: str) -> Running:
        environment = sidecar_env(pools, **env)
        instance = await start(load_settings(environment), env=environment)
        running.append(instance)
        return instance

    yield make
    for instance in running:
        await instance.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base(running: Running) -> str:
    return f"http://127.0.0.1:{running.port}"


def admin(running: Running) -> str:
    return f"http://127.0.0.1:{running.admin_port}"


# "auto": the session's selector and the load level's table choose the pool (a model name a
# pool serves would choose that pool instead; see tests/policy/test_models.py).
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}


async def chat(http: aiohttp.ClientSession, running: Running, session: str | None = "s1",
               body: dict[str, Any] | None = None, **headers: str
               ) -> tuple[int, dict[str, str], Any]:
    h = dict(headers)
    if session is not None:
        h["x-session-id"] = session
    async with http.post(base(running) + "/v1/chat/completions", json=body or CHAT,
                         headers=h) as response:
        raw = await response.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw
        return response.status, dict(response.headers), data


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def monitor(redis_server: RedisServer) -> Iterator[Monitor]:
    mon = Monitor(redis_server)
    yield mon
    mon.close()


class SidecarProcess:
    """`python -m sidecar serve` as its own process (for signals, restarts, two pods)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.env = {**os.environ, **env, "SIDECAR_LISTEN": f"127.0.0.1:{self.port}",
                    "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}"}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = b""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, ready: bool = True) -> SidecarProcess:
        self.process = subprocess.Popen([sys.executable, "-m", "sidecar", "serve"],
                                        env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"sidecar exited: {self.output()}")
                try:
                    async with http.get(self.admin + ("/ready" if ready else "/health")) as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"sidecar did not become ready: {self.output()}")

    def output(self) -> str:
        process = self.process
        if process is not None and process.poll() is not None and process.stdout \
                and not process.stdout.closed:
            self.log += process.stdout.read()
        return self.log.decode(errors="replace")

    async def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process.poll() is None:
            # What it logged last tells which part of its shutdown is still waiting.
            tail = self.log.decode(errors="replace")[-3000:]
            raise TimeoutError(f"sidecar did not exit within {timeout:g} s; its output so "
                               f"far ends with:\n{tail}")
        return self.process.returncode

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stdout:
            self.output()
            self.process.stdout.close()


@pytest.fixture
def sidecar_process() -> Iterator[Callable[[dict[str, str]], SidecarProcess]]:
    made: list[SidecarProcess] = []

    def make(env: dict[str, str]) -> SidecarProcess:
        process = SidecarProcess(env)
        made.append(process)
        return process

    yield make
    for process in made:  # every one, even if stopping another failed
        with contextlib.suppress(Exception):
            process.stop()
        if process.process is not None and process.process.poll() is None:
            process.process.kill()


@pytest.fixture
async def nomad() -> AsyncIterator[FakeNomad]:
    """A fake Nomad on loopback (`nomad.addr`), stopped after the test."""
    fake = FakeNomad()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.addr = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    yield fake
    await runner.cleanup()
