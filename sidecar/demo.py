"""`llm-sidecar demo`: the sidecar on embedded defaults with simulated model pods.

Three fake-llm pods (a "small" pool of two, a "large" pool of one, falling back to small)
and the sidecar with the in-memory route store, all in this process; serves until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import signal

from sidecar.config import load_settings
from sidecar.fakellm import Behaviour, start_fake_llm
from sidecar.server import start

SMALL_MODEL = "llama-3.1-8b-instruct"
LARGE_MODEL = "llama-3.1-70b-instruct"


def demo_environment(small: list[int], large: list[int], listen: str, admin_listen: str
                     ) -> dict[str, str]:
    pools = {
        "small": {"model": SMALL_MODEL, "health_path": "/health", "health_interval_s": 0.5,
                  "cold_start_s": 600,
                  "endpoints": [f"http://127.0.0.1:{p}" for p in small]},
        "large": {"model": LARGE_MODEL, "health_path": "/health", "health_interval_s": 0.5,
                  "cold_start_s": 900, "fallback": "small",
                  "endpoints": [f"http://127.0.0.1:{p}" for p in large]},
    }
    routes = {"low": {"small": 12, "large": 4}, "medium": {"small": 8, "large": 8},
              "high": {"small": 4, "large": 12}}
    return {"SIDECAR_LISTEN": listen, "SIDECAR_ADMIN_LISTEN": admin_listen,
            "SIDECAR_POOLS": json.dumps(pools), "SIDECAR_ROUTES": json.dumps(routes),
            "SIDECAR_DRAIN_TIMEOUT_S": "2"}


def usage(listen: str, admin_listen: str) -> str:
    base = f"http://{listen}"
    return f"""
llm-sidecar demo is serving on {base}  (admin: http://{admin_listen})
  pools: small = 2 simulated pods of {SMALL_MODEL}; large = 1 pod of {LARGE_MODEL}
         (falls back to small); route store: in-memory (no Redis)

Call it with curl:
  curl -s {base}/v1/chat/completions -H 'content-type: application/json' \\
       -H 'x-session-id: my-session' \\
       -d '{{"model": "{SMALL_MODEL}", "messages": [{{"role": "user", "content": "hi"}}]}}'

Or from the OpenAI SDK (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="{base}/v1", api_key="unused",
                  default_headers={{"x-session-id": "my-session"}})
  print(client.chat.completions.create(model="{SMALL_MODEL}",
        messages=[{{"role": "user", "content": "hi"}}]).choices[0].message.content)

See where sessions go:  curl -s http://{admin_listen}/sessions/my-session
Endpoint states:        curl -s http://{admin_listen}/endpoints
Ctrl-C stops everything.
"""


async def run_demo(listen: str, admin_listen: str, cold_start_s: float) -> int:
    pods = []
    ports: dict[str, list[int]] = {"small": [], "large": []}
    for pool, model, count in (("small", SMALL_MODEL, 2), ("large", LARGE_MODEL, 1)):
        for index in range(count):
            behaviour = Behaviour(model=model, cold_start_s=cold_start_s, ttft_ms=20,
                                  tokens_per_s=200, max_tokens=24)
            runner, _, port = await start_fake_llm(behaviour, name=f"{pool}-{index}")
            pods.append(runner)
            ports[pool].append(port)
    settings = load_settings(demo_environment(ports["small"], ports["large"], listen,
                                              admin_listen))
    running = await start(settings)
    print(usage(listen, admin_listen), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("stopping…", flush=True)
        await running.stop()
        for runner in pods:
            await runner.cleanup()
    return 0
