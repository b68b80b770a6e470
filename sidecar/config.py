"""Environment → frozen, validated settings.

Every problem found is collected (not just the first) and each message names the variable,
the bad value and what is expected, so one `llm-sidecar check` run shows everything to fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.podload import DEFAULT_ENGINE, ENGINES
from sidecar.sessionkeys import EXPECTED_FORM, Source, default_sources, parse_sources

LOAD_LEVELS = ("low", "medium", "high")
SELECTOR_SLOTS = 16
REDIS_MODES = ("standalone", "cluster", "sentinel")
# A request naming this model lets the session's selector and routing table choose the pool.
ROUTING_ALIAS = "auto"


class ConfigError(Exception):
    """Start-up refused: `problems` lists every invalid or missing setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a listener binds: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return False


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    model: str
    endpoints: tuple[str, ...]
    fallback: str | None = None
    cold_start_s: float = 600.0
    health_path: str | None = None
    health_interval_s: float = 5.0
    api_key_env: str | None = None
    resume: bool = False
    metrics_path: str | None = None  # the pods' /metrics (names per `engine`), scraped for load
    aliases: tuple[str, ...] = ()
    engine: str = DEFAULT_ENGINE  # the pods' server: which names its metrics page uses
    nomad_service: str | None = None  # the pods' Nomad service: the monitor reads their GPUs


@dataclass(frozen=True, slots=True)
class Settings:
    listen: Listen
    admin_listen: Listen
    pools: Mapping[str, PoolConfig]
    # level → 16 pool names, index = selector
    routes: Mapping[str, tuple[str, ...]]
    load_level: str
    redis_url: str | None
    redis_mode: str
    redis_sentinel_master: str | None
    redis_timeout_s: float
    redis_max_connections: int
    session_header: str
    session_ttl_s: int
    session_idle_s: float
    route_cache_size: int
    connect_timeout_s: float
    first_byte_timeout_s: float
    max_attempts: int
    max_body_bytes: int
    fallback_hold_s: float
    drain_timeout_s: float
    retry_budget_percent: float
    retry_budget_min: int
    bounded_load_factor: float
    stream_idle_timeout_s: float = 120.0
    response_timeout_s: float = 600.0
    upstream_ca_file: str | None = None
    redis_ca_file: str | None = None
    request_log_level: int = 10
    log_format: str = "json"
    pools_file: str | None = None
    # Secrets resolved from `api_key_env`, never printed (see `redacted`).
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Bearer token for the admin endpoints beyond health/ready/metrics; never printed.
    admin_token: str | None = field(default=None, repr=False)
    # Where a request's session key comes from, first present wins (sessionkeys.py).
    session_keys: tuple[Source, ...] = ()

    @property
    def admin_needs_token(self) -> bool:
        """Off loopback, only health, ready and metrics answer without the token."""
        return not self.admin_listen.is_loopback

    def admin_warning(self) -> str | None:
        """What `check` and start-up say about an exposed admin listener (no secret)."""
        if not self.admin_needs_token or self.admin_token is not None:
            return None
        return (f"SIDECAR_ADMIN_LISTEN={self.admin_listen} is not loopback and "
                "SIDECAR_ADMIN_TOKEN is not set: only /health, /ready and /metrics answer "
                "there; /stats, /endpoints and /sessions answer 403 until you set "
                "SIDECAR_ADMIN_TOKEN (e.g. from `openssl rand -hex 32`) and send it as "
                "`Authorization: Bearer <token>`")

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with secrets removed, for `check` and `/stats`."""
        return {
            "SIDECAR_LISTEN": str(self.listen),
            "SIDECAR_ADMIN_LISTEN": str(self.admin_listen),
            "SIDECAR_ADMIN_TOKEN": "<redacted>" if self.admin_token is not None else None,
            "SIDECAR_POOLS_FILE": self.pools_file,
            "SIDECAR_POOLS": {
                name: {
                    "model": p.model,
                    "endpoints": list(p.endpoints),
                    "fallback": p.fallback,
                    "cold_start_s": p.cold_start_s,
                    "health_path": p.health_path,
                    "health_interval_s": p.health_interval_s,
                    "api_key_env": p.api_key_env,
                    "api_key": "<redacted>" if p.name in self.api_keys else None,
                    "resume": p.resume,
                    "metrics_path": p.metrics_path,
                    "aliases": list(p.aliases),
                    "engine": p.engine,
                    "nomad_service": p.nomad_service,
                }
                for name, p in self.pools.items()
            },
            "SIDECAR_ROUTES": {level: _slot_counts(t) for level, t in self.routes.items()},
            "SIDECAR_LOAD_LEVEL": self.load_level,
            "SIDECAR_REDIS_URL": redact_url(self.redis_url) if self.redis_url else None,
            "SIDECAR_REDIS_MODE": self.redis_mode,
            "SIDECAR_REDIS_SENTINEL_MASTER": self.redis_sentinel_master,
            "SIDECAR_REDIS_TIMEOUT_MS": round(self.redis_timeout_s * 1000),
            "SIDECAR_REDIS_MAX_CONNECTIONS": self.redis_max_connections,
            "SIDECAR_SESSION_HEADER": self.session_header,
            "SIDECAR_SESSION_KEYS": ",".join(source.label for source in self.session_keys),
            "SIDECAR_SESSION_TTL_S": self.session_ttl_s,
            "SIDECAR_SESSION_IDLE_S": self.session_idle_s,
            "SIDECAR_ROUTE_CACHE_SIZE": self.route_cache_size,
            "SIDECAR_CONNECT_TIMEOUT_S": self.connect_timeout_s,
            "SIDECAR_FIRST_BYTE_TIMEOUT_S": self.first_byte_timeout_s,
            "SIDECAR_RESPONSE_TIMEOUT_S": self.response_timeout_s,
            "SIDECAR_MAX_ATTEMPTS": self.max_attempts,
            "SIDECAR_MAX_BODY_BYTES": self.max_body_bytes,
            "SIDECAR_FALLBACK_HOLD_S": self.fallback_hold_s,
            "SIDECAR_DRAIN_TIMEOUT_S": self.drain_timeout_s,
            "SIDECAR_RETRY_BUDGET_PERCENT": self.retry_budget_percent,
            "SIDECAR_RETRY_BUDGET_MIN": self.retry_budget_min,
            "SIDECAR_BOUNDED_LOAD_FACTOR": self.bounded_load_factor,
            "SIDECAR_STREAM_IDLE_TIMEOUT_S": self.stream_idle_timeout_s,
            "SIDECAR_UPSTREAM_CA_FILE": self.upstream_ca_file,
            "SIDECAR_REDIS_CA_FILE": self.redis_ca_file,
            "SIDECAR_REQUEST_LOG": {0: "off", 10: "debug", 20: "info"}[self.request_log_level],
            "SIDECAR_LOG_FORMAT": self.log_format,
        }


def _slot_counts(table: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pool in table:
        counts[pool] = counts.get(pool, 0) + 1
    return counts


def redact_url(url: str) -> str:
    """Hide the password (and a user that may be a token) of a URL, in its userinfo or its
    query (`?password=`). Hosts are not parsed: a Sentinel URL lists several
    (`redis://:pw@h1:26379,h2:26380/0`), which no URL parser reads as one port."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = (f"{user}:<redacted>@" if colon else "<redacted>@") + hosts
    query = parts.query
    if query:
        query = "&".join(
            f"{name}=<redacted>" if name.lower() in SECRET_QUERY_NAMES else item
            for item in query.split("&")
            for name in [item.partition("=")[0]])
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


