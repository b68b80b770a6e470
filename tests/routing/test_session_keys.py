"""Session keys as agents send them: the order of the key sources, each harness's headers,
the body's `prompt_cache_key` read only when its bytes are there, and the settings that
choose them — pure functions first, then a real sidecar in front of fake-llm pods (and a
real Redis, counting its commands)."""

from __future__ import annotations

import logging

import orjson
import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.routing.sessionkeys import (
    BadKey,
    Key,
    body_key,
    default_sources,
    parse_sources,
    pick,
    watched,
)
from tests.conftest import CHAT, chat, pool, sidecar_env
from tests.support.redis_server import Monitor

DEFAULT = default_sources("x-session-id")


def keys(**headers: str) -> dict[bytes, bytes]:
    return {name.replace("_", "-").encode(): value.encode() for name, value in headers.items()}


def body(**fields: object) -> bytes:
    return orjson.dumps({**CHAT, **fields})


# -- which source wins ---------------------------------------------------------------------

def test_the_sources_are_tried_in_order_and_the_first_present_wins():
    every = {**keys(x_session_id="configured", x_claude_code_session_id="claude"),
             b"session-id": b"codex"}
    assert pick(DEFAULT, every, body(prompt_cache_key="cache")) == \
        Key("configured", "header:x-session-id")
    del every[b"x-session-id"]
    assert pick(DEFAULT, every, body(prompt_cache_key="cache")) == \
        Key("claude", "harness:claude-code")
    del every[b"x-claude-code-session-id"]
    assert pick(DEFAULT, every, body(prompt_cache_key="cache")) == Key("codex", "harness:codex")
    assert pick(DEFAULT, None, body(prompt_cache_key="cache")) == \
        Key("cache", "body:prompt_cache_key")
    assert pick(DEFAULT, None, body()) is None  # the connection


def test_a_configured_order_is_followed():
    sources, problem = parse_sources("body:prompt_cache_key,harness:codex,header:x-app-session")
    assert problem is None
    both = {b"session-id": b"codex", b"x-app-session": b"app"}
    assert pick(sources, both, body(prompt_cache_key="cache")).source == "body:prompt_cache_key"
    assert pick(sources, both, body()).source == "harness:codex"
    # Not listed, not read: OpenCode's header is ignored by this order.
    assert pick(sources, keys(x_session_id="oc"), body()) is None
    assert b"x-session-id" not in watched(sources)


def test_claude_code_child_agents_are_their_own_sessions_with_a_parent():
    root = keys(x_claude_code_session_id="conv")
    assert pick(DEFAULT, root, b"{}") == Key("conv", "harness:claude-code")
    child = {**root, **keys(x_claude_code_agent_id="agent-1")}
    assert pick(DEFAULT, child, b"{}") == Key("agent-1", "harness:claude-code", "conv")
    nested = {**child, **keys(x_claude_code_agent_id="agent-2",
                              x_claude_code_parent_agent_id="agent-1")}
    assert pick(DEFAULT, nested, b"{}") == Key("agent-2", "harness:claude-code", "agent-1")


def test_codex_old_and_new_header_spellings_and_opencode_parents():
    assert pick(DEFAULT, {b"session_id": b"old"}, b"{}") == Key("old", "harness:codex")
    assert pick(DEFAULT, {b"session-id": b"new", b"session_id": b"old"}, b"{}") == \
        Key("new", "harness:codex")
    sources, _ = parse_sources("harness:opencode")
    assert pick(sources, keys(x_session_id="ses_b", x_parent_session_id="ses_a"), b"{}") == \
        Key("ses_b", "harness:opencode", "ses_a")


def test_a_bad_configured_header_is_refused_but_a_bad_harness_or_body_key_is_passed_over():
    with pytest.raises(BadKey):
        pick(DEFAULT, keys(x_session_id="x" * 300), b"{}")
    assert pick(DEFAULT, keys(x_claude_code_session_id="x" * 300),
                body(prompt_cache_key="fine")) == Key("fine", "body:prompt_cache_key")
    assert pick(DEFAULT, None, body(prompt_cache_key=17)) is None
    assert pick(DEFAULT, None, body(prompt_cache_key="é")) is None


def test_the_body_key_is_read_only_at_the_top_level_and_only_when_its_bytes_are_there():
    assert body_key(body(prompt_cache_key="k")) == ("k", "auto")  # and the model, once
    assert body_key(orjson.dumps({"prompt_cache_key": "k", "model": 7})) == ("k", None)
    assert body_key(body(metadata={"prompt_cache_key": "nested"})) is None
    assert body_key(b'{"prompt_cache_key": "k", broken') is None
    assert body_key(b"not json at all") is None


@pytest.mark.parametrize("value, says", [
    ("header:", "is not a key source"),
    ("harness:aider", "is not a key source"),
    ("body:user", "is not a key source"),
    ("connection,header:x-a", "`connection` must come last"),
    ("header:x-a,header:X-A", "listed twice"),
    ("cookie:sid", "is not a key source"),
])
def test_a_bad_key_list_is_refused_naming_the_variable_and_the_form(value, says):
    with pytest.raises(ConfigError) as refused:
        load_settings(sidecar_env({"small": {"model": "m", "endpoints": ["http://a:1"]}},
                                  SIDECAR_SESSION_KEYS=value))
    [problem] = refused.value.problems
    assert problem.startswith(f"SIDECAR_SESSION_KEYS={value!r}: ") and says in problem
    assert "`header:<name>`" in problem and "harness:claude-code" in problem


