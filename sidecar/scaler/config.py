"""Scaler settings from the environment (same rules as the sidecar's: every problem is
named with its variable, the bad value and the expected form)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import REDIS_MODES, ConfigError, Listen, parse_listen, redact_url

SCALER_VARIABLES: dict[str, tuple[str | None, str]] = {
    "SIDECAR_REDIS_URL": (None, "Redis shared with the sidecars (required)"),
    "SIDECAR_REDIS_MODE": ("standalone", "standalone, cluster or sentinel"),
    "SIDECAR_REDIS_SENTINEL_MASTER": (None, "Sentinel service name (sentinel mode)"),
    "SIDECAR_REDIS_CA_FILE": (None, "CA bundle to verify a rediss:// server with"),
    "SIDECAR_SCALER_POOLS": (None, "JSON: per pool job, group, min, max, "
                             "replica_tokens_per_s, cold_start_s (and health_interval_s: "
                             "the pool's, for the monitor's view; 5)"),
    "SIDECAR_SCALER_INTERVAL_S": ("15", "seconds between decisions"),
    "SIDECAR_SCALER_DRY_RUN": ("0", "1 = only log decisions"),
    "SIDECAR_SCALER_BURST_QUANTILE": ("0.995", "quantile of past bursts held above the level "
                                      "(0 < q <= 1)"),
    "SIDECAR_SCALER_HEADROOM": ("0", "share added on top of the forecast"),
    "SIDECAR_SCALER_PRIOR_CV": ("0", "mean burst above the level assumed before history, "
                                "as a share of the level (>= 0; 0 = off: the learned "
                                "quantile alone)"),
    "SIDECAR_SCALER_PRIOR_SAMPLES": ("12", "intervals of history the prior counts as (> 0)"),
    "SIDECAR_SCALER_PRIOR_FLOOR": ("9", "replicas a young pool asks for at least until its "
                                   "history spans half a cold start, shrinking to 0 at a "
                                   "whole one (>= 0; 0 = off)"),
    "SIDECAR_SCALER_METRICS_LISTEN": ("127.0.0.1:7880", "GET /metrics (the forecast for "
                                      "Prometheus): `host:port`, or `off`"),
    "SIDECAR_SCALER_COOLDOWN_S": ("300", "least time between scale-downs of a pool"),
    "NOMAD_ADDR": ("http://127.0.0.1:4646", "Nomad's HTTP API"),
    "NOMAD_TOKEN": (None, "ACL token (scale-job and read-job-scaling capabilities)"),
    "NOMAD_NAMESPACE": (None, "namespace of the pool jobs"),
    "NOMAD_REGION": (None, "region to forward requests to"),
    "NOMAD_CACERT": (None, "CA certificate file for Nomad's TLS"),
    "NOMAD_CLIENT_CERT": (None, "client certificate file (mutual TLS)"),
    "NOMAD_CLIENT_KEY": (None, "client key file (mutual TLS)"),
    "NOMAD_SKIP_VERIFY": (None, "1/true: do not verify Nomad's certificate"),
}


@dataclass(frozen=True, slots=True)
class NomadAccess:
    """How to reach Nomad's HTTP API (the NOMAD_* variables, as Nomad's own CLI reads them):
    what the fleet monitor needs to read GPU statistics, without the scaler's settings."""

    nomad_addr: str
    nomad_token: str | None = field(default=None, repr=False)
    nomad_namespace: str | None = None
    nomad_region: str | None = None
    nomad_cacert: str | None = None
    nomad_client_cert: str | None = None
    nomad_client_key: str | None = None
    nomad_skip_verify: bool = False

    def query(self) -> dict[str, str]:
        """The query parameters every request to Nomad carries."""
        params = {}
        if self.nomad_namespace:
            params["namespace"] = self.nomad_namespace
        if self.nomad_region:
            params["region"] = self.nomad_region
        return params

    def headers(self) -> dict[str, str]:
        return {"X-Nomad-Token": self.nomad_token} if self.nomad_token else {}

    def redacted(self) -> dict[str, Any]:
        return {"NOMAD_ADDR": redact_url(self.nomad_addr),
                "NOMAD_TOKEN": "<redacted>" if self.nomad_token else None,
                "NOMAD_NAMESPACE": self.nomad_namespace, "NOMAD_REGION": self.nomad_region}


def load_nomad_access(env: Mapping[str, str] | None = None) -> NomadAccess:
    """The NOMAD_* variables alone (the fleet monitor reads them too); raises ConfigError."""
    access, problems = _read_nomad(os.environ if env is None else env)
    if problems:
        raise ConfigError(problems)
    return access