SECRET_QUERY_NAMES = frozenset({"password", "username", "token", "api_key", "apikey"})


# Each entry: variable → (default, description). docs/reference.md is checked against it.
VARIABLES: dict[str, tuple[str | None, str]] = {
    "SIDECAR_LISTEN": ("127.0.0.1:7878", "proxy listener: `host:port` or `unix:/path`"),
    "SIDECAR_ADMIN_LISTEN": ("127.0.0.1:7879", "admin listener: `host:port` or `unix:/path`"),
    "SIDECAR_ADMIN_TOKEN": (None, "bearer token for the admin endpoints beyond /health, /ready "
                            "and /metrics on a non-loopback admin listener; never printed"),
    "SIDECAR_POOLS": (None, "JSON object of pools (required unless SIDECAR_POOLS_FILE is set)"),
    "SIDECAR_POOLS_FILE": (None, "path to a JSON file of pools, re-read on SIGHUP"),
    "SIDECAR_ROUTES": (None, "JSON: per load level, selector slots per pool (each sums to 16)"),
    "SIDECAR_LOAD_LEVEL": ("low", "load level used until the scaler publishes one"),
    "SIDECAR_REDIS_URL": (None, "redis://, rediss:// or unix://; unset = embedded store"),
    "SIDECAR_REDIS_MODE": ("standalone", "standalone, cluster or sentinel"),
    "SIDECAR_REDIS_SENTINEL_MASTER": (None, "Sentinel service name (sentinel mode)"),
    "SIDECAR_REDIS_TIMEOUT_MS": ("50", "per-operation Redis budget in milliseconds"),
    "SIDECAR_REDIS_MAX_CONNECTIONS": ("32", "Redis connection pool bound"),
    "SIDECAR_SESSION_HEADER": ("x-session-id", "request header carrying the session id"),
    "SIDECAR_SESSION_KEYS": (None, "where a session key comes from, first present wins: "
                             "`header:<name>`, `harness:claude-code|codex|opencode`, "
                             "`body:prompt_cache_key`, `connection`; unset = header:"
                             "<SIDECAR_SESSION_HEADER>, every harness, the body's key, the "
                             "connection"),
    "SIDECAR_SESSION_TTL_S": ("86400", "Redis TTL of a session route, seconds"),
    "SIDECAR_SESSION_IDLE_S": ("900", "idle time before a route leaves process memory"),
    "SIDECAR_ROUTE_CACHE_SIZE": ("200000", "most session routes kept in process memory"),
    "SIDECAR_CONNECT_TIMEOUT_S": ("1", "upstream connect timeout, seconds"),
    "SIDECAR_FIRST_BYTE_TIMEOUT_S": ("60", "streamed calls: how long a pod may take to its "
                                     "first content; past it 504, never retried"),
    "SIDECAR_RESPONSE_TIMEOUT_S": ("600", "other calls: how long a pod may take to answer "
                                   "(its head comes with the whole answer); past it 504, "
                                   "never retried"),
    "SIDECAR_MAX_ATTEMPTS": ("3", "attempts per request across endpoints and fallbacks"),
    "SIDECAR_MAX_BODY_BYTES": ("33554432", "largest request body accepted"),
    "SIDECAR_FALLBACK_HOLD_S": ("300", "how long a session stays on a fallback pool"),
    "SIDECAR_DRAIN_TIMEOUT_S": ("30", "how long SIGTERM waits for in-flight requests"),
    "SIDECAR_RETRY_BUDGET_PERCENT": ("20", "retries allowed as a % of requests over 10 s"),
    "SIDECAR_RETRY_BUDGET_MIN": ("5", "retries always allowed per 10 s, however quiet"),
    "SIDECAR_BOUNDED_LOAD_FACTOR": ("1.25", "new sessions skip an endpoint above this × the "
                                    "pool's mean in-flight (0 = off)"),
    "SIDECAR_STREAM_IDLE_TIMEOUT_S": ("120", "longest silence from an upstream once its "
                                      "response has started"),
    "SIDECAR_UPSTREAM_CA_FILE": (None, "CA bundle to verify https:// endpoints with (default: "
                                 "the system's)"),
    "SIDECAR_REDIS_CA_FILE": (None, "CA bundle to verify a rediss:// server with (default: "
                              "the system's)"),
    "SIDECAR_REQUEST_LOG": ("debug", "level of the one-line-per-request log: off, debug, info"),
    "SIDECAR_LOG_FORMAT": ("json", "json (one object per line) or text"),
}
REQUEST_LOG_LEVELS = {"off": 0, "debug": 10, "info": 20}
ADMIN_TOKEN_MIN_LENGTH = 16


