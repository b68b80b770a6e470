"""Deployment artifacts: every Nomad job file parses (python-hcl2) and has the structure that
matters; the pools template renders to a configuration the sidecar accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from sidecar.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((ROOT / "nomad").glob("*.hcl"))


def unquote(value: Any) -> Any:
    """python-hcl2 keeps the quotes of strings and keys; drop them and internal markers."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        # HCL string escapes, decoded as Nomad reads them
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items()
                if k not in ("__is_block__", "__comments__")}
    return value


def load_job(path: Path) -> tuple[str, dict[str, Any]]:
    with path.open() as fh:
        data = unquote(hcl2.load(fh))
    [job] = data["job"] if isinstance(data["job"], list) else [data["job"]]
    [(name, body)] = job.items()
    return name, body


def groups(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for g in job["group"] for name, body in g.items()}


def tasks(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for t in group["task"] for name, body in t.items()}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_file_parses(path):
    name, job = load_job(path)
    assert name and job["group"]


def test_sidecar_job_runs_the_sidecar_beside_the_app_in_one_bridge_namespace():
    _, job = load_job(ROOT / "nomad" / "sidecar.hcl")
    [group] = groups(job).values()
    [network] = group["network"]
    assert network["mode"] == "bridge"
    t = tasks(group)
    [lifecycle] = t["sidecar"]["lifecycle"]
    assert lifecycle == {"hook": "prestart", "sidecar": True}
    [gate] = t["wait-for-sidecar"]["lifecycle"]
    assert gate == {"hook": "prestart", "sidecar": False}
    assert "wait" in t["wait-for-sidecar"]["config"][0]["args"]
    assert "lifecycle" not in t["app"]
    [app_env] = t["app"]["env"]
    assert app_env["OPENAI_BASE_URL"] == "http://127.0.0.1:7878/v1"
    [env] = t["sidecar"]["env"]
    assert env["SIDECAR_LISTEN"].startswith("127.0.0.1:")
    [resources] = t["sidecar"]["resources"]
    assert resources["memory"] <= 256 and resources["cpu"] <= 500


def test_sidecar_job_checks_the_admin_listener():
    _, job = load_job(ROOT / "nomad" / "sidecar.hcl")
    [group] = groups(job).values()
    [service] = group["service"]
    [check] = service["check"]
    assert check["type"] == "http" and check["path"] == "/health"
    [env] = tasks(group)["sidecar"]["env"]
    assert env["SIDECAR_ADMIN_LISTEN"].endswith(":7879")
    [network] = group["network"]
    assert network["port"][0]["admin"]["to"] == 7879


def pools_template(file: str = "sidecar.hcl", task: str = "sidecar"
                   ) -> tuple[dict[str, Any], str]:
    _, job = load_job(ROOT / "nomad" / file)
    [group] = groups(job).values()
    [template] = [t for t in tasks(group)[task]["template"]
                  if t["destination"].endswith("/pools.json")]
    data = template["data"]
    data = re.sub(r"^<<-?EOT\n", "", data.strip().strip('"'))
    data = re.sub(r"\n\s*EOT$", "", data)
    return template, data


def render(template: str, services: dict[str, list[tuple[str, int]]]) -> str:
    """Render exactly the consul-template construct the job uses, for given services."""
    pattern = re.compile(
        r'\{\{ range \$i, \$s := nomadService "(?P<svc>[^"]+)" \}\}\{\{ if \$i \}\}, '
        r'\{\{ end \}\}"http://\{\{ \$s.Address \}\}:\{\{ \$s.Port \}\}"\{\{ end \}\}')

    def expand(match: re.Match[str]) -> str:
        return ", ".join(f'"http://{a}:{p}"' for a, p in services.get(match["svc"], []))

    rendered, count = pattern.subn(expand, template)
    assert count == 2, "the template's construct changed: update this renderer"
    return rendered


@pytest.mark.parametrize("small,large", [(0, 0), (1, 0), (2, 1), (3, 3)])
def test_pools_template_renders_a_configuration_the_sidecar_accepts(tmp_path, small, large):
    template, data = pools_template()
    assert template["change_mode"] == "signal" and template["change_signal"] == "SIGHUP"
    services = {"llm-small": [(f"10.0.0.{i}", 21000 + i) for i in range(small)],
                "llm-large": [(f"10.0.1.{i}", 22000 + i) for i in range(large)]}
    path = tmp_path / "pools.json"
    path.write_text(render(data, services))
    settings = load_settings({"SIDECAR_POOLS_FILE": str(path)})
    assert len(settings.pools["small"].endpoints) == small
    assert len(settings.pools["large"].endpoints) == large
    assert settings.pools["large"].fallback == "small"
    json.loads(path.read_text())


def test_model_pool_job_registers_a_nomad_service_with_scaling_bounds():
    _, job = load_job(ROOT / "nomad" / "model-pool.hcl")
    [group] = groups(job).values()
    [scaling] = group["scaling"]
    assert scaling["min"] <= group["count"] <= scaling["max"]
    [service] = group["service"]
    assert service["provider"] == "nomad" and service["name"] == "llm-small"
    [check] = service["check"]
    assert check["path"] == "/health"


