"""What reading a pod's metrics page costs, in µs per parse (medians of 7 runs): a
vLLM-sized page (histograms of every request phase, ~50 KB) and a Triton page with the
TensorRT-LLM backend's label-selected series and eight GPUs' gauges (~14 KB). The prober
parses one page per pod every `health_interval_s`, off the request path.

    python benchmarks/parse_cost.py
"""

from __future__ import annotations

import statistics
import timeit

from common import ROOT  # noqa: F401  (puts the project on sys.path)

from sidecar.fleet.podload import ENGINES, parse_metrics

BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
           7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, float("inf")]


def histogram(name: str, labels: str) -> list[str]:
    lines = [f"# HELP {name} Histogram of {name}.", f"# TYPE {name} histogram"]
    for le in BUCKETS:
        bound = "+Inf" if le == float("inf") else repr(le)
        lines.append(f'{name}_bucket{{{labels},le="{bound}"}} 12.0')
    lines += [f"{name}_sum{{{labels}}} 3.5", f"{name}_count{{{labels}}} 12.0"]
    return lines


def process_series() -> list[str]:
    """What every Python exporter prints first (prometheus_client's default collectors)."""
    lines = []
    for generation in range(3):
        lines.append(f'python_gc_objects_collected_total{{generation="{generation}"}} 1234.0')
    lines += ["process_virtual_memory_bytes 1.2e10", "process_resident_memory_bytes 3.1e9",
              "process_open_fds 120.0", "process_cpu_seconds_total 5402.1"]
    return lines


def vllm_page() -> bytes:
    labels = 'engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"'
    lines = process_series()
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens",
                 "vllm:request_generation_tokens", "vllm:iteration_tokens_total",
                 "vllm:request_max_num_generation_tokens", "vllm:request_params_n",
                 "vllm:request_params_max_tokens", "vllm:time_per_output_token_seconds"):
        lines += histogram(name, labels)
    for reason in ("stop", "length", "abort", "error"):
        lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} 9.0')
    lines += [f"vllm:num_requests_running{{{labels}}} 7.0",
              f"vllm:num_requests_waiting{{{labels}}} 2.0",
              f"vllm:kv_cache_usage_perc{{{labels}}} 0.42"]
    for name in ("prompt_tokens", "generation_tokens", "prefix_cache_queries",
                 "prefix_cache_hits", "num_preemptions"):
        lines.append(f"vllm:{name}_total{{{labels}}} 100.0")
    # uvicorn's request histograms per handler, as the OpenAI server exports them
    for handler in ("/v1/chat/completions", "/v1/completions", "/health", "/metrics"):
        lines += histogram("http_request_duration_seconds", f'handler="{handler}",method="GET"')
    return ("\n".join(lines) + "\n").encode()


def triton_page() -> bytes:
    lines = []
    for model in ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing"):
        labels = f'model="{model}",version="1"'
        for name in ("nv_inference_request_success", "nv_inference_request_failure",
                     "nv_inference_count", "nv_inference_exec_count",
                     "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                     "nv_inference_compute_input_duration_us",
                     "nv_inference_compute_infer_duration_us",
                     "nv_inference_compute_output_duration_us",
                     "nv_inference_pending_request_count"):
            lines.append(f"{name}{{{labels}}} 12")
    labels = 'model="tensorrt_llm",version="1"'
    for kind, value in (("waiting", 3), ("context", 1), ("scheduled", 8), ("max", 64),
                        ("active", 8)):
        lines.append(f'nv_trt_llm_request_metrics{{{labels},request_type="{kind}"}} {value}')
    for kind, value in (("fraction", 0.5), ("tokens_per", 64), ("used", 3120),
                        ("free", 3120), ("max", 6240), ("reused", 12)):
        lines.append(f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{kind}",'
                     f'{labels}}} {value}')
    for kind in ("micro_batch_id", "generation_requests", "total_context_tokens",
                 "paused_requests"):
        lines.append(f'nv_trt_llm_inflight_batcher_metrics{{inflight_batcher_specific_metric='
                     f'"{kind}",{labels}}} 0')
    for gpu in range(8):
        uuid = f'gpu_uuid="GPU-{gpu:08d}-aaaa-bbbb-cccc-dddddddddddd"'
        for name in ("nv_gpu_utilization", "nv_gpu_memory_total_bytes",
                     "nv_gpu_memory_used_bytes", "nv_gpu_power_usage", "nv_gpu_power_limit",
                     "nv_energy_consumption"):
            lines.append(f"{name}{{{uuid}}} 1.0")
    lines += histogram("nv_llm_output_token_len", labels + ',response_metric_type='
                       '"total_output_tokens"')
    lines += histogram("nv_llm_input_token_len", labels + ',response_metric_type='
                       '"total_input_tokens"')
    return ("\n".join(lines) + "\n").encode()


def per_parse_us(page: bytes, engine: str) -> float:
    number = 200
    runs = timeit.repeat(lambda: parse_metrics(page, 0.0, engine), number=number, repeat=7)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    pages = [("vllm", vllm_page())]
    if "triton" in ENGINES:
        pages.append(("triton", triton_page()))
    for engine, page in pages:
        load = parse_metrics(page, 0.0, engine)
        print(f"{engine:7s} page {len(page) / 1024:6.1f} KB: {per_parse_us(page, engine):8.1f} "
              f"µs per parse (running {load.running:g}, waiting {load.waiting:g}, "
              f"KV {load.kv_usage:g})")


if __name__ == "__main__":
    main()
