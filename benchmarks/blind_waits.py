"""Whose calls a long wait for a slot was behind: `routing.py --calls FILE`'s records.

    python benchmarks/blind_waits.py FILE [FILE ...] [--load agents] [--sidecars 3]
                                     [--least-ms 250] [--slots 8]

For every call of the sidecar fleet that waited at least `--least-ms` for a slot on its
pod, counts the calls in flight on that pod when it was sent, all of them and those its own
sidecar had sent (session i enters through app pod i mod `--sidecars`; a subagent through
its parent's). A wait whose sidecar had fewer than `--slots` calls of its own there was
behind calls it could not see until its next reading of the pod: blind. A call's end is
its first token plus the rest of its answer (MAX_TOKENS at the engine's 100 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DECODE_S = 0.31  # routing.py: MAX_TOKENS - 1 tokens after the first, at 100 tokens/s


def sidecar_of(session: str, sidecars: int) -> int:
    match = re.search(r"-(\d+)(?:-sub\d+)?$", session)
    assert match, session
    return int(match.group(1)) % sidecars


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--load", default="agents")
    parser.add_argument("--sidecars", type=int, default=3)
    parser.add_argument("--least-ms", type=float, default=250.0)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    blind = seen = 0
    for name in args.files:
        calls = [c for c in map(json.loads, Path(name).read_text().splitlines())
                 if c["load"] == args.load and str(c["target"]).startswith("llm-sidecar")
                 and c["ttft"] is not None]
        for c in calls:
            c["end"] = c["at"] + c["ttft"] / 1000 + DECODE_S
            c["sidecar"] = sidecar_of(c["session"], args.sidecars)
        for c in calls:
            if c["queued_ms"] < args.least_ms:
                continue
            there = [o for o in calls if o is not c and o["pod"] == c["pod"]
                     and o["at"] <= c["at"] < o["end"]]
            own = sum(1 for o in there if o["sidecar"] == c["sidecar"])
            if own >= args.slots:
                seen += 1
            else:
                blind += 1
    total = blind + seen
    print(f"{total} calls of {args.load} waited ≥ {args.least_ms:.0f} ms for a slot; "
          f"{blind} behind calls their sidecar could not see (fewer than {args.slots} of its "
          f"own on the pod), {seen} on a pod its own calls filled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
