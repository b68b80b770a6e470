"""Nomad's HTTP API as documented, on loopback: the scale endpoints (`GET`/`POST
/v1/job/:job_id/scale`) for the scaler's tests; service registrations (`GET
/v1/service/:service_name`) and allocation statistics (`GET
/v1/client/allocation/:alloc_id/stats`, with the NVIDIA device plugin's attributes) for the
fleet monitor's GPU readings. Every call needs the token."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

TOKEN = "nomad-secret-token"


def nvidia_device(utilization_percent: int | None, used_mib: int | None,
                  total_mib: int | None = 81559) -> dict[str, Any]:
    """One GPU's DeviceStats as the NVIDIA plugin reports it (stats.go statsForItem): None
    makes the value "N/A", as when NVML cannot read it."""
    def na(unit: str, desc: str) -> dict[str, Any]:
        return {"StringVal": "N/A", "Unit": unit, "Desc": desc}

    utilization = na("%", "Percent of time over the past sample period during which one "
                     "or more kernels were executing on the GPU.") \
        if utilization_percent is None else \
        {"IntNumeratorVal": utilization_percent, "Unit": "%",
         "Desc": "Percent of time over the past sample period during which one or more "
                 "kernels were executing on the GPU."}
    memory = na("MiB", "UsedMemory / TotalMemory") if used_mib is None or total_mib is None \
        else {"IntNumeratorVal": used_mib, "IntDenominatorVal": total_mib, "Unit": "MiB",
              "Desc": "UsedMemory / TotalMemory"}
    return {"Summary": memory,
            "Stats": {"Attributes": {
                "GPU utilization": utilization,
                "Memory utilization": {"IntNumeratorVal": 3, "Unit": "%",
                                       "Desc": "Percentage of bandwidth used during the "
                                               "past sample period"},
                "Memory state": memory,
                "Power usage": {"IntNumeratorVal": 71, "IntDenominatorVal": 700, "Unit": "W",
                                "Desc": "Power usage for this GPU in watts and its "
                                        "associated circuitry (e.g. memory) / Maximum GPU "
                                        "Power"},
                "Temperature": {"IntNumeratorVal": 34, "Unit": "C",
                                "Desc": "Temperature of the Unit"}},
                "Nested": None},
            "Timestamp": "2026-12-06T05:10:11.123456789Z"}


def alloc_stats(devices: dict[str, dict[str, Any]], name: str = "NVIDIA H100 80GB HBM3",
                task: str = "server") -> dict[str, Any]:
    """An AllocResourceUsage whose one task holds `devices` (device UUID → DeviceStats), as
    the client answers /v1/client/allocation/:alloc_id/stats."""
    groups = [{"Vendor": "nvidia", "Type": "gpu", "Name": name, "InstanceStats": devices}] \
        if devices else []
    usage = {"MemoryStats": {"RSS": 6_400_000_000, "Cache": 0, "Swap": 0, "MappedFile": 0,
                             "Usage": 6_500_000_000, "MaxUsage": 6_600_000_000,
                             "KernelUsage": 0, "KernelMaxUsage": 0,
                             "Measured": ["RSS", "Cache", "Swap", "Usage", "Max Usage"]},
             "CpuStats": {"SystemMode": 1.5, "UserMode": 40.2, "TotalTicks": 1200.0,
                          "ThrottledPeriods": 0, "ThrottledTime": 0, "Percent": 41.7,
                          "Measured": ["System Mode", "User Mode", "Percent"]},
             "DeviceStats": groups}
    return {"ResourceUsage": usage,
            "Tasks": {task: {"ResourceUsage": copy.deepcopy(usage),
                             "Timestamp": 1796533811123456789, "Pids": None}},
            "Timestamp": 1796533811123456789}


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
        self.addr = ""
        # Service name → its ServiceRegistrations; allocation id → its AllocResourceUsage.
        self.services: dict[str, list[dict[str, Any]]] = {}
        self.allocations: dict[str, dict[str, Any]] = {}
        self.service_reads = 0
        self.stats_reads: dict[str, int] = {}
        self.denied = 0
        self.deny_everything = False  # a token without read-job: 403 for every call
        self.delay_s = 0.0            # every service and stats answer this late
        self.page_size = 0            # registrations per page when no per_page is asked (paged)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/job/{job}/scale", self.status)
        app.router.add_post("/v1/job/{job}/scale", self.scale)
        app.router.add_get("/v1/service/{name}", self.service)
        app.router.add_get("/v1/client/allocation/{alloc}/stats", self.allocation_stats)
        return app

    def register(self, service: str, url: str, stats: dict[str, Any] | None = None,
                 job: str = "llm-small") -> str:
        """A running allocation of `job` serving `url` (its registration under `service`);
        returns its id. `stats` is what its stats read answers."""
        alloc = str(uuid.uuid4())
        parts = urlsplit(url)
        index = 100 + sum(len(v) for v in self.services.values())
        self.services.setdefault(service, []).append({
            "ID": f"_nomad-task-{alloc}-server-{service}-http", "ServiceName": service,
            "Namespace": "default", "NodeID": str(uuid.uuid5(uuid.NAMESPACE_DNS, "node-1")),
            "Datacenter": "dc1", "JobID": job, "AllocID": alloc, "Tags": ["llm"],
            "Address": parts.hostname, "Port": parts.port, "CreateIndex": index,
            "ModifyIndex": index})
        self.allocations[alloc] = stats if stats is not None else alloc_stats({})
        return alloc

    def _denied(self, request: web.Request) -> web.Response | None:
        self.queries.append(dict(request.query))
        if request.headers.get("X-Nomad-Token") != TOKEN or self.deny_everything:
            self.denied += 1
            return web.Response(status=403, text="Permission denied")
        return None

    async def service(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        self.service_reads += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        # An unknown service has no registrations: an empty list, not a 404.
        registrations = self.services.get(request.match_info["name"], [])
        size = int(request.query.get("per_page") or self.page_size or 0)
        if not size:
            return web.json_response(registrations)
        # Paged as Nomad pages: the next page starts at the ID named by X-Nomad-NextToken.
        ids = [r["ID"] for r in registrations]
        start = ids.index(request.query["next_token"]) if "next_token" in request.query else 0
        page = registrations[start:start + size]
        headers = {"X-Nomad-NextToken": ids[start + size]} if start + size < len(ids) else {}
        return web.json_response(page, headers=headers)

    async def allocation_stats(self, request: web.Request) -> web.Response:
        denied = self._denied(request)
        if denied:
            return denied
        alloc = request.match_info["alloc"]
        self.stats_reads[alloc] = self.stats_reads.get(alloc, 0) + 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if alloc not in self.allocations:
            return web.Response(status=404, text="Unknown allocation")
        return web.json_response(self.allocations[alloc])

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
