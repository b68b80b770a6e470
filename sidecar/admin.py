"""The admin listener: liveness, readiness, counters, endpoint states and session views.

It runs on a thread of its own with its own event loop, so a probe is answered in
milliseconds even while the proxy's loop works through a burst (thousands of streams
opening at once keep it busy for a few hundred milliseconds). Everything that reads proxy
state runs on the proxy's loop; only liveness is answered here, from a heartbeat the
proxy's loop keeps, so a stalled proxy loop fails liveness instead of looking alive.
Off loopback, every view but health, ready and metrics needs SIDECAR_ADMIN_TOKEN.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from aiohttp import web

from sidecar.config import Listen
from sidecar.routing.sessions import valid_session_id
from sidecar.routing.store import StoreUnavailable
from sidecar.sites import bound_port, start_site
from sidecar.supervise import Supervisor, cancel_and_wait

if TYPE_CHECKING:
    from sidecar.server import Sidecar

T = TypeVar("T")
BEAT_INTERVAL_S = 0.1
# Liveness fails once the proxy's loop has not ticked for this long: a wedged loop, not a
# busy one (a burst stalls it for well under a second).
STALL_LIMIT_S = 10.0
# How long a view waits for the proxy's loop before answering 503.
PROXY_LOOP_WAIT_S = 5.0
# What a probe or a scraper needs, and no more: these answer without the token anywhere.
OPEN_VIEWS = frozenset({"/health", "/ready", "/metrics"})


def authorized(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


class ProxyLoopStalled(Exception):
    pass


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


class Heartbeat:
    """Ticks on the proxy's loop; read from the admin thread (one float, no lock needed)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.worst_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self, supervisor: Supervisor | None = None) -> None:
        # Supervised: a dead beat would fail liveness and get a healthy pod restarted.
        self._task = (supervisor or Supervisor()).start("admin heartbeat", self._beat)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_INTERVAL_S)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        self.worst_lag_s = max(self.worst_lag_s, now - self.last - BEAT_INTERVAL_S)
        self.last = now

    def age_s(self) -> float:
        return time.monotonic() - self.last

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait((self._task,))


