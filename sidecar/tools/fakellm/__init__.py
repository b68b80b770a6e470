"""The simulated OpenAI-compatible model server (`llm-sidecar fake-llm`)."""

from sidecar.tools.fakellm.server import Behaviour, FakeLLM, start_fake_llm

__all__ = ["Behaviour", "FakeLLM", "start_fake_llm"]
