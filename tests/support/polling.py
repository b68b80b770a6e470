"""Waiting for what a real process does in its own time. Each wait polls with a generous
bound that only catches a hang: a test never asserts how long something took (the machine
is shared and noisy); it asserts that it happened."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

Check = Callable[[], Any | Awaitable[Any]]

INTERVAL_S = 0.02
HANG_S = 20.0  # long enough for a loaded CI machine; only a hang waits this long


async def within(check: Check, bound: float, interval: float = INTERVAL_S) -> float | None:
    """Seconds until `check()` (awaited when it returns an awaitable) is true, or None once
    `bound` seconds pass without it."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started >= bound:
            return None
        await asyncio.sleep(interval)


async def until(check: Check, what: str = "the condition", timeout: float = HANG_S) -> float:
    """Wait for `check()`; fail naming `what` when it never holds. Returns the seconds it
    took (for a test that reports, never asserts, them)."""
    waited = await within(check, timeout)
    if waited is None:
        raise AssertionError(f"not within {timeout} s: {what}")
    return waited
