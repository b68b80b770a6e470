"""Nomad's scale endpoints as documented (`GET`/`POST /v1/job/:job_id/scale`), on loopback,
for the scaler's tests."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

TOKEN = "nomad-secret-token"


class FakeNomad:
    """Nomad's scale endpoints, as documented."""

    def __init__(self) -> None:
        self.desired = {("llm-small", "server"): 2}
        self.healthy = {("llm-small", "server"): 2}
        self.active_deployment = False
        # Seconds the next status reads are late, one entry per read (a slow Nomad, once).
        self.status_delays: list[float] = []
        self.calls: list[dict[str, Any]] = []
        self.queries: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/job/{job}/scale", self.status)
        app.router.add_post("/v1/job/{job}/scale", self.scale)
        return app

    def _denied(self, request: web.Request) -> web.Response | None:
        self.queries.append(dict(request.query))
        if request.headers.get("X-Nomad-Token") != TOKEN:
            return web.Response(status=403, text="Permission denied")
        return None

    async def status(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        job = request.match_info["job"]
        groups = {g: {"Desired": n, "Placed": n, "Running": n,
                      "Healthy": self.healthy[(j, g)], "Unhealthy": 0, "Events": None}
                  for (j, g), n in self.desired.items() if j == job}
        if not groups:
            return web.Response(status=404, text="job not found")
        if self.status_delays:  # the status as it was when asked, answered late
            await asyncio.sleep(self.status_delays.pop(0))
        return web.json_response({"JobID": job, "JobCreateIndex": 10, "JobModifyIndex": 20,
                                  "JobStopped": False, "TaskGroups": groups})

    async def scale(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        body = await request.json()
        job = request.match_info["job"]
        if self.active_deployment:
            return web.Response(status=400,
                                text="job scaling blocked due to active deployment")
        group = body["Target"]["Group"]
        self.calls.append({"job": job, **body})
        self.desired[(job, group)] = body["Count"]
        return web.json_response({"EvalID": f"eval-{len(self.calls)}", "EvalCreateIndex": 30,
                                  "JobModifyIndex": 31, "Warnings": "", "Index": 31,
                                  "LastContact": 0, "KnownLeader": False})
