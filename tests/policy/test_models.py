"""The model a request names: which pool serves it, when `model` is rewritten, what
`/v1/models` lists; pure rules first, then a sidecar in front of pods that refuse foreign
models (as vLLM does, with 404)."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sidecar.config import ConfigError, load_settings
from sidecar.policy.models import listing, model_index, named_pool, needs_rewrite, requested_model
from tests.conftest import admin, base, chat, pool

SMALL, LARGE = "llama-3.1-8b-instruct", "llama-3.1-70b-instruct"


def settings(pools: dict[str, object], **env: str):
    return load_settings({"SIDECAR_POOLS": json.dumps(pools), **env})


TWO_POOLS = {"small": {"model": SMALL, "endpoints": [], "aliases": ["chat", "fast"]},
             "large": {"model": LARGE, "endpoints": [], "fallback": "small",
                       "aliases": ["smart"]}}


def test_a_model_or_alias_names_its_pool_anything_else_leaves_it_to_the_table():
    index = model_index(settings(TWO_POOLS).pools)
    assert named_pool(index, SMALL) == "small" and named_pool(index, "fast") == "small"
    assert named_pool(index, LARGE) == "large" and named_pool(index, "smart") == "large"
    for other in ("auto", "gpt-4o", None):
        assert named_pool(index, other) is None


def test_the_first_pool_listed_serves_a_model_two_pools_share():
    pools = {"onprem": {"model": SMALL, "endpoints": []},
             "hosted": {"model": SMALL, "endpoints": []}}
    assert named_pool(model_index(settings(pools).pools), SMALL) == "onprem"


@pytest.mark.parametrize("aliases,expected", [
    ("chat", '"aliases" must be a list of model names'),
    ([""], '"aliases" must be a list of model names'),
    ([3], '"aliases" must be a list of model names'),
    (["bad\r\nx-injected: 1"], '"aliases" must be a list of model names'),
    (["auto"], "alias 'auto' is reserved"),
    ([LARGE], f"alias '{LARGE}' already names pool 'large'"),
])
def test_bad_aliases_are_refused_naming_the_variable(aliases, expected):
    pools = {"small": {"model": SMALL, "endpoints": [], "aliases": aliases},
             "large": {"model": LARGE, "endpoints": []}}
    with pytest.raises(ConfigError) as refused:
        settings(pools)
    [problem] = [p for p in refused.value.problems if expected in p]
    assert problem.startswith("SIDECAR_POOLS")


def test_a_model_name_that_could_break_the_response_header_is_refused():
    with pytest.raises(ConfigError) as refused:
        settings({"small": {"model": "m\r\nx-injected: 1", "endpoints": []}})
    assert '"model" must be printable ASCII' in str(refused.value)


def test_two_pools_may_not_claim_one_alias_and_no_pool_may_serve_auto():
    pools = {"a": {"model": "auto", "endpoints": [], "aliases": ["x"]},
             "b": {"model": "m", "endpoints": [], "aliases": ["x"]}}
    with pytest.raises(ConfigError) as refused:
        settings(pools)
    text = str(refused.value)
    assert "may not be 'auto'" in text and "alias 'x' already names pool 'a'" in text


@pytest.mark.parametrize("body,expected", [
    (b"", None),
    (b"not json", None),
    (b'{"messages": []}', None),
    (b'{"model":"m","messages":[]}', "m"),
    (b'{"model": "m"}', "m"),
    (b'{"messages":[{"content":"say \\"model\\": x"}],"model":"real"}', "real"),
    # a "model" key nested in tools or metadata is not the request's model
    (b'{"tools":[{"parameters":{"model":"inner"}}]}', None),
    (b'{"model":"a","metadata":{"model":"b"}}', "a"),
    (b'{"model":"with \\"quote\\""}', 'with "quote"'),
    (b'{"model": 3}', None),
    (b'[{"model": "m"}]', None),
])
def test_requested_model_reads_only_the_top_level_model(body, expected):
    assert requested_model(body) == expected


@given(st.dictionaries(st.sampled_from(["model", "messages", "metadata", "x"]),
                       st.one_of(st.text(max_size=8), st.integers(-9, 9),
                                 st.dictionaries(st.just("model"), st.text(max_size=4))),
                       max_size=4))
@hypothesis_settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
def test_requested_model_agrees_with_a_full_parse(data):
    value = data.get("model")
    assert requested_model(orjson.dumps(data)) == (value if isinstance(value, str) else None)


def test_rewrite_only_when_the_body_names_another_model():
    assert needs_rewrite("auto", SMALL) and needs_rewrite(SMALL, LARGE)
    assert not needs_rewrite(SMALL, SMALL) and not needs_rewrite(None, SMALL)


def test_listing_names_every_model_and_alias_once_and_auto():
    ids = [m["id"] for m in listing(settings(TWO_POOLS).pools)["data"]]
    assert ids == [SMALL, "chat", "fast", LARGE, "smart", "auto"]


# -- through a sidecar, against pods that refuse models they do not serve ------------------


async def strict_sidecar(pods, sidecar, **env: str):
    small = await pods(1, model=SMALL, serves="")
    large = await pods(1, model=LARGE, serves="")
    routes = json.dumps({level: {"small": 8, "large": 8} for level in ("low", "medium", "high")})
    running = await sidecar({"small": pool(small, SMALL, aliases=["chat"]),
                             "large": pool(large, LARGE, fallback="small")},
                            SIDECAR_ROUTES=routes, **env)
    return running, small[0], large[0]


def body(model: str | None) -> dict[str, object]:
    data: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        data["model"] = model
    return data


async def test_fake_llm_answers_vllm_404_for_a_model_it_does_not_serve(pods, http):
    [pod] = await pods(1, model=SMALL, serves="chat-alias")
    async with http.post(pod.url + "/v1/chat/completions", json=body(LARGE)) as r:
        assert r.status == 404
        assert await r.json() == {"object": "error", "message": f"The model `{LARGE}` does "
                                  "not exist.", "type": "NotFoundError", "param": None,
                                  "code": 404}
    for served in (SMALL, "chat-alias"):
        async with http.post(pod.url + "/v1/chat/completions", json=body(served)) as r:
            assert r.status == 200
    async with http.get(pod.url + "/v1/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == [SMALL, "chat-alias"]


async def test_every_session_the_table_sends_to_large_is_served_not_404(pods, sidecar, http):
    """The deployed failure: sessions routed to `large` by the table while the app names the
    small model got vLLM's 404. Now `auto` sessions are rewritten to what serves them, and
    a named model is honoured whatever the table says."""
    running, small, large = await strict_sidecar(pods, sidecar)
    served = {}
    for selector in range(16):
        status, headers, data = await chat(http, running, f"auto-{selector}", body("auto"),
                                           **{"x-sidecar-selector": str(selector)})
        assert status == 200, data
        assert headers["x-sidecar-model"] == data["model"]
        served[selector] = headers["x-sidecar-pool"]
    assert sorted(set(served.values())) == ["large", "small"]
    for selector in range(16):
        status, headers, data = await chat(http, running, f"named-{selector}", body(SMALL),
                                           **{"x-sidecar-selector": str(selector)})
        assert status == 200 and headers["x-sidecar-pool"] == "small", data
        assert headers["x-sidecar-model"] == SMALL
    assert small.fake.counters.unknown_model == 0 and large.fake.counters.unknown_model == 0


async def test_an_alias_is_rewritten_to_the_pools_model(pods, sidecar, http):
    running, small, _ = await strict_sidecar(pods, sidecar)
    status, headers, _data = await chat(http, running, "alias", body("chat"))
    assert status == 200 and headers["x-sidecar-pool"] == "small"
    assert small.fake.last_request["model"] == SMALL and headers["x-sidecar-model"] == SMALL


async def test_a_body_without_model_is_not_given_one(pods, sidecar, http):
    running, small, large = await strict_sidecar(pods, sidecar)
    status, headers, _ = await chat(http, running, "none", body(None))
    assert status == 200
    pod = small if headers["x-sidecar-pool"] == "small" else large
    assert "model" not in pod.fake.last_request


async def test_naming_another_pools_model_serves_it_there_and_keeps_the_sessions_route(
        pods, sidecar, http):
    running, _small, large = await strict_sidecar(pods, sidecar)
    # selector 0 → small in this table: the session's route is on small
    pin = {"x-sidecar-selector": "0"}
    status, headers, _ = await chat(http, running, "mixed", body("auto"), **pin)
    assert status == 200 and headers["x-sidecar-pool"] == "small"
    status, headers, data = await chat(http, running, "mixed", body(LARGE), **pin)
    assert status == 200 and headers["x-sidecar-pool"] == "large", data
    assert large.fake.last_request["model"] == LARGE and "x-sidecar-fallback" not in headers
    status, headers, _ = await chat(http, running, "mixed", body("auto"), **pin)
    assert headers["x-sidecar-pool"] == "small"
    async with http.get(admin(running) + "/sessions/mixed") as r:
        assert (await r.json())["local"]["pool"] == "small"


async def test_a_named_model_on_first_touch_decides_the_sessions_route(pods, sidecar, http):
    running, _, _large = await strict_sidecar(pods, sidecar)
    status, headers, _ = await chat(http, running, "first", body(LARGE),
                                    **{"x-sidecar-selector": "0"})
    assert status == 200 and headers["x-sidecar-pool"] == "large"
    async with http.get(admin(running) + "/sessions/first") as r:
        assert (await r.json())["local"]["pool"] == "large"


async def test_a_named_pool_falls_back_down_its_chain_with_model_rewritten(
        pods, sidecar, http):
    running, small, large = await strict_sidecar(pods, sidecar)
    await large.runner.cleanup()  # the large pod is gone
    status, headers, data = await chat(http, running, "down", body(LARGE))
    assert status == 200, data
    assert headers["x-sidecar-pool"] == "small" and headers["x-sidecar-fallback"] == "large"
    assert small.fake.last_request["model"] == SMALL and headers["x-sidecar-model"] == SMALL


async def test_v1_models_lists_what_the_sidecar_serves(pods, sidecar, http):
    running, small, large = await strict_sidecar(pods, sidecar)
    async with http.get(base(running) + "/v1/models") as r:
        assert r.status == 200
        ids = [m["id"] for m in (await r.json())["data"]]
    assert ids == [SMALL, "chat", LARGE, "auto"]
    assert small.requests == 0 and large.requests == 0  # answered by the sidecar itself
