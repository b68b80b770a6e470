"""Per-fleet state: the pools and their endpoints, what the pods report, the fleet monitor
and the traffic the scaler reads.

    pools.py       pools, endpoints, rendezvous picking with bounded loads
    outlier.py     an endpoint's state: outlier detection, the one writer of it (pure)
    loads.py       pod load's one owner: scrapes, heartbeats and the monitor's view set it
    health.py      this sidecar's active probes and load scrapes
    podload.py     a pod's load: the metrics parser per engine, the heartbeat estimate
    bodyread.py    reading a bounded answer body (metrics pages, Nomad's answers)
    podview.py     the fleet monitor's pod view: Redis layout, encoding, when to follow it
    monitor.py     `llm-sidecar monitor`: one process probing the pods for the fleet
    gpustats.py    a pod's GPUs from Nomad's answers (pure)
    gpureader.py   the monitor's reader of Nomad's registrations and allocation statistics
    traffic.py     per-pool traffic flushed to Redis for the scaler, and its reader
"""
