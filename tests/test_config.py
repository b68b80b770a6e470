"""Configuration: every variable's errors name the variable, the bad value and the expected
form; every problem is reported at once; `check` prints the effective configuration with
secrets redacted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config import VARIABLES, ConfigError, load_settings, redact_url

POOLS = json.dumps({"small": {"model": "m", "endpoints": ["http://10.0.0.5:8000"]},
                    "large": {"model": "big", "endpoints": ["http://10.0.1.5:8000"],
                              "fallback": "small"}})


def problems(**env: str) -> list[str]:
    base = {"SIDECAR_POOLS": POOLS}
    base.update(env)
    with pytest.raises(ConfigError) as refused:
        load_settings({k: v for k, v in base.items() if v is not None})
    return refused.value.problems


def test_defaults_match_the_spec():
    s = load_settings({"SIDECAR_POOLS": POOLS})
    assert str(s.listen) == "127.0.0.1:7878"
    assert str(s.admin_listen) == "127.0.0.1:7879"
    assert s.load_level == "low"
    assert s.redis_url is None and s.redis_mode == "standalone"
    assert s.redis_timeout_s == 0.05
    assert s.session_header == "x-session-id"
    assert s.session_ttl_s == 86400 and s.session_idle_s == 900
    assert s.connect_timeout_s == 1 and s.first_byte_timeout_s == 60
    assert s.response_timeout_s == 600  # non-streamed calls: the OpenAI SDK's own wait
    assert s.max_attempts == 3 and s.max_body_bytes == 33554432
    # Default routes: all 16 slots to the first pool at every level.
    assert s.routes == {level: ("small",) * 16 for level in ("low", "medium", "high")}


def test_routes_give_out_slots_in_the_order_pools_are_listed():
    s = load_settings({"SIDECAR_POOLS": POOLS, "SIDECAR_ROUTES": json.dumps(
        {"low": {"small": 16}, "medium": {"small": 12, "large": 4},
         "high": {"large": 8, "small": 8}})})
    assert s.routes["medium"] == ("small",) * 12 + ("large",) * 4
    assert s.routes["high"] == ("large",) * 8 + ("small",) * 8


@pytest.mark.parametrize("variable,value,expected", [
    ("SIDECAR_LISTEN", "7878", "`host:port` (port 1-65535) or `unix:/absolute/path`"),
    ("SIDECAR_LISTEN", "unix:relative.sock", "`unix:/absolute/path`"),
    ("SIDECAR_ADMIN_LISTEN", "127.0.0.1:99999", "`host:port`"),
    ("SIDECAR_LOAD_LEVEL", "extreme", "one of low, medium, high"),
    ("SIDECAR_REDIS_URL", "http://redis:6379", "a redis://, rediss:// or unix:// URL"),
    ("SIDECAR_REDIS_MODE", "replicated", "one of standalone, cluster, sentinel"),
    ("SIDECAR_REDIS_TIMEOUT_MS", "fast", "a number > 0"),
    ("SIDECAR_REDIS_TIMEOUT_MS", "0", "a number > 0"),
    ("SIDECAR_REDIS_MAX_CONNECTIONS", "1.5", "an integer > 0"),
    ("SIDECAR_SESSION_HEADER", "x session", "an HTTP header name"),
    ("SIDECAR_SESSION_TTL_S", "-5", "an integer > 0"),
    ("SIDECAR_SESSION_IDLE_S", "soon", "a number > 0"),
    ("SIDECAR_ROUTE_CACHE_SIZE", "0", "an integer > 0"),
    ("SIDECAR_CONNECT_TIMEOUT_S", "nan", "a number > 0"),
    ("SIDECAR_FIRST_BYTE_TIMEOUT_S", "0", "a number > 0"),
    ("SIDECAR_RESPONSE_TIMEOUT_S", "ten minutes", "a number > 0"),
    ("SIDECAR_RESPONSE_TIMEOUT_S", "-1", "a number > 0"),
    ("SIDECAR_MAX_ATTEMPTS", "zero", "an integer > 0"),
    ("SIDECAR_MAX_BODY_BYTES", "32MB", "an integer > 0"),
    ("SIDECAR_FALLBACK_HOLD_S", "-1", "a number >= 0"),
    ("SIDECAR_DRAIN_TIMEOUT_S", "forever", "a number >= 0"),
])
def test_each_variable_names_itself_the_value_and_the_expected_form(variable, value, expected):
    [problem] = problems(**{variable: value})
    assert problem.startswith(f"{variable}=")
    assert value in problem or variable == "SIDECAR_REDIS_URL"
    assert expected in problem


def test_every_problem_is_reported_at_once():
    found = problems(SIDECAR_LISTEN="nope", SIDECAR_MAX_ATTEMPTS="x", SIDECAR_LOAD_LEVEL="y",
                     SIDECAR_ROUTES='{"low": {"small": 15}}')
    assert len(found) == 6
    joined = "\n".join(found)
    for variable in ("SIDECAR_LISTEN", "SIDECAR_MAX_ATTEMPTS", "SIDECAR_LOAD_LEVEL"):
        assert variable in joined
    assert "level 'low' gives out 15 slots" in joined
    assert "level 'medium' is missing" in joined and "level 'high' is missing" in joined


def test_missing_pools_says_what_to_set():
    [problem] = problems(SIDECAR_POOLS=None)
    assert "SIDECAR_POOLS is not set" in problem and "SIDECAR_POOLS_FILE" in problem


@pytest.mark.parametrize("pools,expected", [
    ("[1, 2]", "expected a non-empty JSON object of pools"),
    ("{bad json", "SIDECAR_POOLS: not valid JSON"),
    ('{"p": {"endpoints": ["http://a:1"]}}', "pool 'p': \"model\" must be a non-empty string"),
    ('{"p": {"model": "m"}}', "\"endpoints\" must be a list of base URLs"),
    ('{"p": {"model": "m", "endpoints": "http://a:1"}}', "\"endpoints\" must be a list"),
    ('{"p": {"model": "m", "endpoints": ["10.0.0.5:8000"]}}', "is not a base URL"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1/v1"]}}', "is not a base URL"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1", "http://a:1"]}}', "the same URL twice"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "fallback": "q"}}',
     "\"fallback\" must name another pool"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "fallback": "p"}}',
     "names the pool itself"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "cold_start_s": 0}}',
     "\"cold_start_s\" must be a number > 0"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "health_path": "health"}}',
     "must be a path starting with '/'"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "resume": "yes"}}',
     "\"resume\" must be true or false"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "colour": "red"}}',
     "unknown field(s) ['colour']"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "api_key_env": "NO_SUCH_KEY_VAR"}}',
     "names NO_SUCH_KEY_VAR, which is not set"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "health_path": "/health", '
     '"nomad_service": "llm_small"}}', "\"nomad_service\" must be a Nomad service name"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "health_path": "/health", '
     '"nomad_service": ""}}', "\"nomad_service\" must be a Nomad service name"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "health_path": "/health", '
     '"nomad_service": "-llm"}}', "\"nomad_service\" must be a Nomad service name"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "health_path": "/health", '
     '"nomad_service": ["llm"]}}', "\"nomad_service\" must be a Nomad service name"),
    ('{"p": {"model": "m", "endpoints": ["http://a:1"], "nomad_service": "llm"}}',
     "\"nomad_service\" needs \"health_path\" or \"metrics_path\""),
])
def test_pool_problems_name_the_pool_and_field(pools, expected):
    found = problems(SIDECAR_POOLS=pools)
    assert any(expected in p for p in found), found


def test_a_pool_names_its_nomad_service_and_check_shows_it():
    s = load_settings({"SIDECAR_POOLS": json.dumps(
        {"small": {"model": "m", "endpoints": ["http://a:1"], "metrics_path": "/metrics",
                   "nomad_service": "llm-small-2"},
         "plain": {"model": "n", "endpoints": ["http://b:1"]}})})
    assert s.pools["small"].nomad_service == "llm-small-2"
    assert s.pools["plain"].nomad_service is None
    assert s.redacted()["SIDECAR_POOLS"]["small"]["nomad_service"] == "llm-small-2"


def test_a_pool_with_no_endpoints_yet_is_valid():
    # Service discovery renders an empty list while a pool scales from zero.
    s = load_settings({"SIDECAR_POOLS": json.dumps(
        {"large": {"model": "big", "endpoints": [], "fallback": "small"},
         "small": {"model": "m", "endpoints": ["http://a:1"]}})})
    assert s.pools["large"].endpoints == ()


def test_fallback_loops_are_refused():
    pools = {"a": {"model": "m", "endpoints": ["http://a:1"], "fallback": "b"},
             "b": {"model": "m", "endpoints": ["http://b:1"], "fallback": "a"}}
    found = problems(SIDECAR_POOLS=json.dumps(pools))
    assert any("fallback chain loops (a → b → a)" in p for p in found)


def test_routes_must_name_configured_pools():
    found = problems(SIDECAR_ROUTES=json.dumps({"low": {"tiny": 16}, "medium": {"small": 16},
                                                "high": {"small": 16}}))
    assert any("names pool 'tiny', which is not configured" in p for p in found)


def test_pools_file_and_inline_pools_are_exclusive(tmp_path):
    path = tmp_path / "pools.json"
    path.write_text(POOLS)
    found = problems(SIDECAR_POOLS_FILE=str(path))
    assert any("both set" in p for p in found)
    s = load_settings({"SIDECAR_POOLS_FILE": str(path)})
    assert s.pools_file == str(path) and set(s.pools) == {"small", "large"}
    found = problems(SIDECAR_POOLS=None, SIDECAR_POOLS_FILE=str(tmp_path / "missing.json"))
    assert any("cannot be read" in p and "missing.json" in p for p in found)


def test_sentinel_mode_needs_a_master_name():
    found = problems(SIDECAR_REDIS_URL="redis://10.0.0.1:26379,10.0.0.2:26379/0",
                     SIDECAR_REDIS_MODE="sentinel")
    assert any("SIDECAR_REDIS_SENTINEL_MASTER is not set" in p for p in found)


def test_redact_url_hides_passwords():
    assert redact_url("redis://user:hunter2@host:6379/0") == "redis://user:<redacted>@host:6379/0"
    assert redact_url("rediss://:hunter2@host:6380") == "rediss://:<redacted>@host:6380"
    assert redact_url("redis://host:6379") == "redis://host:6379"
    # Sentinel's list of hosts (no single port to parse) and a password in the query
    assert redact_url("redis://:hunter2@h1:26379,h2:26380/0") == \
        "redis://:<redacted>@h1:26379,h2:26380/0"
    assert redact_url("redis://host?password=hunter2&db=1") == \
        "redis://host?password=<redacted>&db=1"


DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_defaults(text: str) -> dict[str, str]:
    """variable → the default cell of its row in a `| variable | default | meaning |` table;
    a row of several variables (`A`, `B`) has one default each, or one for all of them."""
    defaults: dict[str, str] = {}
    for line in text.splitlines():
        row = re.match(r"^\| ((?:`[A-Z_]+`(?:, )?)+) \| ([^|]*) \|", line)
        if row is None:
            continue
        names = re.findall(r"`([A-Z_]+)`", row.group(1))
        cell = row.group(2).strip()
        cells = [c.strip() for c in cell.split(", ")] if ", " in cell else [cell] * len(names)
        assert len(cells) == len(names), line
        for name, default in zip(names, cells, strict=True):
            defaults.setdefault(name, default)
    return defaults


def assert_documented(variable: str, default: str | None, cell: str | None, where: str) -> None:
    assert cell is not None, f"{variable} has no row in {where}"
    if default is None:
        # no value: the cell says so in words (—, "(required)", "system CAs"), never a value
        assert not cell.startswith("`"), f"{variable}: {where} shows {cell}, the code none"
    else:
        assert cell == f"`{default}`", f"{variable}: {where} shows {cell}, the code {default}"


def test_every_sidecar_variable_is_in_the_reference_with_its_default():
    reference = documented_defaults((DOCS / "reference.md").read_text())
    for variable, (default, _) in VARIABLES.items():
        assert_documented(variable, default, reference.get(variable), "docs/reference.md")


def test_every_scaler_variable_is_in_its_table_with_its_default():
    from sidecar.scaler.config import SCALER_VARIABLES

    # The scaler's table sits in its section of docs/design.md; the Redis settings it shares
    # with the sidecar and does not repeat are the sidecar's (same names, same defaults).
    scaler = documented_defaults((DOCS / "design.md").read_text())
    reference = documented_defaults((DOCS / "reference.md").read_text())
    for variable, (default, _) in SCALER_VARIABLES.items():
        if variable in scaler:
            assert_documented(variable, default, scaler[variable], "docs/design.md")
        else:
            assert VARIABLES.get(variable, (None,))[0] == default, variable
            assert_documented(variable, default, reference.get(variable), "docs/reference.md")


def table_rows(text: str, heading: str) -> list[str]:
    """The rows naming one variable in the variables table under `heading`."""
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if re.match(r"^\| `[A-Z_]+` \|", line)]


def test_the_reference_table_is_the_declarations_row_for_row():
    from sidecar.config import SETTINGS

    documented = table_rows((DOCS / "reference.md").read_text(), "## Configuration reference")
    declared = [s.reference_row() for s in SETTINGS.values()]
    assert documented == declared, (
        "docs/reference.md's variables table differs from the declarations in "
        "sidecar/config.py; the rows they give:\n" + "\n".join(declared))


def test_the_scalers_own_rows_in_the_design_are_its_declarations():
    from sidecar.scaler.config import SCALER_SETTINGS

    design = (DOCS / "design.md").read_text().splitlines()
    rows = {re.match(r"^\| `([A-Z_]+)` \|", line).group(1): line  # type: ignore[union-attr]
            for line in design if re.match(r"^\| `(SIDECAR_SCALER_|NOMAD_)[A-Z_]+` \|", line)}
    own = [s for name, s in SCALER_SETTINGS.items() if name.startswith("SIDECAR_SCALER_")]
    assert own and all(s.name in rows for s in own)
    for s in own:
        assert rows[s.name] == s.reference_row(), s.name


def test_every_variable_the_code_names_is_declared():
    from sidecar.config import SETTINGS
    from sidecar.scaler.config import SCALER_SETTINGS

    package = Path(__file__).resolve().parent.parent / "sidecar"
    named = {name for path in package.rglob("*.py")
             for name in re.findall(r"\b(?:SIDECAR|NOMAD)_[A-Z_]*[A-Z]\b", path.read_text())}
    assert named, "the scan found nothing: it no longer reads the package"
    assert named - set(SETTINGS) - set(SCALER_SETTINGS) == set()


def test_each_field_is_declared_once_and_shared_variables_share_their_declaration():
    from dataclasses import fields

    from sidecar.config import SETTINGS, Settings
    from sidecar.scaler.config import SCALER_SETTINGS, NomadAccess, ScalerSettings

    def names(cls: type) -> list[str]:
        return [f.metadata["setting"].name for f in fields(cls) if "setting" in f.metadata]

    for cls in (Settings, ScalerSettings, NomadAccess):
        assert len(names(cls)) == len(set(names(cls))), cls
    assert [f.name for f in fields(Settings) if "setting" not in f.metadata] == ["api_keys"]
    assert [f.name for f in fields(ScalerSettings) if "setting" not in f.metadata] == ["nomad"]
    assert len(names(NomadAccess)) == len(fields(NomadAccess))
    shared = set(SETTINGS) & set(SCALER_SETTINGS)
    assert shared == {"SIDECAR_REDIS_URL", "SIDECAR_REDIS_MODE",
                      "SIDECAR_REDIS_SENTINEL_MASTER", "SIDECAR_REDIS_CA_FILE"}
    for name in shared:
        assert SETTINGS[name] is SCALER_SETTINGS[name], name


def test_the_redacted_views_name_every_declared_variable_and_no_secret(tmp_path):
    from sidecar.config import SETTINGS
    from sidecar.scaler.config import SCALER_SETTINGS, load_scaler_settings, scaler_warnings

    secrets = ("hunter2-admin-token", "pa55word", "nomad-s3cret-token", "nomad-pa55")
    sidecar = load_settings({"SIDECAR_POOLS": POOLS, "SIDECAR_ADMIN_TOKEN": secrets[0],
                             "SIDECAR_REDIS_URL": f"redis://app:{secrets[1]}@redis:6379/0"})
    scaler = load_scaler_settings({
        "SIDECAR_REDIS_URL": f"redis://app:{secrets[1]}@redis:6379/0",
        "SIDECAR_SCALER_POOLS": json.dumps({"small": {
            "job": "llm-small", "group": "server", "min": 1, "max": 4,
            "replica_tokens_per_s": 1000, "cold_start_s": 600}}),
        "NOMAD_TOKEN": secrets[2], "NOMAD_ADDR": f"https://ops:{secrets[3]}@nomad:4646"})
    for settings, declared in ((sidecar, SETTINGS), (scaler, SCALER_SETTINGS)):
        view = settings.redacted()
        assert list(view) == list(declared)
        shown = json.dumps(view) + repr(settings)
        assert not [secret for secret in secrets if secret in shown]
    assert scaler.redacted()["NOMAD_ADDR"] == "https://ops:<redacted>@nomad:4646"
    [warning] = scaler_warnings(scaler)  # https:// without NOMAD_CACERT
    assert "NOMAD_ADDR='https://ops:<redacted>@nomad:4646'" in warning
    assert scaler.redacted()["NOMAD_TOKEN"] == "<redacted>"


def test_a_refused_redis_url_is_not_also_reported_missing():
    [problem] = problems(SIDECAR_REDIS_URL="http://redis:6379", SIDECAR_REDIS_MODE="cluster")
    assert problem.startswith("SIDECAR_REDIS_URL='http://redis:6379': expected")


@pytest.mark.parametrize("redis", [
    {"SIDECAR_REDIS_URL": "http://redis:6379"},
    {"SIDECAR_REDIS_URL": "http://redis:6379", "SIDECAR_REDIS_MODE": "cluster"},
    {"SIDECAR_REDIS_URL": "redis://r:26379", "SIDECAR_REDIS_MODE": "sentinel"},
    {"SIDECAR_REDIS_URL": "redis://r:6379", "SIDECAR_REDIS_CA_FILE": __file__},
    {"SIDECAR_REDIS_URL": "rediss://r:6379", "SIDECAR_REDIS_MODE": "replicated",
     "SIDECAR_REDIS_CA_FILE": "/no/such/ca.pem"},
])
def test_the_scaler_judges_the_redis_variables_as_the_sidecar_does(redis):
    from sidecar.scaler.config import load_scaler_settings

    with pytest.raises(ConfigError) as by_scaler:
        load_scaler_settings({**redis, "SIDECAR_SCALER_POOLS": json.dumps({"small": {
            "job": "j", "group": "g", "min": 1, "max": 2, "replica_tokens_per_s": 10,
            "cold_start_s": 60}})})
    assert sorted(by_scaler.value.problems) == sorted(problems(**redis))


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_check_prints_the_effective_configuration_with_secrets_redacted():
    pools = {"external": {"model": "gpt-4o-mini", "endpoints": ["https://api.example.com"],
                          "api_key_env": "EXTERNAL_API_KEY"}}
    done = run_cli("check", env={"SIDECAR_POOLS": json.dumps(pools),
                                 "EXTERNAL_API_KEY": "sk-live-very-secret",
                                 "SIDECAR_REDIS_URL": "redis://app:pa55word@redis:6379/0"})
    assert done.returncode == 0, done.stderr
    assert "sk-live-very-secret" not in done.stdout + done.stderr
    assert "pa55word" not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["SIDECAR_POOLS"]["external"]["api_key"] == "<redacted>"
    assert shown["SIDECAR_REDIS_URL"] == "redis://app:<redacted>@redis:6379/0"
    assert shown["SIDECAR_MAX_ATTEMPTS"] == 3


def test_check_exits_non_zero_naming_every_problem():
    done = run_cli("check", env={"SIDECAR_POOLS": "{}", "SIDECAR_LISTEN": "x"})
    assert done.returncode == 2
    assert "SIDECAR_LISTEN='x'" in done.stderr
    assert "SIDECAR_POOLS: expected a non-empty JSON object" in done.stderr


def test_reload_refuses_a_file_that_drops_a_routed_pool(tmp_path):
    from sidecar.config import reload_pools

    path = tmp_path / "pools.json"
    path.write_text(POOLS)
    routes = json.dumps({"low": {"small": 8, "large": 8}, "medium": {"small": 16},
                         "high": {"small": 16}})
    settings = load_settings({"SIDECAR_POOLS_FILE": str(path), "SIDECAR_ROUTES": routes})
    path.write_text(json.dumps({"small": {"model": "m", "endpoints": ["http://b:1"]}}))
    with pytest.raises(ConfigError) as refused:
        reload_pools(settings, {})
    assert "pool 'large' is gone but SIDECAR_ROUTES level 'low'" in refused.value.problems[0]
    path.write_text(json.dumps({"small": {"model": "m", "endpoints": ["http://b:1"]},
                                "large": {"model": "big", "endpoints": []}}))
    reloaded = reload_pools(settings, {})
    assert reloaded.pools["small"].endpoints == ("http://b:1",)
    assert reloaded.routes == settings.routes


@pytest.mark.parametrize("url", ["http://user:hunter2@10.0.0.5:8000", "https://tok3n@api.example"])
def test_endpoint_with_credentials_is_refused_without_printing_them(url):
    pools = json.dumps({"small": {"model": "m", "endpoints": [url]}})
    [problem] = problems(SIDECAR_POOLS=pools)
    assert problem.startswith("SIDECAR_POOLS: pool 'small': endpoint")
    assert "credentials" in problem and "api_key_env" in problem
    assert "hunter2" not in problem and "tok3n" not in problem


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000/?api_key=SECRET#tok",
                                 "http://10.0.0.5:8000?api_key=SECRET",
                                 "https://api.example/#SECRET", "http://10.0.0.5:8000/?",
                                 "http://user:SECRET@10.0.0.5:8000/?k=SECRET"])
def test_endpoint_with_a_query_or_fragment_is_refused_without_printing_it(url):
    pools = json.dumps({"small": {"model": "m", "endpoints": [url]}})
    [problem] = problems(SIDECAR_POOLS=pools)
    assert problem.startswith("SIDECAR_POOLS: pool 'small': endpoint")
    assert "query or fragment" in problem and "http://10.0.0.5:8000" in problem
    assert "SECRET" not in problem and "tok" not in problem