class Admin:
    """The views. Each runs on the admin thread and hands proxy-state reads to the proxy's
    loop; `heartbeat` tells whether that loop is turning."""

    def __init__(self, sidecar: Sidecar, proxy_loop: asyncio.AbstractEventLoop,
                 heartbeat: Heartbeat) -> None:
        self.sidecar = sidecar
        self.proxy_loop = proxy_loop
        self.heartbeat = heartbeat
        # Read once: neither the listener nor the token changes on a reload.
        self.needs_token = sidecar.settings.admin_needs_token
        self.token = sidecar.settings.admin_token

    async def _on_proxy_loop(self, make: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await make()
        future = asyncio.run_coroutine_threadsafe(run(), self.proxy_loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), PROXY_LOOP_WAIT_S)
        except TimeoutError as exc:
            raise ProxyLoopStalled from exc

    async def _read(self, read: Callable[[], T]) -> T:
        async def call() -> T:
            return read()
        return await self._on_proxy_loop(call)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authorized, self._stalled])
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/endpoints", self.endpoints)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sessions/{session:.+}", self.get_session)
        app.router.add_delete("/sessions/{session:.+}", self.delete_session)
        return app

    @web.middleware
    async def _authorized(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        if not self.needs_token or (request.method in ("GET", "HEAD")
                                    and request.path in OPEN_VIEWS):
            return await handler(request)
        if self.token is None:
            return _json({"error": "this admin listener is not loopback-only, so "
                                   f"{request.method} {request.path} needs a token: set "
                                   "SIDECAR_ADMIN_TOKEN on the sidecar and send "
                                   "`Authorization: Bearer <token>` (/health, /ready and "
                                   "/metrics answer without it)"}, status=403)
        if not authorized(request.headers.get("Authorization"), self.token):
            response = _json({"error": "missing or wrong admin token: send "
                                       "`Authorization: Bearer $SIDECAR_ADMIN_TOKEN`"},
                             status=401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="llm-sidecar admin"'
            return response
        return await handler(request)

    @web.middleware
    async def _stalled(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyLoopStalled:
            return _json({"error": f"the proxy's event loop did not answer within "
                                   f"{PROXY_LOOP_WAIT_S:g} s"}, status=503)

    async def health(self, request: web.Request) -> web.Response:
        age = self.heartbeat.age_s()
        if age > STALL_LIMIT_S:
            return _json({"status": "stalled", "proxy_loop_stalled_s": round(age, 1)},
                         status=503)
        return _json({"status": "alive",
                      "proxy_loop_lag_ms": round(max(0.0, age - BEAT_INTERVAL_S) * 1000, 1),
                      "proxy_loop_worst_lag_ms": round(self.heartbeat.worst_lag_s * 1000, 1)})

    async def ready(self, request: web.Request) -> web.Response:
        try:
            reasons = await self._read(self.sidecar.not_ready_reasons)
        except ProxyLoopStalled:
            reasons = [f"the proxy's event loop did not answer within {PROXY_LOOP_WAIT_S:g} s"]
        if reasons:
            return _json({"status": "not ready", "reasons": reasons}, status=503)
        return _json({"status": "ready"})

    async def stats(self, request: web.Request) -> web.Response:
        # Serialised on the proxy's loop: the views hold live objects of that loop.
        body = await self._read(lambda: orjson.dumps(self.sidecar.stats(),
                                                     option=orjson.OPT_INDENT_2))
        return web.Response(body=body, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition format."""
        return web.Response(text=await self._read(self.sidecar.telemetry.prometheus),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def endpoints(self, request: web.Request) -> web.Response:
        def view() -> bytes:
            # `sessions`: the routes this sidecar holds that point at the endpoint.
            sessions = self.sidecar.router.cache.sessions_per_endpoint()
            return orjson.dumps({name: {"model": pool.model, "fallback": pool.fallback,
                                        "endpoints": [{**e.view(),
                                                       "sessions": sessions.get(e.url, 0)}
                                                      for e in pool.endpoints]}
                                 for name, pool in self.sidecar.pools.pools.items()},
                                option=orjson.OPT_INDENT_2)
        return web.Response(body=await self._read(view), content_type="application/json")

    async def get_session(self, request: web.Request) -> web.Response:
        session = request.match_info["session"]
        if not valid_session_id(session):
            return _json({"error": "invalid session id"}, status=400)
        return await self._on_proxy_loop(lambda: self._session_view(session))

    async def _session_view(self, session: str) -> web.Response:
        route = self.sidecar.router.cache.peek(session)
        stored: Any = None
        store_error = None
        try:
            raw = await self.sidecar.store.get(session)
            if raw is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    stored = orjson.loads(raw)
        except StoreUnavailable as exc:
            store_error = str(exc)
        if route is None and stored is None:
            return _json({"session": session, "local": None, "store": None,
                          "store_error": store_error}, status=404)
        return _json({"session": session, "local": route.view() if route else None,
                      "store": stored, "store_error": store_error})

    async def delete_session(self, request: web.Request) -> web.Response:
        session = request.match_info["session"]
        if not valid_session_id(session):
            return _json({"error": "invalid session id"}, status=400)
        had, store_error = await self._on_proxy_loop(
            lambda: self.sidecar.router.forget(session))
        if store_error is not None:
            # Forgotten here only: the other pods keep the route until Redis is back.
            return _json({"session": session, "forgotten": False, "was_cached": had,
                          "store_error": store_error}, status=503)
        return _json({"session": session, "forgotten": True, "was_cached": had})


class AdminThread:
    """Runs the admin listener on its own thread and loop; start and stop from the proxy's
    loop."""

    def __init__(self, sidecar: Sidecar, listen: Listen) -> None:
        self.sidecar = sidecar
        self.listen = listen
        self.heartbeat = Heartbeat()
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Bind the listener (raises OSError as a same-loop bind would) and start the beat."""
        admin = Admin(self.sidecar, asyncio.get_running_loop(), self.heartbeat)
        started: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(admin, started),
                                        name="llm-sidecar-admin", daemon=True)
        self._thread.start()
        try:
            self.port = await asyncio.wrap_future(started)
        except BaseException:
            await asyncio.to_thread(self._thread.join, 10)
            raise
        self.heartbeat.start(self.sidecar.supervisor)

    def _run(self, admin: Admin, started: concurrent.futures.Future[int | None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            runner = web.AppRunner(admin.app(), handle_signals=False, access_log=None,
                                   shutdown_timeout=1.0)
            loop.run_until_complete(runner.setup())
            try:
                site = loop.run_until_complete(start_site(runner, self.listen))
            except BaseException:
                loop.run_until_complete(runner.cleanup())
                raise
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        self._runner = runner
        started.set_result(bound_port(site))
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def stop(self) -> None:
        await self.heartbeat.stop()
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None or loop.is_closed():
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(runner.cleanup(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 10)
