"""Scaler settings from the environment (same rules as the sidecar's: every problem is
named with its variable, the bad value and the expected form). Each variable is declared
once, as a field below; the Redis ones share their declarations with the sidecar."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.config import ConfigError, Listen, parse_listen
from sidecar.settings_schema import (
    REDIS_CA_FILE,
    REDIS_MODE,
    REDIS_SENTINEL_MASTER,
    REDIS_URL,
    Invalid,
    Reader,
    declared,
    flag,
    nested,
    number,
    redact_url,
    redacted,
    redis_problems,
    setting,
)


def _nomad_addr(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise Invalid("an http:// or https:// URL")
    return text


def _metrics_listen(text: str) -> Listen | None:
    if text.lower() == "off":
        return None
    listen = parse_listen(text)
    if listen is None or listen.path:
        raise Invalid("`host:port` (port 0-65535) or `off`")
    return listen


@dataclass(frozen=True, slots=True)
class NomadAccess:
    """How to reach Nomad's HTTP API (the NOMAD_* variables, as Nomad's own CLI reads them):
    what the fleet monitor needs to read GPU statistics, without the scaler's settings."""

    nomad_addr: str = setting(
        "NOMAD_ADDR", "http://127.0.0.1:4646", "Nomad's HTTP API",
        parse=_nomad_addr, normalize=lambda text: text.rstrip("/"), redact=redact_url)
    nomad_token: str | None = setting(
        "NOMAD_TOKEN", None, "ACL token (scale-job and read-job-scaling capabilities)",
        parse=str, secret=True, init_default=None)
    nomad_namespace: str | None = setting(
        "NOMAD_NAMESPACE", None, "namespace of the pool jobs", parse=str, init_default=None)
    nomad_region: str | None = setting(
        "NOMAD_REGION", None, "region to forward requests to", parse=str, init_default=None)
    nomad_cacert: str | None = setting(
        "NOMAD_CACERT", None, "CA certificate file for Nomad's TLS", parse=str,
        init_default=None)
    nomad_client_cert: str | None = setting(
        "NOMAD_CLIENT_CERT", None, "client certificate file (mutual TLS)", parse=str,
        init_default=None)
    nomad_client_key: str | None = setting(
        "NOMAD_CLIENT_KEY", None, "client key file (mutual TLS)", parse=str,
        init_default=None)
    nomad_skip_verify: bool = setting(
        "NOMAD_SKIP_VERIFY", None, "1/true: do not verify Nomad's certificate",
        parse=flag, when_unset=False, init_default=False)

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
        return redacted(self)


def load_nomad_access(env: Mapping[str, str] | None = None) -> NomadAccess:
    """The NOMAD_* variables alone (the fleet monitor reads them too); raises ConfigError."""
    r = Reader(os.environ if env is None else env, declared(NomadAccess))
    access = NomadAccess(**r.fields_of(NomadAccess))
    if r.problems:
        raise ConfigError(r.problems)
    return access


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


