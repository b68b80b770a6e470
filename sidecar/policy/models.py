"""Which pool a request's `model` names, and the `/v1/models` listing: pure functions over
pool configurations, so the model rules are tested without sockets.

A request naming a pool's model or one of its aliases goes to that pool; any other name
(`auto`, or one no pool has) leaves the choice to the session's selector and routing table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from sidecar.config import ROUTING_ALIAS, PoolConfig

_MODEL_KEY = b'"model"'
_FIRST_KEY = b'{"model":"'


def model_index(pools: Mapping[str, PoolConfig]) -> dict[str, str]:
    """Model name or alias → pool name. Pools are taken in configuration order, so when two
    pools serve the same model the first one listed is the one a request naming it gets."""
    index: dict[str, str] = {}
    for name, pool in pools.items():
        for model in (pool.model, *pool.aliases):
            index.setdefault(model, name)
    return index


def requested_model(body: bytes) -> str | None:
    """The top-level `model` of a JSON request body, or None (no body, not JSON, no model,
    not a string). Bodies without the key are never parsed; one that opens with the key
    (and names it once) is read from its first bytes; anything else is parsed, because a
    `"model"` key may also sit inside messages, tools or metadata."""
    if not body or _MODEL_KEY not in body:
        return None
    if body.startswith(_FIRST_KEY) and body.count(_MODEL_KEY) == 1:
        end = body.find(b'"', len(_FIRST_KEY))
        value = body[len(_FIRST_KEY):end]
        if end > 0 and b"\\" not in value:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def named_pool(index: Mapping[str, str], model: str | None) -> str | None:
    """The pool a request's model names; None lets the selector and routing table choose."""
    if model is None or model == ROUTING_ALIAS:
        return None
    return index.get(model)


def needs_rewrite(requested: str | None, serving_model: str) -> bool:
    """Rewrite the body's `model` only when it has one and it differs from what serves."""
    return requested is not None and requested != serving_model


def listing(pools: Mapping[str, PoolConfig]) -> dict[str, Any]:
    """`GET /v1/models` in the OpenAI list shape: every model and alias, then `auto`."""
    data: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, pool in pools.items():
        for model in (pool.model, *pool.aliases):
            if model in seen:
                continue
            seen.add(model)
            entry: dict[str, Any] = {"id": model, "object": "model", "created": 0,
                                     "owned_by": "llm-sidecar", "pool": name}
            if model != pool.model:
                entry["alias_of"] = pool.model
            data.append(entry)
    data.append({"id": ROUTING_ALIAS, "object": "model", "created": 0,
                 "owned_by": "llm-sidecar", "pool": None})
    return {"object": "list", "data": data}
