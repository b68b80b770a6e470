"""Which session a request belongs to, as agents send it: an ordered list of key sources
(a session header, the agent harnesses' own headers, the body's `prompt_cache_key`, the
TCP connection), the parent session a subagent names, and the end-of-session mark.

Pure: plain bytes in, plain values out. The listener only collects the header values this
module names (`watched`); nothing here runs for a request that sends none of them, except
one byte search of the body for `"prompt_cache_key"`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

MAX_SESSION_ID_LENGTH = 256

# The generic parent header: OpenCode's (below), and Dynamo's convention without its prefix.
PARENT_HEADER = b"x-parent-session-id"
# `x-session-final: true` on a request: the session ends once its answer completes.
FINAL_HEADER = b"x-session-final"
CACHE_KEY_FIELD = "prompt_cache_key"
_CACHE_KEY = b'"prompt_cache_key"'


@dataclass(frozen=True, slots=True)
class Harness:
    """An agent harness's identity headers. `agent` (when sent) names a child agent and is
    then the session, `session` the root conversation; the parent is `parent` when sent,
    else — for a child agent — the root conversation."""

    session: tuple[bytes, ...]
    agent: bytes | None = None
    parent: bytes | None = None


# What each harness sends on every model call, as mapped by Dynamo's "Session IDs" page
# (ai-dynamo/dynamo docs/agents/session-ids.md, commit 1cd9f3c2) and checked against the
# sources where they are public:
# - Claude Code: `x-claude-code-session-id` (the conversation), `x-claude-code-agent-id` on
#   a subagent's calls, `x-claude-code-parent-agent-id` on a nested subagent's. Its client
#   is not published (anthropics/claude-code holds the changelog and plugins); the names
#   are Dynamo's and those that proxies of its traffic read.
# - Codex: codex-rs/codex-api/src/requests/headers.rs sends `session_id` at openai/codex
#   commit 546585f8 (`build_conversation_headers`) and `session-id` in later versions of the
#   file (`build_session_headers`, Dynamo's spelling): both are read. Its
#   `x-codex-parent-thread-id` names a thread, not a session id, so Codex children are not
#   seeded from it.
# - OpenCode: `x-session-id` and, on a subtask's calls, `x-parent-session-id` (Dynamo's map;
#   anomalyco/opencode's packages/opencode/src/session/llm.ts at commit 00badcb8 sends
#   neither yet — only `x-opencode-session` to OpenCode's own providers — so it depends on
#   the version).
HARNESSES: dict[str, Harness] = {
    "claude-code": Harness((b"x-claude-code-session-id",), agent=b"x-claude-code-agent-id",
                           parent=b"x-claude-code-parent-agent-id"),
    "codex": Harness((b"session-id", b"session_id")),
    "opencode": Harness((b"x-session-id",), parent=PARENT_HEADER),
}

EXPECTED_FORM = ("a comma-separated list, in order, of `header:<name>`, `harness:<name>` "
                 f"({', '.join(f'harness:{n}' for n in HARNESSES)}), "
                 "`body:prompt_cache_key` and `connection` (last, if given)")


def valid_session_id(value: str) -> bool:
    """1–256 printable ASCII characters (so it is safe to echo in a header)."""
    return 0 < len(value) <= MAX_SESSION_ID_LENGTH and value.isascii() and value.isprintable()


class BadKey(Exception):
    """A configured session header whose value is not a usable session id."""

    def __init__(self, header: str) -> None:
        super().__init__(header)
        self.header = header


@dataclass(frozen=True, slots=True)
class Source:
    """One place a session key may come from. `label` is how the request log and the
    `x-sidecar-session-source` header name it."""

    kind: str  # header, harness, body, connection
    name: str
    label: str
    header: bytes = b""  # a header source's name, as the listener keeps it


class Key:
    """The session a request belongs to, where that came from, and its parent if named.
    (A plain slotted class: a frozen dataclass costs ~0.3 µs more per request.)"""

    __slots__ = ("model", "parent", "read_body", "session", "source")

    def __init__(self, session: str, source: str, parent: str | None = None) -> None:
        self.session = session
        self.source = source  # the Source's label
        self.parent = parent
        # A key read from a parsed body: that parse's top-level `model` (str or None), so
        # the body is not parsed twice (models.requested_model would parse it again).
        self.read_body = False
        self.model: str | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and (self.session, self.source, self.parent) == (
            other.session, other.source, other.parent)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Key({self.session!r}, {self.source!r}, {self.parent!r})"


def parse_sources(text: str) -> tuple[tuple[Source, ...], str | None]:
    """SIDECAR_SESSION_KEYS → sources, or the problem (what is wrong, for the message)."""
    sources: list[Source] = []
    seen: set[str] = set()
    items = [item.strip() for item in text.split(",")]
    for i, item in enumerate(items):
        kind, _, name = item.partition(":")
        kind, name = kind.strip().lower(), name.strip().lower()
        if item.lower() == "connection":
            if i != len(items) - 1:
                return (), "`connection` must come last (every request has one)"
            source = Source("connection", "", "connection")
        elif kind == "header" and name and not any(c in name for c in " :\r\n\t"):
            source = Source("header", name, f"header:{name}", name.encode())
        elif kind == "harness" and name in HARNESSES:
            source = Source("harness", name, f"harness:{name}")
        elif kind == "body" and name == CACHE_KEY_FIELD:
            source = Source("body", name, f"body:{name}")
        else:
            return (), f"{item!r} is not a key source"
        if source.label in seen:
            return (), f"{source.label} is listed twice"
        seen.add(source.label)
        sources.append(source)
    return tuple(sources), None


def default_sources(session_header: str) -> tuple[Source, ...]:
    """The configured header, then every harness, then the body's key, then the connection."""
    text = ",".join([f"header:{session_header}", *(f"harness:{n}" for n in HARNESSES),
                     f"body:{CACHE_KEY_FIELD}", "connection"])
    return parse_sources(text)[0]


