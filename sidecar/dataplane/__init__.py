"""The data path, in the order a request travels:

    listener.py    HTTP/1.1 from the app on an asyncio protocol (httptools): framing checks,
                   limits, the request-head deadline, Expect, pipelining in order
    downstream.py  the answer written back to the app (framing, cork, flow control): the
                   `Downstream`
    exchange.py    one request: checks → route → attempts → relay (engine-free logic)
    attempts.py    the attempt loop shared by first tries, retries, fallbacks and resumes
    relay.py       the response body: SSE preamble hold-back, token tally, resume rewriting
    sse.py         an SSE stream's preamble told from its content (what relay.py holds)
    resume.py      mid-stream resume: the kept frames and the continuation request
    usage.py       the token counts in an answer's OpenAI `usage` object
    events.py      the one sink for what happened to a request (counters, telemetry, log)
    upstream.py    HTTP/1.1 to the model servers: keep-alive pools, deadlines (`Upstream`)
    connection.py  one upstream connection and the per-request `UpstreamReply` (the
                   `Reply`), which alone gives the connection back to its pool
    seam.py        the interfaces between logic and engine: plain bytes and header lists
    headers.py     hop-by-hop filtering and head serialization (pure)
    flow.py        write-buffer marks and which statuses carry no body (pure)
    mock.py        an in-memory `Upstream` for tests of the request logic

Only `sidecar.server` wires the engine (listener + upstream) to the logic.
The decisions it asks (retry or not, the budget, which pool and pod) are pure, in
`sidecar.policy`; the session's route comes from `sidecar.routing.router`.
"""