def _read_nomad(env: Mapping[str, str]) -> tuple[NomadAccess, list[str]]:
    """The NOMAD_* variables, as the scaler and the fleet monitor read them, and what is
    wrong with them."""
    def get(name: str) -> str | None:
        return env.get(name, "").strip() or SCALER_VARIABLES[name][0]

    access = NomadAccess(
        nomad_addr=(get("NOMAD_ADDR") or "").rstrip("/"), nomad_token=get("NOMAD_TOKEN"),
        nomad_namespace=get("NOMAD_NAMESPACE"), nomad_region=get("NOMAD_REGION"),
        nomad_cacert=get("NOMAD_CACERT"), nomad_client_cert=get("NOMAD_CLIENT_CERT"),
        nomad_client_key=get("NOMAD_CLIENT_KEY"),
        nomad_skip_verify=_flag(get("NOMAD_SKIP_VERIFY")))
    if not access.nomad_addr.startswith(("http://", "https://")):
        return access, [f"NOMAD_ADDR={access.nomad_addr!r}: expected an http:// or https:// "
                        "URL"]
    return access, []


@dataclass(frozen=True, slots=True)
class ScaledPool:
    name: str
    job: str
    group: str
    minimum: int
    maximum: int
    replica_tokens_per_s: float
    cold_start_s: float
    # The pool's health interval (SIDECAR_POOLS'): the monitor writes its view that often,
    # and a view older than podview.STALE_INTERVALS of them is stale.
    health_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ScalerSettings:
    redis_url: str
    redis_mode: str
    redis_sentinel_master: str | None
    redis_ca_file: str | None
    pools: Mapping[str, ScaledPool]
    interval_s: float
    dry_run: bool
    burst_quantile: float
    headroom: float
    prior_cv: float
    prior_samples: float
    prior_floor: float
    metrics_listen: Listen | None
    cooldown_s: float
    nomad: NomadAccess

    def redacted(self) -> dict[str, Any]:
        return {"SIDECAR_REDIS_URL": redact_url(self.redis_url),
                "SIDECAR_SCALER_POOLS": {n: vars_of(p) for n, p in self.pools.items()},
                "SIDECAR_SCALER_INTERVAL_S": self.interval_s,
                "SIDECAR_SCALER_DRY_RUN": self.dry_run,
                "SIDECAR_SCALER_BURST_QUANTILE": self.burst_quantile,
                "SIDECAR_SCALER_HEADROOM": self.headroom,
                "SIDECAR_SCALER_PRIOR_CV": self.prior_cv,
                "SIDECAR_SCALER_PRIOR_SAMPLES": self.prior_samples,
                "SIDECAR_SCALER_PRIOR_FLOOR": self.prior_floor,
                "SIDECAR_SCALER_METRICS_LISTEN": (str(self.metrics_listen)
                                                  if self.metrics_listen else "off"),
                "NOMAD_ADDR": self.nomad.nomad_addr,
                "NOMAD_TOKEN": "<redacted>" if self.nomad.nomad_token else None,
                "NOMAD_NAMESPACE": self.nomad.nomad_namespace}


def scaler_warnings(settings: ScalerSettings) -> list[str]:
    """Settings that are valid but will not do what an operator most likely wants."""
    warnings = []
    nomad = settings.nomad
    if not settings.dry_run and not nomad.nomad_token:
        warnings.append("NOMAD_TOKEN is not set and SIDECAR_SCALER_DRY_RUN is off: a Nomad "
                        "with ACLs enabled refuses every scale request; set NOMAD_TOKEN to a "
                        "token with the scale-job and read-job-scaling capabilities")
    if nomad.nomad_addr.startswith("https://") and not nomad.nomad_cacert \
            and not nomad.nomad_skip_verify:
        warnings.append(f"NOMAD_ADDR={nomad.nomad_addr!r} is https:// but NOMAD_CACERT is "
                        "not set: Nomad's certificate must then be signed by a system CA; set "
                        "NOMAD_CACERT to the CA file of a private Nomad PKI")
    return warnings


def vars_of(pool: ScaledPool) -> dict[str, Any]:
    return {f: getattr(pool, f) for f in pool.__dataclass_fields__}


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def load_prior(env: Mapping[str, str] | None = None) -> tuple[float, float, float]:
    """SIDECAR_SCALER_PRIOR_CV, _SAMPLES and _FLOOR alone (the simulator reads them too, so
    what it replays is what the scaler would run)."""
    env = os.environ if env is None else env
    values, problems = [], []
    for name, strict in (("SIDECAR_SCALER_PRIOR_CV", False),
                         ("SIDECAR_SCALER_PRIOR_SAMPLES", True),
                         ("SIDECAR_SCALER_PRIOR_FLOOR", False)):
        raw = env.get(name, "").strip() or SCALER_VARIABLES[name][0] or ""
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not (value > 0 if strict else value >= 0) or value == float("inf"):
            problems.append(f"{name}={raw!r}: expected a finite number "
                            f"{'>' if strict else '>='} 0")
        values.append(value)
    if problems:
        raise ConfigError(problems)
    return values[0], values[1], values[2]


