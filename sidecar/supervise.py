"""Background tasks that cannot die: `supervised` runs a task's body again after any exception
a dependency raises, with a bounded backoff, saying so once per streak of failures.

The request path never waits on these tasks; they keep shared state fresh (routes, load
levels, traffic flushes), so a dead one is a silent, lasting degradation. Cancellation is the
only way out.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

log = logging.getLogger("sidecar.supervise")

INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0


class Supervisor:
    """Restart counts per task name, for `/stats` and the tests."""

    def __init__(self) -> None:
        self.restarts: dict[str, int] = {}

    def view(self) -> dict[str, int]:
        return dict(self.restarts)


SUPERVISOR = Supervisor()


async def supervised(name: str, body: Callable[[], Awaitable[None]],
                     initial_backoff_s: float = INITIAL_BACKOFF_S,
                     max_backoff_s: float = MAX_BACKOFF_S,
                     supervisor: Supervisor = SUPERVISOR) -> None:
    """Run `body()` until it returns; after an exception, log once per streak and run it again
    after a jittered backoff that doubles up to `max_backoff_s`. A body that returns ends the
    task; one that ran for longer than the current backoff resets it."""
    backoff = initial_backoff_s
    failing = False
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any dependency's exception: this task must outlive it
            supervisor.restarts[name] = supervisor.restarts.get(name, 0) + 1
            if not failing:
                log.warning("%s failed (%s: %s); restarting it with a backoff up to %.1f s",
                            name, type(exc).__name__, exc, max_backoff_s,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                failing = True
        if loop.time() - started > backoff * 4:
            backoff = initial_backoff_s
            failing = False
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, max_backoff_s)
