"""The admin listener: liveness, readiness, counters, endpoint states and session views."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sidecar.sessions import valid_session_id
from sidecar.store import StoreUnavailable

if TYPE_CHECKING:
    from sidecar.server import Sidecar


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_INDENT_2), status=status,
                        content_type="application/json")


class Admin:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/endpoints", self.endpoints)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/sessions/{session:.+}", self.get_session)
        app.router.add_delete("/sessions/{session:.+}", self.delete_session)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def ready(self, request: web.Request) -> web.Response:
        reasons = self.sidecar.not_ready_reasons()
        if reasons:
            return _json({"status": "not ready", "reasons": reasons}, status=503)
        return _json({"status": "ready"})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(self.sidecar.stats())

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition format."""
        return web.Response(text=self.sidecar.telemetry.prometheus(),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def endpoints(self, request: web.Request) -> web.Response:
        return _json({name: {"model": pool.model, "fallback": pool.fallback,
                             "endpoints": [e.view() for e in pool.endpoints]}
                      for name, pool in self.sidecar.pools.pools.items()})

    async def get_session(self, request: web.Request) -> web.Response:
        session = request.match_info["session"]
        if not valid_session_id(session):
            return _json({"error": "invalid session id"}, status=400)
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
        had = await self.sidecar.router.forget(session)
        return _json({"session": session, "forgotten": True, "was_cached": had})