@pytest.mark.parametrize("file,pool", [("model-pool.hcl", "small"),
                                       ("model-pool-large.hcl", "large")])
def test_model_pool_scaling_policy_targets_the_scalers_forecast(file, pool):
    """The stock Nomad Autoscaler alternative: target-value (target 1) on the scaler's
    published forecast ratio for this pool, a metric the scaler really publishes."""
    from sidecar.telemetry import BY_KEY

    name, job = load_job(ROOT / "nomad" / file)
    [scaling] = groups(job)["server"]["scaling"]
    [policy] = scaling["policy"]
    assert policy["evaluation_interval"].endswith("s")
    [check] = policy["check"]
    [(check_name, body)] = check.items()
    assert check_name == "llm-sidecar-forecast"
    assert body["source"] == "prometheus"
    metric = BY_KEY["scaler_forecast_ratio"].prometheus
    assert body["query"] == f'max({metric}{{pool="{pool}"}})'
    [strategy] = body["strategy"]
    assert strategy == {"target-value": {"target": 1, "threshold": 0.01}}
    _, scaler = load_job(ROOT / "nomad" / "scaler.hcl")
    [env] = tasks(next(iter(groups(scaler).values())))["scaler"]["env"]
    assert json.loads(env["SIDECAR_SCALER_POOLS"])[pool]["job"] == name
    assert scaling["min"] >= 1, "target-value multiplies the current count: 0 stays 0"
    assert scaling["enabled"] is False, "off by default: the scaler drives Nomad itself"
    # the scaler serves /metrics where a Prometheus finds it
    [service] = groups(scaler)["scaler"]["service"]
    assert service["port"] == "metrics" and service["check"][0]["path"] == "/health"
    assert env["SIDECAR_SCALER_METRICS_LISTEN"].endswith(":7880")
    assert groups(scaler)["scaler"]["network"][0]["port"][0]["metrics"]["to"] == 7880


def test_dockerfile_runs_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^ENTRYPOINT .*llm-sidecar", text, flags=re.M)


def test_scaler_job_runs_two_instances_with_a_valid_configuration():
    from sidecar.scaler.config import load_scaler_settings

    _, job = load_job(ROOT / "nomad" / "scaler.hcl")
    [group] = groups(job).values()
    assert group["count"] == 2
    [task] = tasks(group).values()
    assert task["config"][0]["args"] == ["scaler"]
    [env] = task["env"]
    settings = load_scaler_settings({**env, "SIDECAR_REDIS_URL": "redis://r:6379/0"})
    assert set(settings.pools) == {"small", "large"}
    assert settings.pools["large"].cold_start_s == 900
    [secret] = [t for t in task["template"] if "NOMAD_TOKEN" in t["data"]]
    assert secret["env"] is True


def test_pool_jobs_named_by_the_scaler_exist():
    """Issue: no job for the large pool existed. Every pool the scaler scales has a job file
    with that group, whose `scaling` block admits the scaler's bounds."""
    _, scaler = load_job(ROOT / "nomad" / "scaler.hcl")
    [env] = tasks(next(iter(groups(scaler).values())))["scaler"]["env"]
    pools = json.loads(env["SIDECAR_SCALER_POOLS"])
    jobs = dict(load_job(path) for path in JOB_FILES)
    for name, spec in pools.items():
        assert spec["job"] in jobs, f"pool {name}: no job file defines job {spec['job']!r}"
        group = groups(jobs[spec["job"]])[spec["group"]]
        [scaling] = group["scaling"]
        assert scaling["min"] <= spec["min"] and spec["max"] <= scaling["max"], name


def test_the_sidecars_pools_template_reads_the_services_the_pool_jobs_register():
    _, data = pools_template()
    read = set(re.findall(r'nomadService "([^"]+)"', data))
    registered = {service["name"] for path in JOB_FILES
                  for group in groups(load_job(path)[1]).values()
                  for service in group.get("service", [])}
    assert read <= registered, f"no job registers {sorted(read - registered)}"


def test_sidecar_job_takes_the_admin_token_from_nomad_variables():
    name, job = load_job(ROOT / "nomad" / "sidecar.hcl")
    [group] = groups(job).values()
    sidecar = tasks(group)["sidecar"]
    [secret] = [t for t in sidecar["template"] if "SIDECAR_ADMIN_TOKEN" in t["data"]]
    assert secret["env"] is True and secret["destination"].startswith("${NOMAD_SECRETS_DIR}/")
    # The task's own variables path, which its workload identity may read by default.
    assert f'SIDECAR_ADMIN_TOKEN={{{{ with nomadVar "nomad/jobs/{name}" }}}}' in secret["data"]
    [env] = sidecar["env"]
    assert "SIDECAR_ADMIN_TOKEN" not in env, "a secret in the job file"
    [service] = group["service"]
    assert service["check"][0]["path"] == "/health", "the check needs no token"


def test_the_monitor_probes_the_same_pools_as_the_sidecars():
    """Nomad jobs cannot share a template: the monitor's copy must not drift from the
    sidecars' (a sidecar follows the view only for the endpoints the monitor carries)."""
    assert pools_template("monitor.hcl", "monitor")[1] == pools_template()[1]
