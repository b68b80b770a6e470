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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger("sidecar.supervise")

INITIAL_BACKOFF_S = 0.25
MAX_BACKOFF_S = 5.0
# A task still running this long after it was cancelled is cancelled again.
RECANCEL_S = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and return once every one has ended. A task can swallow one
    cancellation (a dependency that turns it into an error the task catches and retries
    on, or asyncio's own wait_for racing it on Python 3.11): such a task is cancelled again
    every RECANCEL_S instead of being waited on forever. A cancellation of the caller
    itself propagates (it is not taken for the tasks')."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        for task in pending:
            task.cancel()


class Supervisor:
    """Restart counts per task name, and the tasks it runs, for `/stats` and the tests."""

    def __init__(self, backoff_scale: float = 1.0) -> None:
        self.backoff_scale = backoff_scale  # tests shrink every backoff with it
        self.restarts: dict[str, int] = {}
        self.last_error: dict[str, str] = {}  # name → the exception type of its last failure
        self._tasks: set[asyncio.Task[None]] = set()

    def view(self) -> dict[str, int]:
        return dict(self.restarts)

    def start(self, name: str, body: Callable[[], Awaitable[None]], *,
              initial_backoff_s: float = INITIAL_BACKOFF_S,
              max_backoff_s: float = MAX_BACKOFF_S,
              attempts: int | None = None) -> asyncio.Task[None]:
        """Run `body` supervised as a task of this supervisor (see `supervised`)."""
        task = asyncio.get_running_loop().create_task(
            supervised(name, body, initial_backoff_s, max_backoff_s, self, attempts),
            name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def running(self) -> list[str]:
        return sorted({task.get_name() for task in self._tasks if not task.done()})

    async def stop(self, task: asyncio.Task[None] | None) -> None:
        """Cancel one task and wait for it (a no-op for None or a finished task); its own
        exception, if it ended with one, is raised here."""
        if task is None:
            return
        await cancel_and_wait((task,))
        if not task.cancelled():
            task.result()


SUPERVISOR = Supervisor()


def _is_bug(exc: BaseException) -> bool:
    """A dependency away (a warning) or our own mistake (an error with its traceback)."""
    if isinstance(exc, (OSError, TimeoutError)):
        return False
    if type(exc).__module__.partition(".")[0] == "redis":
        # Imported here, not above: modules that import no redis (traffic, telemetry, the
        # data path's) use this one too, and redis is loaded whenever its exception is.
        from sidecar.redisfaults import Fault, classify
        return classify(exc) is Fault.BUG
    return True


async def supervised(name: str, body: Callable[[], Awaitable[None]],
                     initial_backoff_s: float = INITIAL_BACKOFF_S,
                     max_backoff_s: float = MAX_BACKOFF_S,
                     supervisor: Supervisor = SUPERVISOR,
                     attempts: int | None = None) -> None:
    """Run `body()` until it returns; after an exception, log once per streak and run it again
    after a jittered backoff that doubles up to `max_backoff_s`. A body that returns ends the
    task; one that ran for longer than four backoffs resets it. With `attempts`, a one-shot
    job (a write) gives up after that many failed runs instead of retrying for ever."""
    backoff = initial_backoff_s
    failing = False
    failures = 0
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await body()
            if failing:
                log.info("%s works again", name)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any dependency's exception: this task must outlive it
            if loop.time() - started > backoff * 4:
                backoff = initial_backoff_s  # it ran well for a while: a new streak
                failing = False
            supervisor.restarts[name] = supervisor.restarts.get(name, 0) + 1
            supervisor.last_error[name] = type(exc).__name__
            failures += 1
            if not failing:
                # A dependency away is a warning; our own mistake deserves its traceback.
                bug = _is_bug(exc)
                log.log(logging.ERROR if bug else logging.WARNING,
                        "%s failed (%s: %s); restarting it with a backoff up to %.1f s",
                        name, type(exc).__name__, exc, max_backoff_s,
                        exc_info=bug or log.isEnabledFor(logging.DEBUG))
                failing = True
            if attempts is not None and failures >= attempts:
                log.warning("%s gave up after %d attempts", name, failures)
                return
        await asyncio.sleep(backoff * supervisor.backoff_scale * (0.5 + random.random()))
        backoff = min(backoff * 2, max_backoff_s)


async def supervised_until(stop: asyncio.Event, name: str, body: Callable[[], Awaitable[None]],
                           supervisor: Supervisor = SUPERVISOR) -> None:
    """`supervised(name, body)` until it returns or `stop` is set (a service's main loop:
    the scaler, the fleet monitor); then the loop is cancelled and awaited."""
    task = asyncio.ensure_future(supervised(name, body, supervisor=supervisor))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        await supervisor.stop(task)
