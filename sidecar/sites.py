"""Binding an aiohttp runner to a listener (TCP or Unix socket), and reading the port."""

from __future__ import annotations

import contextlib
import os

from aiohttp import web

from sidecar.config import Listen


async def start_site(runner: web.AppRunner, listen: Listen) -> web.BaseSite:
    site: web.BaseSite
    if listen.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.path)
        site = web.UnixSite(runner, listen.path)
    else:
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    await site.start()
    return site


def bound_port(site: web.BaseSite) -> int | None:
    server = getattr(site, "_server", None)
    if server is None or not server.sockets:
        return None
    name = server.sockets[0].getsockname()
    return name[1] if isinstance(name, tuple) else None