def test_the_default_list_follows_the_session_header():
    settings = load_settings(sidecar_env({"small": {"model": "m", "endpoints": ["http://a:1"]}},
                                         SIDECAR_SESSION_HEADER="X-Conversation"))
    assert [s.label for s in settings.session_keys] == [
        "header:x-conversation", "harness:claude-code", "harness:codex", "harness:opencode",
        "body:prompt_cache_key", "connection"]
    assert settings.redacted()["SIDECAR_SESSION_KEYS"].startswith("header:x-conversation,")


# -- through a real sidecar ----------------------------------------------------------------

async def test_each_source_is_chosen_in_order_and_named_in_the_answer_and_the_log(
        pods, sidecar, http, caplog):
    running = await sidecar({"small": pool(await pods(2))})
    cases = [
        ({"x-session-id": "a", "x-claude-code-session-id": "b"}, {"prompt_cache_key": "c"},
         "a", "header:x-session-id"),
        ({"x-claude-code-session-id": "b", "session-id": "d"}, {"prompt_cache_key": "c"},
         "b", "harness:claude-code"),
        ({"session-id": "d"}, {"prompt_cache_key": "c"}, "d", "harness:codex"),
        ({}, {"prompt_cache_key": "c"}, "c", "body:prompt_cache_key"),
        ({}, {}, None, "connection"),
    ]
    for headers, fields, session, source in cases:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="sidecar.requests"):
            status, answer, _ = await chat(http, running, None, {**CHAT, **fields}, **headers)
        assert status == 200
        assert answer["x-sidecar-session-source"] == source
        if session is not None:
            assert answer["x-sidecar-session"] == session
        else:
            assert answer["x-sidecar-session"].startswith("conn:127.0.0.1:")
        [logged] = [r.fields for r in caplog.records if hasattr(r, "fields")]
        assert logged["session_source"] == source


@pytest.mark.parametrize("how", ["x-session-id", "prompt_cache_key", "x-claude-code-session-id"])
async def test_an_unmodified_app_gets_the_same_stickiness_from_its_own_key(
        pods, sidecar, http, redis_server, how):
    """One Redis round trip for the session, then none, and every call on one pod — whether
    the app sends the sidecar's header, only OpenAI's body field or only its harness's
    header."""
    small = await pods(3)
    running = await sidecar({"small": pool(small)}, SIDECAR_REDIS_URL=redis_server.url)
    monitor = Monitor(redis_server)
    try:
        monitor.reset()
        served = set()
        for turn in range(10):
            if how == "prompt_cache_key":
                status, headers, _ = await chat(http, running, None,
                                                {**CHAT, "prompt_cache_key": "conv-7",
                                                 "messages": [{"role": "user",
                                                               "content": f"turn {turn}"}]})
            else:
                status, headers, _ = await chat(http, running, None, CHAT, **{how: "conv-7"})
            assert status == 200 and headers["x-sidecar-session"] == "conv-7"
            served.add(headers["x-sidecar-endpoint"])
        commands = [c for c in monitor.commands() if not c.endswith('"PING"')]
    finally:
        monitor.close()
    assert len(served) == 1, served
    assert len(commands) == 1 and '"EVALSHA"' in commands[0] and '"llmsc:{conv-7}"' in \
        commands[0], commands
    assert sum(p.requests for p in small) == 10


async def test_the_session_final_header_is_not_forwarded(pods, sidecar, http):
    [pod] = await pods(1)
    running = await sidecar({"small": pool([pod])})
    status, _, _ = await chat(http, running, "ending", **{"x-session-final": "true",
                                                           "x-parent-session-id": "p"})
    assert status == 200
    sent = {name.lower() for name in pod.fake.last_headers}
    assert "x-session-final" not in sent
    assert "x-session-id" in sent and "x-parent-session-id" in sent  # the app's own: kept


def test_the_reference_lists_every_source_and_harness_header():
    from pathlib import Path

    from sidecar.routing.sessionkeys import HARNESSES
    docs = Path(__file__).resolve().parents[2] / "docs"
    readme = (docs / "design.md").read_text() + (docs / "reference.md").read_text()
    for name, harness in HARNESSES.items():
        assert f"harness:{name}" in readme
        for header in (*harness.session, harness.agent, harness.parent):
            if header is not None:
                assert f"`{header.decode()}`" in readme, header
    for label in ("body:prompt_cache_key", "`x-session-final`", "x-sidecar-session-source"):
        assert label in readme


async def test_a_body_read_for_its_key_still_names_the_model_that_serves(pods, sidecar, http):
    small, large = await pods(1), await pods(1)
    running = await sidecar({"small": pool(small), "large": pool(large, "large-model")})
    for model, served in (("large-model", "large"), ("small-model", "small")):
        status, headers, _ = await chat(http, running, None, {
            "messages": [{"role": "user", "content": "hi"}], "model": model,
            "prompt_cache_key": f"conv-{model}"})
        assert status == 200 and headers["x-sidecar-session-source"] == "body:prompt_cache_key"
        assert headers["x-sidecar-pool"] == served
