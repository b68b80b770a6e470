"""The `llm-sidecar` command line: serve, check, monitor, scaler, simulate, fake-llm, demo, top,
wait."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import ConfigError, load_settings, redact_url


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def _settings_or_exit() -> Any:
    try:
        return load_settings()
    except ConfigError as exc:
        print("llm-sidecar: configuration refused:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Run `llm-sidecar check` after fixing; docs/reference.md lists every variable.",
              file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.server import serve

    settings = _settings_or_exit()
    return _run(serve(settings))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    print(json.dumps(settings.redacted(), indent=2))
    if (warning := settings.admin_warning()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    return 0


def _behaviour_flags(parser: argparse.ArgumentParser) -> None:
    from sidecar.tools.fakellm import Behaviour
    from sidecar.tools.fakellm.dialects import DIALECTS

    for field in dataclasses.fields(Behaviour):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        elif field.name == "retry_after":
            parser.add_argument(flag, default=None)
        elif field.name == "engine":
            parser.add_argument(flag, default=default, choices=DIALECTS,
                                help="whose metrics page and health answers to give")
        else:
            parser.add_argument(flag, type=type(default), default=default)


def cmd_fake_llm(args: argparse.Namespace) -> int:
    from sidecar.tools.fakellm import Behaviour, start_fake_llm

    behaviour = Behaviour(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(Behaviour)})

    async def main() -> int:
        runner, _, port = await start_fake_llm(behaviour, args.host, args.port, args.name)
        print(f"fake-llm serving model {behaviour.model!r} on http://{args.host}:{port}",
              flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
        return 0

    try:
        return _run(main())
    except KeyboardInterrupt:
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.tools.demo import run_demo

    try:
        return _run(run_demo(args.listen, args.admin_listen, args.cold_start_s,
                             story=not args.no_story, engine=args.engine))
    except KeyboardInterrupt:
        return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """Block until a URL answers 200 (a prestart task gating the app on the sidecar)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + args.timeout
    while True:
        try:
            with urllib.request.urlopen(args.url, timeout=2) as response:
                if response.status == 200:
                    print(f"{args.url} is up", file=sys.stderr)
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            print(f"llm-sidecar wait: {args.url} did not answer 200 within {args.timeout} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)


def cmd_scaler(args: argparse.Namespace) -> int:
    from sidecar.scaler.config import load_scaler_settings, scaler_warnings

    try:
        settings = load_scaler_settings()
    except ConfigError as exc:
        print("llm-sidecar scaler: configuration refused:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    for warning in scaler_warnings(settings):
        print(f"llm-sidecar scaler: warning: {warning}", file=sys.stderr)
    if args.check:
        print(json.dumps(settings.redacted(), indent=2))
        return 0

    async def main() -> int:
        import signal

        from sidecar.routing.store import connect_redis
        from sidecar.scaler.nomad import NomadClient
        from sidecar.scaler.service import Scaler
        from sidecar.telemetry import Telemetry

        redis = connect_redis(settings.redis_url, settings.redis_mode, 2.0, 4,
                              settings.redis_sentinel_master, settings.redis_ca_file)
        nomad = NomadClient(settings)
        events = Telemetry()
        scaler = Scaler(settings, redis, nomad, events)
        events.start()  # DogStatsD: the forecast gauges every flush interval
        listen = settings.metrics_listen
        runner = None
        if listen is not None:
            from sidecar.scaler.service import serve_metrics

            runner = await serve_metrics(events, listen.host or "127.0.0.1", listen.port or 0)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        logging.getLogger("sidecar.scaler").info(
            "scaler %s: %d pools, every %.0f s%s", scaler.instance, len(settings.pools),
            settings.interval_s, " (dry run)" if settings.dry_run else "")
        try:
            await scaler.run(stop)
        finally:
            if runner is not None:
                await runner.cleanup()
            await nomad.close()
            await redis.aclose()
            await events.stop()
        return 0

    return _run(main())


def cmd_monitor(args: argparse.Namespace) -> int:
    """The fleet monitor: probes the pools of SIDECAR_POOLS once for the whole fleet and
    publishes the pod view in SIDECAR_REDIS_URL (two instances: one leads)."""
    from sidecar.config import parse_listen

    settings = _settings_or_exit()
    listen = None if args.stats_listen == "off" else parse_listen(args.stats_listen)
    problems = []
    if settings.redis_url is None:
        problems.append("SIDECAR_REDIS_URL is not set: the monitor publishes its pod view "
                        "in the Redis the sidecars share (without Redis each sidecar probes "
                        "by itself; no monitor is needed)")
    if args.stats_listen != "off" and (listen is None or listen.path is not None):
        problems.append(f"--stats-listen: expected `host:port` or `off`, got "
                        f"{args.stats_listen!r}")
    from sidecar.fleet.monitor import gpu_pools
    from sidecar.scaler.config import NomadAccess, load_nomad_access

    nomad: NomadAccess | None = None
    try:
        # Always, so a pool given a nomad_service by SIGHUP is read too; without one no
        # pool is read and Nomad is never called.
        nomad = load_nomad_access()
    except ConfigError as exc:
        if gpu_pools(settings):
            problems.extend(f"{p} (pools {', '.join(gpu_pools(settings))} name a "
                            "nomad_service: the monitor reads their GPUs from Nomad)"
                            for p in exc.problems)
    if problems:
        print("llm-sidecar monitor: configuration refused:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2

    async def main() -> int:
        import signal

        from sidecar.fleet.monitor import FleetMonitor, monitored, serve_stats
        from sidecar.fleet.pools import PoolSet
        from sidecar.routing.store import connect_redis
        from sidecar.telemetry import Telemetry

        redis = connect_redis(settings.redis_url, settings.redis_mode, 2.0, 4,
                              settings.redis_sentinel_master, settings.redis_ca_file)
        events = Telemetry()
        monitor = FleetMonitor(settings, redis, events, nomad=nomad)
        events.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, monitor.reload)
        runner = None
        if listen is not None:
            runner = await serve_stats(monitor, listen.host or "127.0.0.1", listen.port or 0)
        count = len(monitored(PoolSet(settings)))
        logging.getLogger("sidecar.monitor").log(
            logging.INFO if count else logging.WARNING,
            "fleet monitor %s: %d pools to probe, every %.1f s%s", monitor.token, count,
            monitor.interval_s, "" if count else " (no pool has a health_path or a "
            "metrics_path: there is nothing to monitor)")
        if nomad is not None and gpu_pools(settings):
            logging.getLogger("sidecar.monitor").info(
                "GPU readings for pools %s from Nomad at %s%s",
                ", ".join(gpu_pools(settings)), redact_url(nomad.nomad_addr),
                "" if nomad.nomad_token else " (no NOMAD_TOKEN: a Nomad with ACLs answers "
                "403; the token needs read-job in the pools' namespace)")
        try:
            await monitor.run(stop)
        finally:
            if runner is not None:
                await runner.cleanup()
            await redis.aclose()
            await events.stop()
        return 0

    return _run(main())


def cmd_simulate(args: argparse.Namespace) -> int:
    from sidecar.tools import simulate as sim
    from sidecar.tools import traces

    model = sim.Model(slots=args.slots, context_tokens_per_s=args.context_tokens_per_s,
                      generated_tokens_per_s=args.generated_tokens_per_s,
                      cold_start_s=args.cold_start_s,
                      initial_utilization=args.initial_utilization,
                      interval_s=args.interval_s)
    if (args.trace is None) == (args.synthetic is None):
        print("llm-sidecar simulate: give exactly one of --trace FILE or --synthetic NAME "
              f"({', '.join(traces.SYNTHETIC)})", file=sys.stderr)
        return 2
    if args.synthetic is not None:
        trace = traces.SYNTHETIC[args.synthetic](args.seed)
        source = f"synthetic {args.synthetic} (seed {args.seed})"
    else:
        try:
            trace = traces.read_trace(args.trace)
        except (OSError, ValueError, KeyError) as exc:
            print(f"llm-sidecar simulate: cannot read --trace {args.trace}: {exc} (expected a "
                  "CSV with TIMESTAMP,ContextTokens,GeneratedTokens)", file=sys.stderr)
            return 2
        source = args.trace.rsplit("/", 1)[-1]
    shaped = traces.shape(trace, speed=args.speed, repeat=args.repeat, diurnal=args.diurnal,
                          seed=args.seed)
    work = sim.calls(shaped, model)
    kind = "a diurnal day built from it" if args.diurnal else f"{args.repeat}×"
    title = (f"{source} ({kind}, speed {args.speed:g}, cold start {args.cold_start_s:g} s, "
             f"{args.slots} slots per replica)")
    if args.pools:
        return _simulate_pools(args, work, model, title)
    clairvoyant = sim.clairvoyant(work, model)
    if args.sweep:
        from sidecar.tools import frontier

        points = frontier.sweep(work, model)
        missed = frontier.undominated(points)
        if args.json:
            print(json.dumps({"clairvoyant_replica_minutes": round(clairvoyant, 1),
                              "points": [dataclasses.asdict(p) for p in points],
                              "baseline_points_not_dominated":
                                  [dataclasses.asdict(p) for p in missed]}, indent=2))
        else:
            print(title + "\n")
            print(frontier.table(points, clairvoyant))
            print("\nours dominates the baseline's frontier" if not missed else
                  "\nbaseline points ours does not dominate: "
                  + ", ".join(f"{p.knob} ({p.late_share:.1%} at {p.replica_minutes:.0f})"
                              for p in missed) + ".")
        if args.plot:
            frontier.plot(points, clairvoyant, args.plot, title)
            print(f"plot written to {args.plot}", file=sys.stderr)
        return 0
    results = sim.compare(work, model)
    if args.json:
        print(json.dumps([{**r.row(), "clairvoyant_replica_minutes": round(clairvoyant, 1),
                           "vs_clairvoyant": round(r.replica_minutes / clairvoyant, 3)}
                          for r in results], indent=2))
    else:
        print(title + "\n")
        print(sim.table(results, clairvoyant))
        print(f"\nRequests without warm capacity count after the first cold-start window "
              f"({args.cold_start_s:g} s): before it ends no decision can have produced a "
              "ready replica.")
    if args.plot:
        sim.plot(results, args.plot, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _simulate_pools(args: argparse.Namespace, work: list[Any], model: Any, title: str) -> int:
    from sidecar.tools import simulate as sim
    from sidecar.tools import twopool

    try:
        routes = json.loads(args.routes) if args.routes else twopool.ROUTES
        twopool.tables(routes)
    except (ValueError, AttributeError, TypeError) as exc:
        print(f"llm-sidecar simulate: --routes: {exc} (expected JSON like "
              f"{json.dumps(twopool.ROUTES)})", file=sys.stderr)
        return 2
    results = [twopool.run_pools(work, factory, model, large_cold_start_s=args.large_cold_start_s,
                                 large_slowdown=args.large_slowdown, routes=routes,
                                 seed=args.seed)
               for factory in sim.POLICIES.values()]
    if args.json:
        print(json.dumps([r.row() for r in results], indent=2))
    else:
        print(f"{title}; small and large pools (large: cold start "
              f"{args.large_cold_start_s:g} s, {args.large_slowdown:g}× slower)\n")
        print(twopool.table(results))
        print("\nwaited: requests that found no warm capacity in the pool serving them; "
              "served by the smaller model: routed to large, served by small (fallback).")
    if args.plot:
        panels = []
        for r in results:
            for name, pool in r.pools.items():
                pool.policy = f"{r.policy}, {name} pool"
                panels.append(pool)
        sim.plot(panels, args.plot, title)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from sidecar.tools.top import run_top

    try:
        return _run(run_top(args.admin, args.interval, args.once,
                            args.token or os.environ.get("SIDECAR_ADMIN_TOKEN") or None))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-sidecar", description=(
        "Session-sticky LLM traffic sidecar. Configuration comes from SIDECAR_* variables."))
    parser.add_argument("--version", action="version", version=f"llm-sidecar {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the proxy").set_defaults(func=cmd_serve)
    sub.add_parser("check", help="validate the configuration and print it (secrets "
                   "redacted)").set_defaults(func=cmd_check)

    fake = sub.add_parser("fake-llm", help="a simulated OpenAI-compatible model server")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8000)
    fake.add_argument("--name", default="")
    _behaviour_flags(fake)
    fake.set_defaults(func=cmd_fake_llm)

    monitor = sub.add_parser("monitor", help="the fleet monitor: probes every pool's pods "
                             "once for all sidecars and publishes the pod view in Redis "
                             "(reads the sidecar's SIDECAR_POOLS and SIDECAR_REDIS_*)")
    monitor.add_argument("--stats-listen", default="127.0.0.1:7881",
                         help="GET /stats and /health: `host:port`, or `off`")
    monitor.set_defaults(func=cmd_monitor)

    scaler = sub.add_parser("scaler", help="the traffic monitor and scaler (reads "
                            "SIDECAR_SCALER_* and NOMAD_* variables)")
    scaler.add_argument("--check", action="store_true",
                        help="validate the configuration, print it and exit")
    scaler.set_defaults(func=cmd_scaler)

    sim = sub.add_parser("simulate", help="replay a trace through the scaling policies")
    sim.add_argument("--trace", help="CSV with TIMESTAMP,ContextTokens,GeneratedTokens")
    sim.add_argument("--synthetic", choices=["code-completion", "working-day"],
                     help="a generated trace instead (seeded by --seed)")
    sim.add_argument("--speed", type=float, default=1.0, help="time compression (2 = twice "
                     "as fast)")
    sim.add_argument("--repeat", type=int, default=1, help="play the trace N times in a row")
    sim.add_argument("--diurnal", action="store_true",
                     help="a 24-hour day built from the trace (30-100 %% of its rate)")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--slots", type=int, default=8, help="requests a replica serves at once")
    sim.add_argument("--context-tokens-per-s", type=float, default=4000.0)
    sim.add_argument("--generated-tokens-per-s", type=float, default=40.0)
    sim.add_argument("--cold-start-s", type=float, default=600.0)
    sim.add_argument("--initial-utilization", type=float, default=0.7)
    sim.add_argument("--interval-s", type=float, default=10.0,
                     help="how often the policies decide")
    sim.add_argument("--sweep", action="store_true",
                     help="each policy's frontier over its knobs, beside the clairvoyant point")
    sim.add_argument("--pools", action="store_true",
                     help="a small and a large pool at once: load level, routing, fallback")
    sim.add_argument("--large-cold-start-s", type=float, default=900.0)
    sim.add_argument("--large-slowdown", type=float, default=2.0,
                     help="how much longer a large-model request holds its slot")
    sim.add_argument("--routes", help="JSON routing tables for --pools (SIDECAR_ROUTES form)")
    sim.add_argument("--json", action="store_true")
    sim.add_argument("--plot", metavar="FILE.png")
    sim.set_defaults(func=cmd_simulate)

    top = sub.add_parser("top", help="live view of a running sidecar (its admin API)")
    top.add_argument("--admin", default="http://127.0.0.1:7879")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--token", default=None,
                     help="the admin token (default: $SIDECAR_ADMIN_TOKEN, which keeps it "
                     "out of the process list)")
    top.set_defaults(func=cmd_top)

    wait = sub.add_parser("wait", help="wait until a URL answers 200 (prestart gate)")
    wait.add_argument("--url", default="http://127.0.0.1:7879/health")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(func=cmd_wait)

    demo = sub.add_parser("demo", help="the sidecar with simulated pools on one machine")
    demo.add_argument("--listen", default="127.0.0.1:7878")
    demo.add_argument("--admin-listen", default="127.0.0.1:7879")
    demo.add_argument("--cold-start-s", type=float, default=4.0,
                      help="simulated cold start of the large pod (real ones take ~15 min)")
    demo.add_argument("--no-story", action="store_true",
                      help="skip the scripted story and just serve")
    demo.add_argument("--engine", choices=("fake", "llama"), default="fake",
                      help="the pods: simulated (fake-llm) or llama.cpp servers with a real "
                      "small model (installed by `make engine`)")
    demo.set_defaults(func=cmd_demo)
    return parser


class JsonLines(logging.Formatter):
    """One JSON object per line; a record's `fields` (extra=) become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname,
                                 "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, command: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Services log JSON lines by default (log shippers); interactive commands log text.
    default = "json" if command in ("serve", "scaler", "monitor") else "text"
    if (os.environ.get("SIDECAR_LOG_FORMAT") or default).strip().lower() == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.command)
    return int(args.func(args))