class _Reader:
    """Reads variables from an environment mapping, collecting problems instead of raising."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return VARIABLES[name][0]
        return value.strip()

    def problem(self, name: str, value: object, expected: str) -> None:
        self.problems.append(f"{name}={value!r}: expected {expected}")

    def number(
        self, name: str, *, integer: bool = False, minimum: float = 0, strict: bool = True
    ) -> float:
        raw = self.raw(name)
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum}" if strict else f">= {minimum}"
        try:
            value = int(raw) if integer else float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.problem(name, raw, f"{kind} {bound}")
            return float(VARIABLES[name][0] or 0)
        if value != value or (value <= minimum if strict else value < minimum):
            self.problem(name, raw, f"{kind} {bound}")
            return float(VARIABLES[name][0] or 0)
        return value

    def listen(self, name: str) -> Listen:
        raw = self.raw(name) or ""
        parsed = parse_listen(raw)
        if parsed is None:
            self.problem(name, raw, "`host:port` (port 1-65535) or `unix:/absolute/path`")
            return parse_listen(VARIABLES[name][0] or "") or Listen("127.0.0.1", 0)
        return parsed


def parse_listen(raw: str) -> Listen | None:
    if raw.startswith("unix:"):
        path = raw[5:]
        return Listen(path=path) if path.startswith("/") else None
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        return None
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return None
    if not 0 <= port <= 65535:
        return None
    return Listen(host=host, port=port)


def _parse_json(reader: _Reader, text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        reader.problems.append(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} "
                               f"column {exc.colno}); expected a JSON object of pools")
        return None


def _valid_endpoint(url: object) -> bool:
    # Printable ASCII without spaces: the URL is echoed in the x-sidecar-endpoint header,
    # and urlsplit silently drops CR/LF/tab, so they must be refused here.
    if not isinstance(url, str) or not url.isascii() or not url.isprintable() or " " in url:
        return False
    if "?" in url or "#" in url:  # (urlsplit drops an empty `?` or `#`)
        return False
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/")


def parse_pools(reader: _Reader, data: Any, source: str, env: Mapping[str, str]
                ) -> tuple[dict[str, PoolConfig], dict[str, str]]:
    """Validate the pools object; returns pools and resolved API keys (by pool name)."""
    pools: dict[str, PoolConfig] = {}
    keys: dict[str, str] = {}
    if not isinstance(data, dict) or not data:
        reader.problems.append(f"{source}: expected a non-empty JSON object of pools, "
                               'e.g. {"small": {"model": "m", "endpoints": ["http://10.0.0.5:8000"]}}')
        return pools, keys
    known = {"model", "endpoints", "fallback", "cold_start_s", "health_path",
             "health_interval_s", "api_key_env", "resume", "aliases", "metrics_path", "engine",
             "nomad_service"}
    for name, spec in data.items():
        where = f"{source}: pool {name!r}"
        if not isinstance(spec, dict):
            reader.problems.append(f"{where}: expected a JSON object")
            continue
        problems_before = len(reader.problems)
        unknown = sorted(set(spec) - known)
        if unknown:
            reader.problems.append(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        model = spec.get("model")
        if not isinstance(model, str) or not model:
            reader.problems.append(f"{where}: \"model\" must be a non-empty string, got {model!r}")
        elif not (model.isascii() and model.isprintable()):
            # Echoed in the x-sidecar-model response header.
            reader.problems.append(f"{where}: \"model\" must be printable ASCII, got {model!r}")
        endpoints = spec.get("endpoints")
        # An empty list is valid: a pool scaled to zero, or whose pods have not registered
        # with service discovery yet, simply has nothing ready (its fallback serves).
        if not isinstance(endpoints, list):
            reader.problems.append(f"{where}: \"endpoints\" must be a list of base URLs "
                                   f"like \"http://10.0.0.5:8000\", got {endpoints!r}")
            endpoints = []
        for url in endpoints:
            if isinstance(url, str) and ("?" in url or "#" in url):
                # A key in a query (?api_key=...) or fragment would be echoed with the URL
                # in x-sidecar-endpoint, error bodies and logs: refused, shown cut before it.
                base = redact_url(url[:min(i for i in (url.find("?"), url.find("#"))
                                           if i >= 0)])
                reader.problems.append(f"{where}: endpoint {base + '?...'!r} has a query or "
                                       "fragment (shown cut): an endpoint is a base URL "
                                       "like \"http://10.0.0.5:8000\", and a key goes in "
                                       "an environment variable named by \"api_key_env\"")
            elif isinstance(url, str) and "@" in urlsplit(url).netloc:
                # Never used as credentials, yet it would travel in the Host header and be
                # echoed in x-sidecar-endpoint and logs: refuse it, printed without the secret.
                reader.problems.append(f"{where}: endpoint {redact_url(url)!r} carries "
                                       "credentials (user:password@): endpoints are echoed "
                                       "in headers and logs, so name an environment "
                                       "variable holding the key in \"api_key_env\" instead")
            elif not _valid_endpoint(url):
                reader.problems.append(f"{where}: endpoint {url!r} is not a base URL "
                                       "(http:// or https://, host, optional port, no path, "
                                       "query or fragment)")
        if len(set(map(str, endpoints))) != len(endpoints):
            reader.problems.append(f"{where}: \"endpoints\" lists the same URL twice")
        fallback = spec.get("fallback")
        if fallback is not None and (not isinstance(fallback, str) or fallback not in data):
            reader.problems.append(f"{where}: \"fallback\" must name another pool "
                                   f"({sorted(data)}), got {fallback!r}")
            fallback = None
        if fallback == name:
            reader.problems.append(f"{where}: \"fallback\" names the pool itself")
            fallback = None
        numbers: dict[str, float] = {}
        for key, default in (("cold_start_s", 600.0), ("health_interval_s", 5.0)):
            value = spec.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                reader.problems.append(f"{where}: \"{key}\" must be a number > 0, got {value!r}")
                value = default
            numbers[key] = float(value)
        health_path = spec.get("health_path")
        if health_path is not None and (not isinstance(health_path, str)
                                        or not health_path.startswith("/")):
            reader.problems.append(f"{where}: \"health_path\" must be a path starting with '/', "
                                   f"got {health_path!r}")
            health_path = None
        metrics_path = spec.get("metrics_path")
        if metrics_path is not None and (not isinstance(metrics_path, str)
                                         or not metrics_path.startswith("/")
                                         or any(c in metrics_path for c in "?# ")):
            reader.problems.append(f"{where}: \"metrics_path\" must be a path starting with "
                                   f"'/' (no query), e.g. \"/metrics\", got {metrics_path!r}")
            metrics_path = None
        resume = spec.get("resume", False)
        if not isinstance(resume, bool):
            reader.problems.append(f"{where}: \"resume\" must be true or false, got {resume!r}")
            resume = False
        engine = spec.get("engine", DEFAULT_ENGINE)
        if not isinstance(engine, str) or engine not in ENGINES:
            reader.problems.append(f"{where}: \"engine\" must be one of {sorted(ENGINES)}, "
                                   f"got {engine!r}")
            engine = DEFAULT_ENGINE
        nomad_service = spec.get("nomad_service")
        if nomad_service is not None and not _nomad_service_name(nomad_service):
            reader.problems.append(f"{where}: \"nomad_service\" must be a Nomad service name "
                                   "(letters, digits and dashes, at most 63, no dash at "
                                   f"either end), e.g. \"llm-small\", got {nomad_service!r}")
            nomad_service = None
        elif nomad_service is not None and health_path is None and metrics_path is None:
            reader.problems.append(f"{where}: \"nomad_service\" needs \"health_path\" or "
                                   "\"metrics_path\": the fleet monitor, which reads the GPUs, "
                                   "publishes only the pools it probes")
        aliases = spec.get("aliases", [])
        if not isinstance(aliases, list) or not all(
                isinstance(a, str) and a and a.isascii() and a.isprintable() for a in aliases):
            reader.problems.append(f"{where}: \"aliases\" must be a list of model names "
                                   f'like ["chat"], got {aliases!r}')
            aliases = []
        key_env = spec.get("api_key_env")
        if key_env is not None:
            if not isinstance(key_env, str) or not key_env:
                reader.problems.append(f"{where}: \"api_key_env\" must name an environment "
                                       f"variable, got {key_env!r}")
                key_env = None
            elif not env.get(key_env):
                # Name the variable, never print a value.
                reader.problems.append(f"{where}: \"api_key_env\" names {key_env}, which is not "
                                       "set; set it to the API key for this pool")
            else:
                keys[name] = env[key_env]
        if len(reader.problems) == problems_before:
            pools[name] = PoolConfig(
                name=name, model=model, endpoints=tuple(u.rstrip("/") for u in endpoints),
                fallback=fallback, cold_start_s=numbers["cold_start_s"],
                health_path=health_path, health_interval_s=numbers["health_interval_s"],
                api_key_env=key_env, resume=resume, aliases=tuple(aliases),
                metrics_path=metrics_path, engine=engine, nomad_service=nomad_service,
            )
    _check_fallback_cycles(reader, data, source)
    _check_model_names(reader, data, source)
    return pools, keys


def _nomad_service_name(value: Any) -> bool:
    """Nomad's rule for a service name (RFC 1123 label: its job validation refuses others)."""
    return isinstance(value, str) and 0 < len(value) <= 63 and value.isascii() \
        and all(c.isalnum() or c == "-" for c in value) \
        and not value.startswith("-") and not value.endswith("-")


