"""Every file in examples/ runs against a real sidecar and fake-llm pods, so none can rot."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import admin, base, pool

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def run(argv: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 0, text
    return text


@pytest.fixture
async def running(pods, sidecar):
    small = await pods(2, max_tokens=5)
    return await sidecar({"small": pool(small, "llama-3.1-8b-instruct")})


@pytest.mark.parametrize("script", ["openai_sync.py", "openai_async.py", "openai_stream.py",
                                    "nomad_env_app.py"])
async def test_python_examples(running, script):
    env = {"OPENAI_BASE_URL": base(running) + "/v1", "OPENAI_API_KEY": "unused"}
    output = await run([sys.executable, str(EXAMPLES / script)], env)
    assert "tok1" in output
    if script == "openai_sync.py":
        endpoints = {line.split("endpoint=")[1].split(":")[2] for line in output.splitlines()}
        assert len(endpoints) == 1, "the conversation stays on one pod"
    if script == "openai_stream.py":
        assert "[5 tokens]" in output


async def test_curl_example(running):
    output = await run(["bash", str(EXAMPLES / "curl.sh")],
                       {"SIDECAR_URL": base(running), "ADMIN_URL": admin(running)})
    assert "x-sidecar-pool: small" in output.lower()
    assert '"session": "curl-example"' in output
