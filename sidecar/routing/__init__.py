"""Session → route: resolved once per session (first touch), then served from memory.

    sessionkeys.py which session a request belongs to (headers, the body's key, the connection)
    sessions.py    session ids, the selector, the route record and the route cache
    router.py      the routing table per load level, first touch, the attempt plan
    store.py       where routes live across pods: Redis (one round trip) or in-memory
"""
