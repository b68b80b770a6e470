"""The small HTTP port a background service (the fleet monitor, the scaler) answers on: its
own GET routes and nothing else, no access log; the caller cleans up the returned runner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(routes: Mapping[str, Route], host: str, port: int) -> web.AppRunner:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