def watched(sources: tuple[Source, ...]) -> frozenset[bytes]:
    """The header names (lowercase) whose values the listener keeps for `pick`."""
    names = {FINAL_HEADER, PARENT_HEADER}
    for source in sources:
        if source.kind == "header":
            names.add(source.header)
        elif source.kind == "harness":
            harness = HARNESSES[source.name]
            names.update(harness.session)
            names.update(n for n in (harness.agent, harness.parent) if n is not None)
    return frozenset(names)


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    return text if valid_session_id(text) else None


def body_key(body: bytes) -> tuple[str, str | None] | None:
    """The body's top-level `prompt_cache_key` when it is a usable session id, and its
    top-level `model` from the same parse. A body that does not contain the key's bytes
    is never parsed: one memchr for its `_` (a body without one is done), then one
    substring scan (~0.3 ns a byte)."""
    if b"_" not in body or _CACHE_KEY not in body:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    value, model = data.get(CACHE_KEY_FIELD), data.get("model")
    if not isinstance(value, str) or not valid_session_id(value):
        return None
    return value, model if isinstance(model, str) else None


def pick(sources: tuple[Source, ...], headers: Mapping[bytes, bytes] | None, body: bytes
         ) -> Key | None:
    """The first source present, in order; None: the connection is the session. A
    configured header with an unusable value raises BadKey (the app meant it); a harness's
    or the body's unusable value is passed over (the app never chose it)."""
    for source in sources:
        kind = source.kind
        if kind == "body":
            found = body_key(body)
            if found is not None:
                key = Key(found[0], source.label)
                key.read_body, key.model = True, found[1]
                return key
        elif kind == "connection":
            return None
        elif headers is None:
            continue
        elif kind == "header":
            raw = headers.get(source.header)
            if raw is not None:
                session = _text(raw)
                if session is None:
                    raise BadKey(source.name)
                return Key(session, source.label, _text(headers.get(PARENT_HEADER)))
        else:
            key = _harness_key(HARNESSES[source.name], headers, source.label)
            if key is not None:
                return key
    return None


def _harness_key(harness: Harness, headers: Mapping[bytes, bytes], label: str) -> Key | None:
    agent = _text(headers.get(harness.agent)) if harness.agent is not None else None
    root = None
    for name in harness.session:
        root = _text(headers.get(name))
        if root is not None:
            break
    if agent is None and root is None:
        return None
    parent = _text(headers.get(harness.parent)) if harness.parent is not None else None
    if agent is not None:  # a child agent: its parent agent, else the root conversation
        return Key(agent, label, parent if parent is not None else root)
    assert root is not None
    return Key(root, label, parent)


def is_final(headers: Mapping[bytes, bytes] | None) -> bool:
    if headers is None:
        return False
    value = headers.get(FINAL_HEADER)
    return value is not None and value.strip().lower() == b"true"
