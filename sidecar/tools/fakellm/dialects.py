"""How fake-llm's simulated engine is reported, per real server it stands in for: the
metrics page under that server's own names, labels and path, so a pool's `engine` setting
is tested against each dialect. The simulation (engine.py) is the same for all of them.

The names, label sets and paths are those podload.py's ENGINES table cites (the same
source files and versions); a dialect whose server exports no KV gauge prints none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.tools.fakellm.engine import Engine

# Triton's TensorRT-LLM backend reports KV in blocks; the simulation counts tokens.
TOKENS_PER_BLOCK = 16
# trtllm-serve under prometheus_client's multiprocess mode labels each gauge with the pid
# of the process that set it.
TRTLLM_PID = "1"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What every page reports, read from the engine at one instant."""

    model: str
    running: int
    waiting: int
    in_use_tokens: int
    capacity: int          # KV tokens; 0 = unbounded (usage reads 0)
    max_num_seqs: int      # 0 = unbounded
    usage: float
    admitted: int          # sequences ever admitted (trtllm's gauges exist after the first)
    successes: int
    prompt_tokens: int
    generation_tokens: int
    prefix_queries: int
    prefix_hit_tokens: int

    @classmethod
    def of(cls, engine: Engine, model: str, capacity: int, max_num_seqs: int) -> Snapshot:
        return cls(model, engine.running, engine.waiting, engine.in_use_tokens, capacity,
                   max_num_seqs, engine.usage(capacity), engine.admitted, engine.successes,
                   engine.prompt_tokens, engine.generation_tokens, engine.prefix_queries,
                   engine.prefix_hit_tokens)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _page(series: list[tuple[str, str, str, list[tuple[str, float]]]]) -> str:
    """Prometheus text: per family its HELP and TYPE, then its samples (labels, value)."""
    lines = []
    for name, kind, help_text, samples in series:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {float(value)!r}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def vllm(s: Snapshot) -> str:
    """vLLM's V1 engine (vllm/v1/metrics/loggers.py), with V0's name of the KV gauge."""
    labels = f'{{model_name="{_quoted(s.model)}",engine="0"}}'
    return _page([
        ("vllm:num_requests_running", "gauge",
         "Number of requests in model execution batches.", [(labels, s.running)]),
        ("vllm:num_requests_waiting", "gauge",
         "Number of requests waiting to be processed.", [(labels, s.waiting)]),
        ("vllm:kv_cache_usage_perc", "gauge",
         "KV-cache usage. 1 means 100 percent usage.", [(labels, s.usage)]),
        ("vllm:gpu_cache_usage_perc", "gauge",
         "GPU KV-cache usage. 1 means 100 percent usage.", [(labels, s.usage)]),
        ("vllm:prefix_cache_queries_total", "counter",
         "Prefix cache queries, in terms of number of queried tokens.",
         [(labels, s.prefix_queries)]),
        ("vllm:prefix_cache_hits_total", "counter",
         "Prefix cache hits, in terms of number of cached tokens.",
         [(labels, s.prefix_hit_tokens)]),
        ("vllm:prompt_tokens_total", "counter",
         "Number of prefill tokens processed.", [(labels, s.prompt_tokens)]),
        ("vllm:generation_tokens_total", "counter",
         "Number of generation tokens processed.", [(labels, s.generation_tokens)]),
        ("vllm:request_success_total", "counter",
         "Count of successfully processed requests.", [(labels, s.successes)]),
    ])


def sglang(s: Snapshot) -> str:
    """SGLang's scheduler and tokenizer collectors (python/sglang/srt/metrics/collector.py)."""
    labels = (f'{{engine_type="unified",model_name="{_quoted(s.model)}",pp_rank="0",'
              f'tp_rank="0"}}')
    return _page([
        ("sglang:num_running_reqs", "gauge", "The number of running requests.",
         [(labels, s.running)]),
        ("sglang:num_used_tokens", "gauge", "The number of used tokens.",
         [(labels, s.in_use_tokens)]),
        ("sglang:token_usage", "gauge", "The token usage.", [(labels, s.usage)]),
        ("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.",
         [(labels, s.waiting)]),
        ("sglang:max_total_num_tokens", "gauge",
         "Maximum total number of tokens in the KV cache pool.", [(labels, s.capacity)]),
        ("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
         [(labels, s.prompt_tokens)]),
        ("sglang:generation_tokens_total", "counter",
         "Number of generation tokens processed.", [(labels, s.generation_tokens)]),
        ("sglang:cached_tokens_total", "counter", "Number of cached prompt tokens.",
         [(labels, s.prefix_hit_tokens)]),
        ("sglang:num_requests_total", "counter", "Number of requests processed.",
         [(labels, s.successes)]),
    ])


def llamacpp(s: Snapshot) -> str:
    """llama.cpp's server with --metrics (build 11434): no labels, no KV gauge."""
    return _page([
        ("llamacpp:prompt_tokens_total", "counter",
         "Number of prompt tokens processed.", [("", s.prompt_tokens)]),
        ("llamacpp:tokens_predicted_total", "counter",
         "Number of generation tokens processed.", [("", s.generation_tokens)]),
        ("llamacpp:requests_processing", "gauge",
         "Number of requests processing.", [("", s.running)]),
        ("llamacpp:requests_deferred", "gauge",
         "Number of requests deferred.", [("", s.waiting)]),
    ])


