"""Environment → frozen, validated settings: each variable declared once, as a field of
`Settings` (settings_schema.py reads, redacts and documents them from that declaration).

Every problem found is collected (not just the first) and each message names the variable,
the bad value and what is expected, so one `llm-sidecar check` run shows everything to fix.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from sidecar.fleet.podload import DEFAULT_ENGINE, ENGINES
from sidecar.routing.sessionkeys import EXPECTED_FORM, Source, default_sources, parse_sources
from sidecar.settings_schema import (
    REDACTED,
    REDIS_CA_FILE,
    REDIS_MODE,
    REDIS_SENTINEL_MASTER,
    REDIS_URL,
    Invalid,
    Reader,
    ca_file,
    declared,
    number,
    one_of,
    redact_url,
    redacted,
    redis_problems,
    setting,
)

LOAD_LEVELS = ("low", "medium", "high")
SELECTOR_SLOTS = 16
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


# ---- parsers of single variables (each raises Invalid with the form it expects)

def _listen(text: str) -> Listen:
    parsed = parse_listen(text)
    if parsed is None:
        raise Invalid("`host:port` (port 1-65535) or `unix:/absolute/path`")
    return parsed


def _milliseconds(text: str) -> float:
    return number()(text) / 1000.0


def _header_name(text: str) -> str:
    if not text or any(c in text for c in " :\r\n\t"):
        raise Invalid("an HTTP header name")
    return text


def _session_keys(text: str) -> tuple[Source, ...]:
    parsed, wrong = parse_sources(text)
    if wrong is not None:
        raise Invalid(f"{EXPECTED_FORM}, e.g. header:x-session-id,harness:claude-code,"
                      "body:prompt_cache_key,connection", wrong=wrong)
    return parsed


def _load_factor(text: str) -> float:
    value = number(strict=False)(text)
    if 0 < value < 1:
        raise Invalid("0 (off) or a number >= 1 (1.25 lets a pod take 25 % above the mean)")
    return value


REQUEST_LOG_LEVELS = {"off": 0, "debug": 10, "info": 20}


def _request_log(text: str) -> int:
    return REQUEST_LOG_LEVELS[one_of(*REQUEST_LOG_LEVELS, expected="off, debug or info")(text)]


ADMIN_TOKEN_MIN_LENGTH = 16


def _admin_token(text: str) -> str:
    if len(text) < ADMIN_TOKEN_MIN_LENGTH or not text.isascii() or not text.isprintable() \
            or " " in text:
        raise Invalid(f"at least {ADMIN_TOKEN_MIN_LENGTH} printable ASCII characters without "
                      "spaces, e.g. the output of `openssl rand -hex 32`",
                      wrong="is not a usable token")
    return text


def _pools_view(pools: Mapping[str, PoolConfig]) -> dict[str, Any]:
    # A pool with `api_key_env` has its key: loading refuses one whose variable is unset.
    return {name: {"model": p.model, "endpoints": list(p.endpoints), "fallback": p.fallback,
                   "cold_start_s": p.cold_start_s, "health_path": p.health_path,
                   "health_interval_s": p.health_interval_s, "api_key_env": p.api_key_env,
                   "api_key": REDACTED if p.api_key_env is not None else None,
                   "resume": p.resume, "metrics_path": p.metrics_path,
                   "aliases": list(p.aliases), "engine": p.engine,
                   "nomad_service": p.nomad_service}
            for name, p in pools.items()}


def _slot_counts(tables: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    return {level: dict(Counter(table)) for level, table in tables.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The sidecar's settings. Each field declares its variable once: the loader, `redacted`
    and the reference table in docs/reference.md (checked by a test) all read these."""

    listen: Listen = setting(
        "SIDECAR_LISTEN", "127.0.0.1:7878", "proxy listener: `host:port` or `unix:/path`",
        parse=_listen, show=str)
    admin_listen: Listen = setting(
        "SIDECAR_ADMIN_LISTEN", "127.0.0.1:7879", "admin listener: `host:port` or `unix:/path`",
        parse=_listen, show=str)
    # Bearer token for the admin endpoints beyond health/ready/metrics; never printed.
    admin_token: str | None = setting(
        "SIDECAR_ADMIN_TOKEN", None,
        "bearer token for every admin endpoint but `/health`, `/ready` and `/metrics` when the "
        "admin listener is not loopback-only (see [Security](operations.md#security)); at least "
        "16 printable characters; never printed",
        parse=_admin_token, secret=True, init_default=None)
    pools: Mapping[str, PoolConfig] = setting(
        "SIDECAR_POOLS", None,
        "JSON object of pools (below); required unless `SIDECAR_POOLS_FILE` is set",
        show=_pools_view)
    pools_file: str | None = setting(
        "SIDECAR_POOLS_FILE", None,
        "path to a JSON file of pools; re-read on SIGHUP without dropping connections",
        init_default=None)
    # level → 16 pool names, index = selector
    routes: Mapping[str, tuple[str, ...]] = setting(
        "SIDECAR_ROUTES", None,
        "per load level, selector slots per pool, e.g. "
        '`{"low":{"small":16},"medium":{"small":12,"large":4},"high":{"small":8,"large":8}}`; '
        "each level sums to 16; slots are given out in the order listed",
        show=_slot_counts, unset="all 16 slots to the first pool")
    load_level: str = setting(
        "SIDECAR_LOAD_LEVEL", "low",
        "level used for new sessions until the scaler publishes one", parse=one_of(*LOAD_LEVELS))
    redis_url: str | None = REDIS_URL.field()
    redis_mode: str = REDIS_MODE.field()
    redis_sentinel_master: str | None = REDIS_SENTINEL_MASTER.field()
    redis_timeout_s: float = setting(
        "SIDECAR_REDIS_TIMEOUT_MS", "50",
        "per-operation budget; past it the call is routed without Redis",
        parse=_milliseconds, show=lambda seconds: round(seconds * 1000))
    redis_max_connections: int = setting(
        "SIDECAR_REDIS_MAX_CONNECTIONS", "32",
        "Redis connection pool bound (callers wait for a free connection within the budget)",
        parse=number(integer=True))
    redis_ca_file: str | None = REDIS_CA_FILE.field(default=None)
    session_header: str = setting(
        "SIDECAR_SESSION_HEADER", "x-session-id", "request header carrying the session id",
        parse=_header_name, normalize=str.lower)
    # Where a request's session key comes from, first present wins (sessionkeys.py).
    session_keys: tuple[Source, ...] = setting(
        "SIDECAR_SESSION_KEYS", None,
        "where a session key comes from, first present wins (*Sessions as agents make them*): "
        "a comma-separated list of `header:<name>`, `harness:claude-code`, `harness:codex`, "
        "`harness:opencode`, `body:prompt_cache_key` and `connection` (last, if given; a "
        "request with none of the others is always its connection's session)",
        parse=_session_keys, show=lambda keys: ",".join(source.label for source in keys),
        unset="unset: `header:<SIDECAR_SESSION_HEADER>,harness:claude-code,harness:codex,"
              "harness:opencode,body:prompt_cache_key,connection`", init_default=())
    session_ttl_s: int = setting(
        "SIDECAR_SESSION_TTL_S", "86400",
        "Redis TTL of a route; refreshed at most once per 10 % of it per pod",
        parse=number(integer=True))
    session_idle_s: float = setting(
        "SIDECAR_SESSION_IDLE_S", "900", "how long an idle route stays in process memory",
        parse=number())
    route_cache_size: int = setting(
        "SIDECAR_ROUTE_CACHE_SIZE", "200000",
        "most routes kept in process memory (least recently used leave first; a route with "
        "calls in flight stays)",
        parse=number(integer=True))
    connect_timeout_s: float = setting(
        "SIDECAR_CONNECT_TIMEOUT_S", "1", "upstream TCP connect timeout", parse=number())
    first_byte_timeout_s: float = setting(
        "SIDECAR_FIRST_BYTE_TIMEOUT_S", "60",
        'streamed calls (a top-level `"stream": true`): how long a pod may take to its first '
        "content (the head and role frame are held back until then, so a pod that breaks "
        "before it is still replaced); past it 504 `upstream_timeout`, the connection closed, "
        "no retry", parse=number())
    response_timeout_s: float = setting(
        "SIDECAR_RESPONSE_TIMEOUT_S", "600",
        "every other call: how long a pod may take to answer. A model server sends a "
        "non-streamed answer's head only when the whole answer is ready, so this bounds the "
        "longest generation (the OpenAI SDK waits 600 s too); past it 504 `upstream_timeout`, "
        "the connection closed, no retry", parse=number(), init_default=600.0)
    stream_idle_timeout_s: float = setting(
        "SIDECAR_STREAM_IDLE_TIMEOUT_S", "120",
        "longest silence from an upstream once its response has started; past it the stream "
        "ends as broken (resumed, or a visible error) instead of holding the app",
        parse=number(), init_default=120.0)
    upstream_ca_file: str | None = setting(
        "SIDECAR_UPSTREAM_CA_FILE", None,
        "PEM bundle to verify `https://` endpoints with (certificates are always verified)",
        parse=ca_file, unset="system CAs", init_default=None)
    max_attempts: int = setting(
        "SIDECAR_MAX_ATTEMPTS", "3", "attempts per request across endpoints and fallback pools",
        parse=number(integer=True))
    max_body_bytes: int = setting(
        "SIDECAR_MAX_BODY_BYTES", "33554432", "largest request body (413 above it)",
        parse=number(integer=True))
    fallback_hold_s: float = setting(
        "SIDECAR_FALLBACK_HOLD_S", "300",
        "how long a session stays on a fallback pool before trying its primary again",
        parse=number(strict=False))
    drain_timeout_s: float = setting(
        "SIDECAR_DRAIN_TIMEOUT_S", "30",
        "on SIGTERM, how long in-flight requests may take to finish", parse=number(strict=False))
    retry_budget_percent: float = setting(
        "SIDECAR_RETRY_BUDGET_PERCENT", "20",
        "retries after overload signals (429/503, connect timeouts) allowed as a percentage of "
        "requests over the last 10 s; past it the app gets 503 `retry_budget_exhausted`. "
        "Retries away from a pod that is gone (refused, reset, stream cut off) are not "
        "budgeted: that pod is ejected at once and its work moves, bounded by "
        "`SIDECAR_MAX_ATTEMPTS`", parse=number(strict=False))
    retry_budget_min: int = setting(
        "SIDECAR_RETRY_BUDGET_MIN", "5",
        "retries always allowed per 10 s, so a quiet app still retries its occasional failure",
        parse=number(integer=True, strict=False))
    request_log_level: int = setting(
        "SIDECAR_REQUEST_LOG", "debug",
        "level of the one-line-per-request log (`off`, `debug`, `info`); its fields: method, "
        "path, status, session, session_source (where the key came from), parent (when "
        "named), session_ended (after `x-session-final`), pool, endpoint, attempts, fallback, "
        "duration and overhead — never bodies or credentials",
        parse=_request_log, normalize=str.lower, init_default=10,
        show={level: name for name, level in REQUEST_LOG_LEVELS.items()}.get)
    log_format: str = setting(
        "SIDECAR_LOG_FORMAT", "json", "`json` (one object per line, for log shippers) or `text`",
        parse=one_of("json", "text", expected="json or text"), normalize=str.lower,
        init_default="json")
    bounded_load_factor: float = setting(
        "SIDECAR_BOUNDED_LOAD_FACTOR", "1.25",
        "a new session skips its rendezvous endpoint when that endpoint's load (the pod's own "
        "running + waiting when known, else in-flight counts) would exceed this × the pool's "
        "mean (consistent hashing with bounded loads, over its first three choices); `0` "
        "turns the bound off (saturated pods are still skipped)", parse=_load_factor)
    # Secrets resolved from the pools' `api_key_env`, never printed.
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)

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
        return redacted(self)