def _check_fallback_cycles(reader: _Reader, data: dict[str, Any], source: str) -> None:
    for start in data:
        seen = [start]
        current = data[start].get("fallback") if isinstance(data[start], dict) else None
        while isinstance(current, str) and current in data and current != start:
            if current in seen:
                break
            seen.append(current)
            spec = data[current]
            current = spec.get("fallback") if isinstance(spec, dict) else None
        if current == start and len(seen) > 1:
            chain = " → ".join([*seen, start])
            reader.problems.append(f"{source}: fallback chain loops ({chain}); "
                                   "a chain must end in a pool without a fallback")
            return


def _check_model_names(reader: _Reader, data: dict[str, Any], source: str) -> None:
    """A name a request may send must mean one pool: an alias cannot repeat another pool's
    model or alias, and `auto` is kept for "let the routing table choose"."""
    owner: dict[str, str] = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            continue
        model = spec.get("model")
        if model == ROUTING_ALIAS:
            reader.problems.append(f"{source}: pool {name!r}: \"model\" may not be "
                                   f"{ROUTING_ALIAS!r}, which lets the routing table choose")
        if isinstance(model, str):
            owner.setdefault(model, name)
    for name, spec in data.items():
        aliases = spec.get("aliases") if isinstance(spec, dict) else None
        if not isinstance(aliases, list):
            continue
        for alias in aliases:
            if not isinstance(alias, str):
                continue
            if alias == ROUTING_ALIAS:
                reader.problems.append(f"{source}: pool {name!r}: alias {alias!r} is reserved "
                                       "(it lets the routing table choose the pool)")
            elif owner.get(alias, name) != name:
                reader.problems.append(f"{source}: pool {name!r}: alias {alias!r} already "
                                       f"names pool {owner[alias]!r}; a name must mean one pool")
            else:
                owner[alias] = name