def load_scaler_settings(env: Mapping[str, str] | None = None) -> ScalerSettings:
    env = os.environ if env is None else env
    problems: list[str] = []

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or SCALER_VARIABLES[name][0]

    def number(name: str, minimum: float, strict: bool = True) -> float:
        raw = get(name)
        try:
            value = float(raw or "")
        except ValueError:
            value = float("nan")
        if value != value or (value <= minimum if strict else value < minimum):
            problems.append(f"{name}={raw!r}: expected a number {'>' if strict else '>='} "
                            f"{minimum:g}")
            return float(SCALER_VARIABLES[name][0] or 1)
        return value

    redis_url = get("SIDECAR_REDIS_URL")
    if not redis_url:
        problems.append("SIDECAR_REDIS_URL is not set: the scaler reads the sidecars' "
                        "traffic from Redis; expected a redis://, rediss:// or unix:// URL")
    mode = get("SIDECAR_REDIS_MODE") or "standalone"
    if mode not in REDIS_MODES:
        problems.append(f"SIDECAR_REDIS_MODE={mode!r}: expected one of {', '.join(REDIS_MODES)}")
    redis_ca_file = get("SIDECAR_REDIS_CA_FILE")
    if redis_ca_file is not None and not os.path.isfile(redis_ca_file):
        problems.append(f"SIDECAR_REDIS_CA_FILE={redis_ca_file!r}: expected a readable PEM "
                        "file of CA certificates")
    raw_listen = get("SIDECAR_SCALER_METRICS_LISTEN") or ""
    metrics_listen = None if raw_listen.lower() == "off" else parse_listen(raw_listen)
    if raw_listen.lower() != "off" and (metrics_listen is None or metrics_listen.path):
        problems.append(f"SIDECAR_SCALER_METRICS_LISTEN={raw_listen!r}: expected `host:port` "
                        "(port 0-65535) or `off`")
        metrics_listen = None
    pools: dict[str, ScaledPool] = {}
    raw_pools = get("SIDECAR_SCALER_POOLS")
    try:
        data = json.loads(raw_pools) if raw_pools else None
    except json.JSONDecodeError as exc:
        data = None
        problems.append(f"SIDECAR_SCALER_POOLS: not valid JSON ({exc.msg})")
    if not isinstance(data, dict) or not data:
        if raw_pools is None or isinstance(data, list | str | int | float):
            problems.append('SIDECAR_SCALER_POOLS: expected a JSON object, e.g. {"small": '
                            '{"job": "llm-small", "group": "server", "min": 1, "max": 8, '
                            '"replica_tokens_per_s": 2500, "cold_start_s": 600}}')
        data = {}
    for name, spec in data.items():
        where = f"SIDECAR_SCALER_POOLS: pool {name!r}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        before = len(problems)
        for key in ("job", "group"):
            if not isinstance(spec.get(key), str) or not spec.get(key):
                problems.append(f"{where}: \"{key}\" must be a non-empty string")
        low, high = spec.get("min", 1), spec.get("max")
        if not isinstance(low, int) or isinstance(low, bool) or low < 0:
            problems.append(f"{where}: \"min\" must be an integer >= 0, got {low!r}")
        if not isinstance(high, int) or isinstance(high, bool) or (
                isinstance(low, int) and high < max(low, 1)):
            problems.append(f"{where}: \"max\" must be an integer >= max(min, 1), got {high!r}")
        for key in ("replica_tokens_per_s", "cold_start_s", "health_interval_s"):
            if key == "health_interval_s" and key not in spec:
                continue
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                problems.append(f"{where}: \"{key}\" must be a number > 0, got {value!r}")
        if len(problems) == before:
            pools[name] = ScaledPool(name, spec["job"], spec["group"], low, high,
                                     float(spec["replica_tokens_per_s"]),
                                     float(spec["cold_start_s"]),
                                     float(spec.get("health_interval_s", 5.0)))
    try:
        prior = load_prior(env)
    except ConfigError as exc:
        problems.extend(exc.problems)
        prior = (float(SCALER_VARIABLES["SIDECAR_SCALER_PRIOR_CV"][0] or 0),
                 float(SCALER_VARIABLES["SIDECAR_SCALER_PRIOR_SAMPLES"][0] or 1),
                 float(SCALER_VARIABLES["SIDECAR_SCALER_PRIOR_FLOOR"][0] or 0))
    nomad, nomad_problems = _read_nomad(env)
    settings = ScalerSettings(
        redis_url=redis_url or "", redis_mode=mode,
        redis_sentinel_master=get("SIDECAR_REDIS_SENTINEL_MASTER"),
        redis_ca_file=redis_ca_file, pools=pools,
        interval_s=number("SIDECAR_SCALER_INTERVAL_S", 0),
        dry_run=_flag(get("SIDECAR_SCALER_DRY_RUN")),
        burst_quantile=number("SIDECAR_SCALER_BURST_QUANTILE", 0),
        headroom=number("SIDECAR_SCALER_HEADROOM", 0, strict=False),
        prior_cv=prior[0], prior_samples=prior[1], prior_floor=prior[2],
        metrics_listen=metrics_listen,
        cooldown_s=number("SIDECAR_SCALER_COOLDOWN_S", 0, strict=False),
        nomad=nomad)
    problems += nomad_problems
    if settings.burst_quantile > 1:
        problems.append(f"SIDECAR_SCALER_BURST_QUANTILE={get('SIDECAR_SCALER_BURST_QUANTILE')!r}:"
                        " expected a number > 0 and <= 1")
    if problems:
        raise ConfigError(problems)
    return settings
