"""Tools around the sidecar; `serve` never imports them.

    demo.py        `llm-sidecar demo` (`make run`): the story on one machine
    fakellm/       `llm-sidecar fake-llm`: the simulated model server
    llamaserver.py llama.cpp's server as a local pod (the demo, the real-engine tests)
    top.py         `llm-sidecar top`: a live terminal view from the admin API
    simulate.py    `llm-sidecar simulate`: a trace replayed through the scaling policies
    traces.py      the simulator's traces: CSV, reshaping, seeded synthetic shapes
    twopool.py     `simulate --pools`: a small and a large pool at once
    frontier.py    `simulate --sweep`: each policy's frontier over its knobs
"""
