"""The OpenAI Python SDK (sync) through the sidecar: only the base URL changes.

    OPENAI_BASE_URL=http://127.0.0.1:7878/v1 python examples/openai_sync.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:7878/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "unused"),  # the sidecar holds real keys
    # One conversation = one session: its turns reach the pod that has its prefix cached.
    default_headers={"x-session-id": os.environ.get("SESSION_ID", "example-sync")},
)
model = os.environ.get("MODEL", "llama-3.1-8b-instruct")
messages = [{"role": "user", "content": "Name a colour."}]
for turn in range(3):
    reply = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    answer = reply.parse().choices[0].message.content
    print(f"turn {turn}: pool={reply.headers['x-sidecar-pool']} "
          f"endpoint={reply.headers['x-sidecar-endpoint']}: {answer}")
    messages += [{"role": "assistant", "content": answer},
                 {"role": "user", "content": "And another?"}]
