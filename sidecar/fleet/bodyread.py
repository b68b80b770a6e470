"""Reading a bounded answer body with aiohttp: `StreamReader.read(n)` returns what has
arrived, not n bytes, so one call can cut a page short (a vLLM metrics page of 100 KB
arrives in several reads)."""

from __future__ import annotations

import aiohttp


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first `limit + 1` bytes when it is longer (the caller refuses it)."""
    body = bytearray()
    while len(body) <= limit and (chunk := await content.read(limit + 1 - len(body))):
        body += chunk
    return bytes(body)
