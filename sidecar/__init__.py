"""llm-sidecar: a localhost proxy that routes LLM calls by session to warm model pods."""

__version__ = "0.1.0"
