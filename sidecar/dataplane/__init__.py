"""The data path, in the order a request travels:

    listener.py   HTTP/1.1 from the app on an asyncio protocol (httptools): framing checks,
                  limits, pipelining, flow control; it is the `Downstream`
    exchange.py   one request: checks → route → attempts → relay (the engine-free logic)
    attempts.py   the attempt loop shared by first tries, retries, fallbacks and resumes
    failover.py   retry or not, next endpoint or pass through: a pure decision
    relay.py      the response body: SSE preamble hold-back, token tally, resume rewriting
    events.py     the one sink for what happened to a request (counters, telemetry, log)
    upstream.py   HTTP/1.1 to the model servers: pooled keep-alive connections (`Upstream`)
    seam.py       the interfaces between them: plain bytes and header lists
    headers.py    hop-by-hop filtering and head serialization (pure)

Only `sidecar.server` wires the engine (listener + upstream) to the logic.
"""
