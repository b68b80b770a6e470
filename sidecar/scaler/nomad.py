"""Nomad's HTTP API, the two calls the scaler needs: read a job's scale status and scale
one task group. Configured like Nomad's own CLI (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE,
NOMAD_REGION, NOMAD_CACERT / NOMAD_CLIENT_CERT / NOMAD_CLIENT_KEY / NOMAD_SKIP_VERIFY)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from sidecar.scaler.config import NomadAccess, ScalerSettings


class NomadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Nomad answered {status}: {message}")
        self.status = status
        self.message = message


class DeploymentActive(NomadError):
    """Nomad refuses to scale a job while a deployment of it runs: try again next tick."""


@dataclass(frozen=True, slots=True)
class GroupStatus:
    desired: int
    running: int
    healthy: int


def ssl_context(access: NomadAccess) -> ssl.SSLContext | None:
    if not access.nomad_addr.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=access.nomad_cacert)
    if access.nomad_client_cert:
        context.load_cert_chain(access.nomad_client_cert, access.nomad_client_key)
    if access.nomad_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def open_session(access: NomadAccess, timeout_s: float, limit: int = 100
                 ) -> aiohttp.ClientSession:
    """An HTTP session to Nomad as its CLI would talk to it: the token header, the TLS of
    NOMAD_CACERT and friends, a total timeout per call, at most `limit` connections."""
    return aiohttp.ClientSession(
        headers=access.headers(), timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(ssl=ssl_context(access) or True, limit=limit))


class NomadClient:
    def __init__(self, settings: ScalerSettings, timeout_s: float = 10.0) -> None:
        nomad = settings.nomad
        self.addr = nomad.nomad_addr
        self.timeout_s = timeout_s
        self.params = nomad.query()
        self.http = open_session(nomad, timeout_s)

    async def close(self) -> None:
        await self.http.close()

    async def _call(self, method: str, path: str, body: Any = None,
                    timeout_s: float | None = None) -> Any:
        timeout = (aiohttp.ClientTimeout(total=min(timeout_s, self.timeout_s))
                   if timeout_s is not None else None)
        try:
            async with self.http.request(method, self.addr + path, params=self.params,
                                         json=body, timeout=timeout) as response:
                text = await response.text()
                if response.status >= 400:
                    message = text.strip()[:300]
                    if response.status == 400 and "active deployment" in message:
                        raise DeploymentActive(response.status, message)
                    raise NomadError(response.status, message)
                return await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as exc:
            # A dropped connection or a body that is not JSON: Nomad's failure, not ours.
            raise NomadError(0, f"{type(exc).__name__}: {exc}") from exc

    async def scale_status(self, job: str, group: str) -> GroupStatus:
        """GET /v1/job/:job_id/scale: the group's Desired count and placed allocations."""
        data = await self._call("GET", f"/v1/job/{quote(job, safe='')}/scale")
        groups = data.get("TaskGroups") or {}
        if group not in groups:
            raise NomadError(404, f"job {job!r} has no task group {group!r} "
                             f"(groups: {sorted(groups)})")
        status = groups[group]
        return GroupStatus(int(status.get("Desired") or 0), int(status.get("Running") or 0),
                           int(status.get("Healthy") or 0))

    async def scale(self, job: str, group: str, count: int, message: str,
                    meta: dict[str, str], timeout_s: float | None = None) -> str:
        """POST /v1/job/:job_id/scale; returns the evaluation id. `timeout_s` bounds this
        call below the client's own timeout (the scaler ends it before its lock does)."""
        body = {"Count": count, "Target": {"Group": group}, "Message": message,
                "Meta": meta, "PolicyOverride": False}
        data = await self._call("POST", f"/v1/job/{quote(job, safe='')}/scale", body,
                                timeout_s)
        return str(data.get("EvalID", ""))