def parse_routes(reader: _Reader, raw: str | None, pool_names: list[str]
                 ) -> dict[str, tuple[str, ...]]:
    """Expand `{"low": {"small": 12, "large": 4}, …}` into 16-slot tables per level."""
    name = "SIDECAR_ROUTES"
    if raw is None:
        first = pool_names[0] if pool_names else ""
        return {level: (first,) * SELECTOR_SLOTS for level in LOAD_LEVELS}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        reader.problem(name, raw, f"JSON ({exc.msg}), e.g. "
                       '{"low":{"small":16},"medium":{"small":12,"large":4},'
                       '"high":{"small":8,"large":8}}')
        return parse_routes(reader, None, pool_names)
    tables: dict[str, tuple[str, ...]] = {}
    if not isinstance(data, dict):
        reader.problem(name, raw, "a JSON object with keys low, medium, high")
        return parse_routes(reader, None, pool_names)
    unknown = sorted(set(data) - set(LOAD_LEVELS))
    if unknown:
        reader.problems.append(f"{name}: unknown load level(s) {unknown}; "
                               f"expected {list(LOAD_LEVELS)}")
    for level in LOAD_LEVELS:
        slots = data.get(level)
        if slots is None:
            reader.problems.append(f"{name}: level {level!r} is missing; every level "
                                   f"({', '.join(LOAD_LEVELS)}) needs slot counts summing to 16")
            continue
        if not isinstance(slots, dict):
            reader.problems.append(f"{name}: level {level!r} must map pool → slot count, "
                                   f"got {slots!r}")
            continue
        table: list[str] = []
        ok = True
        for pool, count in slots.items():
            if pool not in pool_names:
                reader.problems.append(f"{name}: level {level!r} names pool {pool!r}, which is "
                                       f"not configured (pools: {pool_names})")
                ok = False
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                reader.problems.append(f"{name}: level {level!r} pool {pool!r}: slot count must "
                                       f"be an integer >= 0, got {count!r}")
                ok = False
                continue
            table.extend([pool] * count)
        if ok and len(table) != SELECTOR_SLOTS:
            reader.problems.append(f"{name}: level {level!r} gives out {len(table)} slots; "
                                   f"the counts must sum to exactly {SELECTOR_SLOTS}")
            ok = False
        if ok:
            tables[level] = tuple(table)
    return tables


