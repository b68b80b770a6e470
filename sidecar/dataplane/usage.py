"""The token counts in an answer's OpenAI `usage` object, read from the bytes as they pass
(the relay's tally, the exchange's whole answers): no JSON parse of a body."""

from __future__ import annotations

import re

_USAGE_OPEN = re.compile(rb'"usage"\s*:\s*\{')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
USAGE_WINDOW = 400


def usage_in(data: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object in `data`, if there is one.
    Looks only after the last `"usage"`, so a response body is not parsed as JSON. The two
    counts are read in either order (vLLM writes prompt_tokens first, llama.cpp's server
    sorts its keys: completion_tokens first), inside the usage object only."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    opened = _USAGE_OPEN.match(data, at, at + USAGE_WINDOW)
    if opened is None:
        return None  # "usage": null, or cut off
    end = _object_end(data, opened.end() - 1, min(len(data), at + USAGE_WINDOW))
    prompt = _PROMPT_TOKENS.search(data, opened.end(), end)
    completion = _COMPLETION_TOKENS.search(data, opened.end(), end)
    return (int(prompt[1]), int(completion[1])) if prompt and completion else None


def _object_end(data: bytes, start: int, stop: int) -> int:
    """Where the JSON object opening at `start` closes (nested details objects skipped; no
    braces occur inside usage's strings), or `stop`."""
    depth = 0
    for i in range(start, stop):
        byte = data[i]
        if byte == 0x7B:
            depth += 1
        elif byte == 0x7D:
            depth -= 1
            if depth == 0:
                return i
    return stop
