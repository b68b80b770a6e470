"""The OpenAI Python SDK (async): several conversations at once, each its own session.

    OPENAI_BASE_URL=http://127.0.0.1:7878/v1 python examples/openai_async.py
"""

import asyncio
import os

from openai import AsyncOpenAI


async def conversation(client: AsyncOpenAI, session: str, model: str) -> str:
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Hello from {session}"}],
        extra_headers={"x-session-id": session})
    return f"{session}: {reply.choices[0].message.content}"


async def main() -> None:
    client = AsyncOpenAI(base_url=os.environ.get("OPENAI_BASE_URL",
                                                 "http://127.0.0.1:7878/v1"),
                         api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    model = os.environ.get("MODEL", "llama-3.1-8b-instruct")
    async with client:
        for line in await asyncio.gather(*(conversation(client, f"user-{i}", model)
                                           for i in range(4))):
            print(line)


asyncio.run(main())
