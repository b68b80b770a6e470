"""The fleet monitor's GPU readings: while it leads, one background task reads each pool's
Nomad service registrations (every SERVICES_EVERY_S) and each matched allocation's statistics
(once per interval) and reports every endpoint's `GpuUsage` to the monitor.

Beside the probes, never in their way: a slow, refusing or absent Nomad only leaves the
readings to age (kept until STALE_INTERVALS old, then None), said once per streak.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from sidecar.config import redact_url
from sidecar.fleet.bodyread import read_capped
from sidecar.fleet.gpustats import NomadShapeError, allocations_by_endpoint, gpu_usage
from sidecar.fleet.podload import GpuUsage
from sidecar.fleet.podview import STALE_INTERVALS
from sidecar.scaler.config import NomadAccess
from sidecar.scaler.nomad import open_session

log = logging.getLogger("sidecar.gpu")

READ_TIMEOUT_S = 2.0     # as a health probe: one read never holds a round for longer
PARALLEL_READS = 8       # allocations read at once
SERVICES_EVERY_S = 30.0  # registrations change when pods come and go: read less often
MAX_BODY_BYTES = 1024 * 1024
MAX_PAGES = 100          # a paged registration list: bounded, in case a token never ends

# pool → (its Nomad service, its endpoint URLs)
Targets = Mapping[str, tuple[str, list[str]]]
Report = Callable[[str, str, GpuUsage | None], None]


class NomadReadError(Exception):
    """A read that gave no answer to use; `reason` names it without any secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GpuReader:
    """Reads for the monitor's current pools (`targets()`) and reports each endpoint's
    reading through `report(pool, url, usage)`; owns nothing the monitor publishes."""

    def __init__(self, access: NomadAccess, interval_s: Callable[[], float],
                 targets: Callable[[], Targets], report: Report) -> None:
        self.access = access
        self.interval_s = interval_s
        self.targets = targets
        self.report = report
        self.params = access.query()
        self.http: aiohttp.ClientSession | None = None
        self.allocations: dict[tuple[str, str], str] = {}   # (pool, url) → AllocID
        self.readings: dict[tuple[str, str], GpuUsage] = {}
        self.services_tried = float("-inf")                 # monotonic, last read of them
        self._refresh_soon = True   # endpoints changed, or an allocation is gone
        self._wanted: set[tuple[str, str]] = set()
        self.service_reads = 0
        self.stats_reads = 0
        self.failed_reads = 0
        self.rounds = 0
        self.last_error: str | None = None
        self._failing = False

    def _session(self) -> aiohttp.ClientSession:
        if self.http is None or self.http.closed:
            self.http = open_session(self.access, READ_TIMEOUT_S, PARALLEL_READS)
        return self.http

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def _get(self, path: str) -> Any:
        return (await self._get_page(path, self.params))[0]

    async def _get_all(self, path: str) -> list[Any]:
        """A list Nomad may page: each page's `X-Nomad-NextToken` is asked for as the next
        page's `next_token`, up to MAX_PAGES pages."""
        items: list[Any] = []
        params = self.params
        for _ in range(MAX_PAGES):
            page, token = await self._get_page(path, params)
            if not isinstance(page, list):
                return page  # judged by the caller, as an unpaged answer would be
            items.extend(page)
            if not token:
                return items
            params = {**self.params, "next_token": token}
        raise NomadReadError(f"GET {path}: more than {MAX_PAGES} pages")

    async def _get_page(self, path: str, params: dict[str, str]) -> tuple[Any, str | None]:
        try:
            async with self._session().get(self.access.nomad_addr + path,
                                           params=params) as response:
                body = await read_capped(response.content, MAX_BODY_BYTES)
                if response.status == 403:
                    raise NomadReadError(
                        "Nomad answered 403: NOMAD_TOKEN needs the read-job capability in "
                        "the pools' namespace" if self.access.nomad_token else
                        "Nomad answered 403: NOMAD_TOKEN is not set and Nomad enforces ACLs; "
                        "set it to a token with read-job in the pools' namespace")
                if response.status == 404:
                    self._refresh_soon = True  # an allocation gone: its endpoint moved
                if response.status >= 400:
                    raise NomadReadError(f"Nomad answered {response.status} to GET {path}")
                if len(body) > MAX_BODY_BYTES:
                    raise NomadReadError(f"GET {path}: answer over {MAX_BODY_BYTES} bytes")
                return json.loads(body), response.headers.get("X-Nomad-NextToken")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # Exceptions name the URL (no token: it travels in a header) and the cause.
            raise NomadReadError(f"{type(exc).__name__} from "
                                 f"{redact_url(self.access.nomad_addr)}{path}") from None

    async def read_services(self, targets: Targets) -> None:
        """Endpoint → allocation, from each pool's service registrations."""
        found: dict[tuple[str, str], str] = {}
        for pool, (service, urls) in targets.items():
            self.service_reads += 1
            registrations = await self._get_all(f"/v1/service/{quote(service, safe='')}")
            try:
                matched = allocations_by_endpoint(registrations, urls)
            except NomadShapeError as exc:
                raise NomadReadError(str(exc)) from None
            found.update({(pool, url): alloc for url, alloc in matched.items()})
        self.allocations = found

    async def read_stats(self, alloc: str) -> GpuUsage | None:
        self.stats_reads += 1
        stats = await self._get(f"/v1/client/allocation/{quote(alloc, safe='')}/stats")
        try:
            return gpu_usage(stats, time.time())
        except NomadShapeError as exc:
            raise NomadReadError(str(exc)) from None

    async def round(self) -> None:
        """One pass: the registrations when due, then each allocation's stats once."""
        self.rounds += 1
        targets = self.targets()
        wanted = {(pool, url) for pool, (_, urls) in targets.items() for url in urls}
        errors: list[str] = []
        answered = 0
        if wanted != self._wanted:
            self._wanted, self._refresh_soon = wanted, True
        since = time.monotonic() - self.services_tried
        if since >= max(SERVICES_EVERY_S, 6 * self.interval_s()) or (
                self._refresh_soon and since >= self.interval_s()):
            self.services_tried, self._refresh_soon = time.monotonic(), False
            try:
                await self.read_services(targets)
                answered += 1
            except NomadReadError as exc:
                errors.append(exc.reason)
                self._refresh_soon = True  # again next interval, not after SERVICES_EVERY_S
        by_alloc: dict[str, list[tuple[str, str]]] = {}
        for key, alloc in self.allocations.items():
            if key in wanted:
                by_alloc.setdefault(alloc, []).append(key)
        gate = asyncio.Semaphore(PARALLEL_READS)

        async def read(alloc: str) -> None:
            nonlocal answered
            async with gate:
                try:
                    usage = await self.read_stats(alloc)
                except NomadReadError as exc:
                    self.failed_reads += 1
                    errors.append(exc.reason)
                    return
            answered += 1
            for pool, url in by_alloc[alloc]:
                self._set(pool, url, usage)

        await asyncio.gather(*(read(alloc) for alloc in by_alloc))
        self._expire(wanted)
        self._judge(errors, answered)

    def _set(self, pool: str, url: str, usage: GpuUsage | None) -> None:
        if usage is None:
            self.readings.pop((pool, url), None)
        else:
            self.readings[(pool, url)] = usage
        self.report(pool, url, usage)

    def _expire(self, wanted: set[tuple[str, str]]) -> None:
        """A reading Nomad has not renewed for STALE_INTERVALS intervals is dropped, as a
        pod's load is (loads.LOAD_STALE_INTERVALS)."""
        bound = STALE_INTERVALS * self.interval_s()
        now = time.time()
        for key, usage in list(self.readings.items()):
            if key not in wanted or now - usage.at > bound:
                del self.readings[key]
                if key in wanted:
                    self.report(*key, None)
        self.allocations = {k: a for k, a in self.allocations.items() if k in wanted}

    def _judge(self, errors: list[str], answered: int) -> None:
        """A round with a failed read starts a streak (said once); one whose reads all
        answered ends it (a round with nothing to read says nothing)."""
        if errors:
            self.last_error = errors[0]
            if not self._failing:
                self._failing = True
                log.warning("GPU readings from Nomad failed (%s%s); the pod view keeps its "
                            "health and load, GPU readings age and are dropped after %d "
                            "intervals", errors[0],
                            f", and {len(errors) - 1} more" if len(errors) > 1 else "",
                            STALE_INTERVALS)
        elif self._failing and answered:
            self._failing = False
            log.info("GPU readings from Nomad work again")

    async def run(self) -> None:
        """Rounds, each at least one interval after the last one started (a slow Nomad
        makes rounds longer, never more frequent)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.round()
            await asyncio.sleep(max(0.0, started + self.interval_s() - loop.time()))

    def stats(self) -> dict[str, Any]:
        return {**self.access.redacted(), "rounds": self.rounds,
                "service_reads": self.service_reads, "stats_reads": self.stats_reads,
                "failed_reads": self.failed_reads, "allocations": len(self.allocations),
                "readings": len(self.readings), "failing": self._failing,
                "last_error": self.last_error}