def vars_of(pool: ScaledPool) -> dict[str, Any]:
    return {f: getattr(pool, f) for f in pool.__dataclass_fields__}


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalerSettings:
    """The scaler's settings; docs/design.md's scaler table is checked against them."""

    redis_url: str = REDIS_URL.field()
    redis_mode: str = REDIS_MODE.field()
    redis_sentinel_master: str | None = REDIS_SENTINEL_MASTER.field()
    redis_ca_file: str | None = REDIS_CA_FILE.field()
    pools: Mapping[str, ScaledPool] = setting(
        "SIDECAR_SCALER_POOLS", None,
        "per pool: `job`, `group`, `min`, `max`, `replica_tokens_per_s` (what one ready "
        "replica serves), `cold_start_s`, and optionally `health_interval_s` (the pool's, as "
        "in `SIDECAR_POOLS`; 5): the pod view's staleness is judged by it",
        show=lambda pools: {name: vars_of(pool) for name, pool in pools.items()},
        unset="(required)")
    interval_s: float = setting(
        "SIDECAR_SCALER_INTERVAL_S", "15", "seconds between decisions", parse=number())
    dry_run: bool = setting(
        "SIDECAR_SCALER_DRY_RUN", "0", "`1`: log decisions, change nothing", parse=flag)
    burst_quantile: float = setting(
        "SIDECAR_SCALER_BURST_QUANTILE", "0.995",
        "quantile of the bursts seen over the last hour held above the level (0 < q ≤ 1; the "
        "frontier below shows what each costs)", parse=number(maximum=1))
    headroom: float = setting(
        "SIDECAR_SCALER_HEADROOM", "0", "share added on top of the whole forecast",
        parse=number(strict=False))
    prior_cv: float = setting(
        "SIDECAR_SCALER_PRIOR_CV", "0",
        "the mean burst above the level assumed before any history, as a share of the level "
        "(≥ 0; `0`: no prior, the learned quantile alone). See \"A young fleet's margin\" below",
        parse=number(strict=False, finite=True))
    prior_samples: float = setting(
        "SIDECAR_SCALER_PRIOR_SAMPLES", "12",
        "how many intervals of history the prior counts as (> 0): more is a firmer prior",
        parse=number(finite=True))
    prior_floor: float = setting(
        "SIDECAR_SCALER_PRIOR_FLOOR", "9",
        "replicas a young pool asks for at least (clamped to its `max`) until its history "
        "spans half a cold start, shrinking to 0 when it spans a whole one (≥ 0; `0`: off). "
        "See \"A young fleet's margin\" below", parse=number(strict=False, finite=True))
    metrics_listen: Listen | None = setting(
        "SIDECAR_SCALER_METRICS_LISTEN", "127.0.0.1:7880",
        "`host:port` of the scaler's `GET /metrics` and `/health`, or `off`",
        parse=_metrics_listen, show=lambda listen: str(listen) if listen else "off")
    cooldown_s: float = setting(
        "SIDECAR_SCALER_COOLDOWN_S", "300", "least time between two scale-downs of a pool",
        parse=number(strict=False))
    nomad: NomadAccess = nested(NomadAccess)

    def redacted(self) -> dict[str, Any]:
        return redacted(self)


SCALER_SETTINGS = declared(ScalerSettings)
# variable → (default, doc): the declarations in the shape older readers know.
SCALER_VARIABLES: dict[str, tuple[str | None, str]] = {
    name: (s.default, s.doc) for name, s in SCALER_SETTINGS.items()}


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
        warnings.append(f"NOMAD_ADDR={redact_url(nomad.nomad_addr)!r} is https:// but "
                        "NOMAD_CACERT is not set: Nomad's certificate must then be signed by a "
                        "system CA; set NOMAD_CACERT to the CA file of a private Nomad PKI")
    return warnings


def load_prior(env: Mapping[str, str] | None = None) -> tuple[float, float, float]:
    """SIDECAR_SCALER_PRIOR_CV, _SAMPLES and _FLOOR alone (the simulator reads them too, so
    what it replays is what the scaler would run)."""
    r = Reader(os.environ if env is None else env, SCALER_SETTINGS)
    cv, samples, floor = (r.read(name) for name in (
        "SIDECAR_SCALER_PRIOR_CV", "SIDECAR_SCALER_PRIOR_SAMPLES", "SIDECAR_SCALER_PRIOR_FLOOR"))
    if r.problems:
        raise ConfigError(r.problems)
    return cv, samples, floor


def load_scaler_settings(env: Mapping[str, str] | None = None) -> ScalerSettings:
    r = Reader(os.environ if env is None else env, SCALER_SETTINGS)
    values = r.fields_of(ScalerSettings)
    if r.raw("SIDECAR_REDIS_URL") is None:
        r.problems.append("SIDECAR_REDIS_URL is not set: the scaler reads the sidecars' "
                          "traffic from Redis; expected a redis://, rediss:// or unix:// URL")
    values["redis_url"] = values["redis_url"] or ""
    r.problems += redis_problems(values)
    pools = _parse_pools(r.raw("SIDECAR_SCALER_POOLS"), r.problems)
    settings = ScalerSettings(**values, pools=pools,
                              nomad=NomadAccess(**r.fields_of(NomadAccess)))
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def _parse_pools(raw: str | None, problems: list[str]) -> dict[str, ScaledPool]:
    """SIDECAR_SCALER_POOLS → the pools; what is wrong goes to `problems`."""
    pools: dict[str, ScaledPool] = {}
    try:
        data = json.loads(raw) if raw else None
    except json.JSONDecodeError as exc:
        data = None
        problems.append(f"SIDECAR_SCALER_POOLS: not valid JSON ({exc.msg})")
    if not isinstance(data, dict) or not data:
        if raw is None or isinstance(data, list | str | int | float):
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
    return pools