SETTINGS = declared(Settings)
# variable → (default, doc): the declarations in the shape older readers know.
VARIABLES: dict[str, tuple[str | None, str]] = {
    name: (s.default, s.doc) for name, s in SETTINGS.items()}


def _parse_json(reader: Reader, text: str, source: str) -> Any:
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


def parse_pools(reader: Reader, data: Any, source: str, env: Mapping[str, str]
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


def _check_fallback_cycles(reader: Reader, data: dict[str, Any], source: str) -> None:
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


def _check_model_names(reader: Reader, data: dict[str, Any], source: str) -> None:
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


def parse_routes(reader: Reader, raw: str | None, pool_names: list[str]
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


def load_pools_source(reader: Reader, env: Mapping[str, str]
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
    r = Reader(env, SETTINGS)
    values = r.fields_of(Settings)
    data, source, pools_file = load_pools_source(r, env)
    pools, keys = parse_pools(r, data, source, env) if data is not None else ({}, {})
    pool_names = list(data) if isinstance(data, dict) else []
    routes = parse_routes(r, r.raw("SIDECAR_ROUTES"), pool_names)
    if values["session_keys"] is None:
        values["session_keys"] = default_sources(values["session_header"])
    _check_together(r, values)
    settings = Settings(**values, pools=pools, pools_file=pools_file, routes=routes,
                        api_keys=keys)
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def _check_together(r: Reader, values: Mapping[str, Any]) -> None:
    """The rules between variables, each valid on its own."""
    listen, admin_listen = values["listen"], values["admin_listen"]
    if listen == admin_listen and listen.port != 0:
        r.problems.append(f"SIDECAR_ADMIN_LISTEN={admin_listen}: must differ from SIDECAR_LISTEN")
    r.problems += redis_problems(values)
    if values["redis_mode"] != "standalone" and r.raw("SIDECAR_REDIS_URL") is None:
        r.problems.append(f"SIDECAR_REDIS_URL is not set: expected a redis:// URL when "
                          f"SIDECAR_REDIS_MODE={values['redis_mode']}")


def reload_pools(settings: Settings, env: Mapping[str, str] | None = None) -> Settings:
    """Re-read the pools file (SIGHUP). The running routes table must still name only
    configured pools; `env` supplies the variables that `api_key_env` names."""
    env = os.environ if env is None else env
    r = Reader(env, SETTINGS)
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