def load_pools_source(reader: _Reader, env: Mapping[str, str]
                      ) -> tuple[Any, str, str | None]:
    """Return (pools JSON data, source label for messages, pools file path)."""
    inline = env.get("SIDECAR_POOLS", "").strip()
    path = env.get("SIDECAR_POOLS_FILE", "").strip() or None
    if inline and path:
        reader.problems.append("SIDECAR_POOLS and SIDECAR_POOLS_FILE are both set; "
                               "expected exactly one of them")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            reader.problems.append(f"SIDECAR_POOLS_FILE={path!r}: cannot be read "
                                   f"({exc.strerror}); expected a readable JSON file of pools")
            return None, "SIDECAR_POOLS_FILE", path
        source = f"SIDECAR_POOLS_FILE={path!r}"
        return _parse_json(reader, text, source), source, path
    if inline:
        return _parse_json(reader, inline, "SIDECAR_POOLS"), "SIDECAR_POOLS", None
    reader.problems.append("SIDECAR_POOLS is not set: expected a JSON object of pools (or "
                           "SIDECAR_POOLS_FILE naming a JSON file), e.g. "
                           '{"small": {"model": "llama-3.1-8b-instruct", '
                           '"endpoints": ["http://10.0.0.5:8000"]}}')
    return None, "SIDECAR_POOLS", None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every variable; raise ConfigError naming every problem."""
    env = os.environ if env is None else env
    r = _Reader(env)
    listen = r.listen("SIDECAR_LISTEN")
    admin_listen = r.listen("SIDECAR_ADMIN_LISTEN")
    if listen == admin_listen and listen.port != 0:
        r.problems.append(f"SIDECAR_ADMIN_LISTEN={admin_listen}: must differ from SIDECAR_LISTEN")
    data, source, pools_file = load_pools_source(r, env)
    pools, keys = parse_pools(r, data, source, env) if data is not None else ({}, {})
    pool_names = list(data) if isinstance(data, dict) else []
    routes = parse_routes(r, r.raw("SIDECAR_ROUTES"), pool_names)

    load_level = r.raw("SIDECAR_LOAD_LEVEL") or "low"
    if load_level not in LOAD_LEVELS:
        r.problem("SIDECAR_LOAD_LEVEL", load_level, f"one of {', '.join(LOAD_LEVELS)}")
        load_level = "low"

    redis_url = r.raw("SIDECAR_REDIS_URL")
    if redis_url is not None:
        scheme = urlsplit(redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            r.problems.append(f"SIDECAR_REDIS_URL={redact_url(redis_url)!r}: expected a "
                              "redis://, rediss:// or unix:// URL")
    redis_mode = r.raw("SIDECAR_REDIS_MODE") or "standalone"
    if redis_mode not in REDIS_MODES:
        r.problem("SIDECAR_REDIS_MODE", redis_mode, f"one of {', '.join(REDIS_MODES)}")
        redis_mode = "standalone"
    sentinel_master = r.raw("SIDECAR_REDIS_SENTINEL_MASTER")
    if redis_mode == "sentinel" and not sentinel_master:
        r.problems.append("SIDECAR_REDIS_SENTINEL_MASTER is not set: expected the Sentinel "
                          "service name (e.g. mymaster) when SIDECAR_REDIS_MODE=sentinel")
    if redis_mode != "standalone" and redis_url is None:
        r.problems.append(f"SIDECAR_REDIS_URL is not set: expected a redis:// URL when "
                          f"SIDECAR_REDIS_MODE={redis_mode}")

    session_header = (r.raw("SIDECAR_SESSION_HEADER") or "").lower()
    if not session_header or any(c in session_header for c in " :\r\n\t"):
        r.problem("SIDECAR_SESSION_HEADER", session_header, "an HTTP header name")
    session_keys = default_sources(session_header or "x-session-id")
    keys_text = r.raw("SIDECAR_SESSION_KEYS")
    if keys_text is not None:
        parsed, wrong = parse_sources(keys_text)
        if wrong is not None:
            r.problems.append(f"SIDECAR_SESSION_KEYS={keys_text!r}: {wrong}; expected "
                              f"{EXPECTED_FORM}, e.g. header:x-session-id,harness:claude-code,"
                              "body:prompt_cache_key,connection")
        else:
            session_keys = parsed

    load_factor = r.number("SIDECAR_BOUNDED_LOAD_FACTOR", strict=False)
    if 0 < load_factor < 1:
        r.problem("SIDECAR_BOUNDED_LOAD_FACTOR", r.raw("SIDECAR_BOUNDED_LOAD_FACTOR"),
                  "0 (off) or a number >= 1 (1.25 lets a pod take 25 % above the mean)")

    request_log = (r.raw("SIDECAR_REQUEST_LOG") or "debug").lower()
    if request_log not in REQUEST_LOG_LEVELS:
        r.problem("SIDECAR_REQUEST_LOG", request_log, "off, debug or info")
        request_log = "debug"
    log_format = (r.raw("SIDECAR_LOG_FORMAT") or "json").lower()
    if log_format not in ("json", "text"):
        r.problem("SIDECAR_LOG_FORMAT", log_format, "json or text")
        log_format = "json"

    ca_file = r.raw("SIDECAR_UPSTREAM_CA_FILE")
    if ca_file is not None and not os.path.isfile(ca_file):
        r.problem("SIDECAR_UPSTREAM_CA_FILE", ca_file, "a readable PEM file of CA certificates")
    redis_ca_file = r.raw("SIDECAR_REDIS_CA_FILE")
    if redis_ca_file is not None and not os.path.isfile(redis_ca_file):
        r.problem("SIDECAR_REDIS_CA_FILE", redis_ca_file,
                  "a readable PEM file of CA certificates")
    elif redis_ca_file is not None and not (redis_url or "").startswith("rediss://"):
        r.problems.append("SIDECAR_REDIS_CA_FILE is set but SIDECAR_REDIS_URL is not a "
                          "rediss:// URL: expected rediss://host:port when Redis speaks TLS")

    admin_token = r.raw("SIDECAR_ADMIN_TOKEN")
    if admin_token is not None and (len(admin_token) < ADMIN_TOKEN_MIN_LENGTH
                                    or not admin_token.isascii()
                                    or not admin_token.isprintable() or " " in admin_token):
        # The value is a secret: say what is wrong with it, never echo it.
        r.problems.append(f"SIDECAR_ADMIN_TOKEN is set but is not a usable token: expected at "
                          f"least {ADMIN_TOKEN_MIN_LENGTH} printable ASCII characters without "
                          "spaces, e.g. the output of `openssl rand -hex 32`")

    settings = Settings(
        listen=listen,
        admin_listen=admin_listen,
        pools=pools,
        routes=routes,
        load_level=load_level,
        redis_url=redis_url,
        redis_mode=redis_mode,
        redis_sentinel_master=sentinel_master,
        redis_timeout_s=r.number("SIDECAR_REDIS_TIMEOUT_MS") / 1000.0,
        redis_max_connections=int(r.number("SIDECAR_REDIS_MAX_CONNECTIONS", integer=True)),
        session_header=session_header,
        session_ttl_s=int(r.number("SIDECAR_SESSION_TTL_S", integer=True)),
        session_idle_s=r.number("SIDECAR_SESSION_IDLE_S"),
        route_cache_size=int(r.number("SIDECAR_ROUTE_CACHE_SIZE", integer=True)),
        connect_timeout_s=r.number("SIDECAR_CONNECT_TIMEOUT_S"),
        first_byte_timeout_s=r.number("SIDECAR_FIRST_BYTE_TIMEOUT_S"),
        max_attempts=int(r.number("SIDECAR_MAX_ATTEMPTS", integer=True)),
        max_body_bytes=int(r.number("SIDECAR_MAX_BODY_BYTES", integer=True)),
        fallback_hold_s=r.number("SIDECAR_FALLBACK_HOLD_S", strict=False),
        drain_timeout_s=r.number("SIDECAR_DRAIN_TIMEOUT_S", strict=False),
        retry_budget_percent=r.number("SIDECAR_RETRY_BUDGET_PERCENT", strict=False),
        retry_budget_min=int(r.number("SIDECAR_RETRY_BUDGET_MIN", integer=True, strict=False)),
        bounded_load_factor=load_factor,
        stream_idle_timeout_s=r.number("SIDECAR_STREAM_IDLE_TIMEOUT_S"),
        response_timeout_s=r.number("SIDECAR_RESPONSE_TIMEOUT_S"),
        upstream_ca_file=ca_file,
        redis_ca_file=redis_ca_file,
        request_log_level=REQUEST_LOG_LEVELS[request_log],
        log_format=log_format,
        pools_file=pools_file,
        api_keys=keys,
        admin_token=admin_token,
        session_keys=session_keys,
    )
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def reload_pools(settings: Settings, env: Mapping[str, str] | None = None) -> Settings:
    """Re-read the pools file (SIGHUP). The running routes table must still name only
    configured pools; `env` supplies the variables that `api_key_env` names."""
    env = os.environ if env is None else env
    r = _Reader(env)
    data, source, _ = load_pools_source(
        r, {**env, "SIDECAR_POOLS": "", "SIDECAR_POOLS_FILE": settings.pools_file or ""})
    pools, keys = parse_pools(r, data, source, env) if data is not None else ({}, {})
    if not r.problems:
        for level, table in settings.routes.items():
            for name in sorted(set(table) - set(pools)):
                r.problems.append(f"{source}: pool {name!r} is gone but SIDECAR_ROUTES level "
                                  f"{level!r} still gives it slots; keep the pool (it may "
                                  "list no endpoints) or change SIDECAR_ROUTES")
    if r.problems:
        raise ConfigError(r.problems)
    return replace(settings, pools=pools, api_keys=keys)
