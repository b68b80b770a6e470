"""Streaming through the sidecar: chunks arrive as the model produces them.

    OPENAI_BASE_URL=http://127.0.0.1:7878/v1 python examples/openai_stream.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:7878/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                default_headers={"x-session-id": os.environ.get("SESSION_ID", "example-stream")})
stream = client.chat.completions.create(
    model=os.environ.get("MODEL", "llama-3.1-8b-instruct"), stream=True,
    messages=[{"role": "user", "content": "Count to five."}],
    stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n[{chunk.usage.completion_tokens} tokens]")