def tgi(s: Snapshot) -> str:
    """text-generation-inference 3.3's router (metrics-exporter-prometheus 0.15: counters
    without a `_total` suffix; a series exists once first set, so a fresh server's page
    has none of them). No KV gauge."""
    if not s.admitted:
        return "\n"
    return _page([
        ("tgi_batch_current_size", "gauge", "Current batch size", [("", s.running)]),
        ("tgi_queue_size", "gauge", "Current queue size", [("", s.waiting)]),
        ("tgi_request_success", "counter", "Number of successful requests",
         [("", s.successes)] if s.successes else []),
    ])


def trtllm(s: Snapshot) -> str:
    """trtllm-serve's `/prometheus/metrics` (tensorrt_llm/metrics/collector.py): the
    iteration gauges exist only once the engine has run an iteration."""
    labels = f'{{engine_type="undefined",model_name="undefined",pid="{TRTLLM_PID}"}}'
    counter_labels = '{engine_type="undefined",finished_reason="length",model_name="undefined"}'
    series = [("trtllm_request_success_total", "counter",
               "Count of successfully processed requests.",
               [(counter_labels, s.successes)] if s.successes else [])]
    if s.admitted:
        blocks = _blocks(s)
        series += [
            ("trtllm_num_requests_running", "gauge", "Number of active requests",
             [(labels, s.running)]),
            ("trtllm_num_requests_waiting", "gauge", "Number of queued requests",
             [(labels, s.waiting)]),
            ("trtllm_kv_cache_utilization", "gauge", "KV cache utilization",
             [(labels, blocks["used"] / blocks["max"] if blocks["max"] else 0.0)]),
            ("trtllm_kv_cache_used_blocks", "gauge", "Number of used KV cache blocks",
             [(labels, blocks["used"])]),
            ("trtllm_kv_cache_max_blocks", "gauge", "Maximum number of KV cache blocks",
             [(labels, blocks["max"])]),
        ]
    return _page(series)


def trtllm_iteration_stats(s: Snapshot) -> list[dict[str, object]]:
    """trtllm-serve's `/metrics`: the latest iteration statistics as JSON, not Prometheus."""
    blocks = _blocks(s)
    return [{"numActiveRequests": s.running, "numQueuedRequests": s.waiting,
             "numCompletedRequests": 0, "maxNumActiveRequests": s.max_num_seqs,
             "kvCacheStats": {"maxNumBlocks": blocks["max"], "freeNumBlocks": blocks["free"],
                              "usedNumBlocks": blocks["used"],
                              "tokensPerBlock": TOKENS_PER_BLOCK}}]


def triton(s: Snapshot) -> str:
    """Triton with the TensorRT-LLM backend (custom_metrics_reporter.cc) as its OpenAI
    frontend serves it: label-selected families, labels in prometheus-cpp's sorted order."""
    model = 'model="tensorrt_llm"'
    blocks = _blocks(s)
    fraction = blocks["used"] / blocks["max"] if blocks["max"] else 0.0
    requests = [("active", s.running), ("max", s.max_num_seqs), ("scheduled", s.running),
                ("context", 0), ("waiting", s.waiting)]
    kv = [("max", blocks["max"]), ("free", blocks["free"]), ("used", blocks["used"]),
          ("tokens_per", TOKENS_PER_BLOCK), ("reused", 0), ("fraction", fraction)]
    return _page([
        ("nv_inference_request_success", "counter",
         "Number of successful inference requests, all batch sizes",
         [(f'{{{model},version="1"}}', s.successes)]),
        ("nv_inference_pending_request_count", "gauge",
         "Instantaneous number of pending requests awaiting execution per-model.",
         [(f'{{{model},version="1"}}', 0)]),
        ("nv_trt_llm_request_metrics", "gauge", "TRT LLM request metrics",
         [(f'{{{model},request_type="{kind}",version="1"}}', value)
          for kind, value in requests]),
        ("nv_trt_llm_kv_cache_block_metrics", "gauge", "TRT LLM KV cache block metrics",
         [(f'{{kv_cache_block_type="{kind}",{model},version="1"}}', value)
          for kind, value in kv]),
    ])


def _blocks(s: Snapshot) -> dict[str, int]:
    total = s.capacity // TOKENS_PER_BLOCK
    used = min(total, -(-s.in_use_tokens // TOKENS_PER_BLOCK)) if total else 0
    return {"max": total, "used": used, "free": total - used}


# The page each dialect serves, and where.
PAGES: dict[str, tuple[str, Callable[[Snapshot], str]]] = {
    "vllm": ("/metrics", vllm),
    "sglang": ("/metrics", sglang),
    "llamacpp": ("/metrics", llamacpp),
    "tgi": ("/metrics", tgi),
    "trtllm": ("/prometheus/metrics", trtllm),
    "triton": ("/metrics", triton),
}
DIALECTS = tuple(PAGES)
