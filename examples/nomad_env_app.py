"""An app configured only through its Nomad `env` stanza (see nomad/sidecar.hcl): it reads
OPENAI_BASE_URL and OPENAI_API_KEY like any OpenAI client, and knows nothing else of the
sidecar. Its user id becomes the session, so each user's conversation stays on one pod.

    env { OPENAI_BASE_URL = "http://127.0.0.1:7878/v1"  OPENAI_API_KEY = "unused" }
"""

import os
import sys

from openai import OpenAI

client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment
user = sys.argv[1] if len(sys.argv) > 1 else "user-42"
reply = client.chat.completions.create(
    model=os.environ.get("MODEL", "llama-3.1-8b-instruct"),
    messages=[{"role": "user", "content": "What can you do?"}],
    extra_headers={"x-session-id": user})
print(reply.choices[0].message.content)
