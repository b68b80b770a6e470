"""The rules `nomad job validate` and Nomad's docker driver apply to our job files, each
taken from Nomad's job specification (the section is named in every test), checked on every
file in nomad/ so a new job file is held to them too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.test_deploy import JOB_FILES, ROOT, groups, load_job, tasks

IDS = [p.name for p in JOB_FILES]
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(duration: str) -> float:
    """A Nomad duration ("30s", "20m", "1h30m") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * _UNITS[u] for n, u in parts)


def every_group() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    out = []
    for path in JOB_FILES:
        name, job = load_job(path)
        for group_name, group in groups(job).items():
            out.append((path.name, f"{name}.{group_name}", job, group))
    return out


# -- job specification: update block, migrate block --------------------------------------

UPDATE_DEFAULTS = {"min_healthy_time": "10s", "healthy_deadline": "5m",
                   "progress_deadline": "10m"}
MIGRATE_DEFAULTS = {"min_healthy_time": "10s", "healthy_deadline": "5m"}


@pytest.mark.parametrize("path", JOB_FILES, ids=IDS)
def test_update_and_migrate_deadlines_are_ordered(path):
    """Job specification, `update` block: min_healthy_time < healthy_deadline, and
    healthy_deadline < progress_deadline unless progress_deadline is 0 (defaults 10s, 5m,
    10m; a group's block is merged over the job's). `migrate` block: min_healthy_time <
    healthy_deadline (defaults 10s, 5m). Nomad refuses the job otherwise."""
    _, job = load_job(path)
    for name, group in groups(job).items():
        update = {**UPDATE_DEFAULTS, **next(iter(job.get("update", [{}]))),
                  **next(iter(group.get("update", [{}])))}
        low, healthy = seconds(update["min_healthy_time"]), seconds(update["healthy_deadline"])
        progress = seconds(update["progress_deadline"]) if update["progress_deadline"] != "0" \
            else 0
        assert low < healthy, f"{name}: update min_healthy_time must be < healthy_deadline"
        assert progress == 0 or healthy < progress, (
            f"{name}: update healthy_deadline {update['healthy_deadline']} must be below "
            f"progress_deadline {update['progress_deadline']}")
        migrate = {**MIGRATE_DEFAULTS, **next(iter(job.get("migrate", [{}]))),
                   **next(iter(group.get("migrate", [{}])))}
        assert seconds(migrate["min_healthy_time"]) < seconds(migrate["healthy_deadline"]), name


# -- job specification: network block (port), service block (port), check block (port),
#    docker driver (ports) -----------------------------------------------------------------

def port_labels(group: dict[str, Any]) -> set[str]:
    return {label for network in group.get("network", []) for port in network.get("port", [])
            for label in port}


@pytest.mark.parametrize("path", JOB_FILES, ids=IDS)
def test_every_port_label_named_exists_in_the_groups_network(path):
    """Job specification, `network` block: ports are declared by label in the group's
    network; `service` and `check` blocks name one in `port` (a label, or a number with
    address_mode "driver"), and the docker driver's `ports` list names labels."""
    _, job = load_job(path)
    for name, group in groups(job).items():
        labels = port_labels(group)
        named = []
        for service in group.get("service", []):
            named.append(service.get("port"))
            named += [check.get("port") for check in service.get("check", [])]
        for task in tasks(group).values():
            for service in task.get("service", []):
                named.append(service.get("port"))
            for config in task.get("config", []):
                named += config.get("ports", [])
        for label in named:
            if label is None or str(label).isdigit():
                continue
            assert label in labels, f"{name}: port {label!r} is not in the network {labels}"


# -- runtime environment (NOMAD_*), interpolation (attr.*, node.*, meta.*), variable block --

NOMAD_RUNTIME = {
    "NOMAD_ALLOC_DIR", "NOMAD_TASK_DIR", "NOMAD_SECRETS_DIR", "NOMAD_MEMORY_LIMIT",
    "NOMAD_MEMORY_MAX_LIMIT", "NOMAD_CPU_LIMIT", "NOMAD_CPU_CORES", "NOMAD_ALLOC_ID",
    "NOMAD_SHORT_ALLOC_ID", "NOMAD_ALLOC_NAME", "NOMAD_ALLOC_INDEX", "NOMAD_TASK_NAME",
    "NOMAD_GROUP_NAME", "NOMAD_JOB_ID", "NOMAD_JOB_NAME", "NOMAD_JOB_PARENT_ID", "NOMAD_DC",
    "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_UNIX_ADDR"}
# Per port label: NOMAD_PORT_http, NOMAD_HOST_PORT_http, …
NOMAD_PER_LABEL = ("NOMAD_IP_", "NOMAD_PORT_", "NOMAD_ADDR_", "NOMAD_HOST_IP_",
                   "NOMAD_HOST_PORT_", "NOMAD_HOST_ADDR_", "NOMAD_ALLOC_IP_",
                   "NOMAD_ALLOC_PORT_", "NOMAD_ALLOC_ADDR_")
NODE_ATTRIBUTES = {"attr.unique.network.ip-address", "attr.unique.hostname",
                   "attr.kernel.name", "attr.cpu.arch", "attr.os.name", "attr.nomad.version",
                   "node.unique.id", "node.unique.name", "node.datacenter", "node.class",
                   "node.region", "node.pool"}


@pytest.mark.parametrize("path", JOB_FILES, ids=IDS)
def test_every_interpolation_is_one_nomad_defines_or_the_file_declares(path):
    """Runtime environment: the NOMAD_* variables Nomad sets (per-label ones only for a
    label of the group's network); interpolation: node attributes and `meta.*`; `variable`
    block: every `var.X` is declared in the file. A typo is an empty string at run time."""
    text = path.read_text()
    code = "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                     for line in text.splitlines())
    declared = set(re.findall(r'^variable "([^"]+)"', text, flags=re.M))
    used_vars = set(re.findall(r"\bvar\.([A-Za-z_][\w-]*)", code))
    assert used_vars <= declared, f"undeclared: {sorted(used_vars - declared)}"
    _, job = load_job(path)
    labels = set().union(*(port_labels(g) for g in groups(job).values()))
    for ref in re.findall(r"\$\{([^}]+)\}", code):
        if ref.startswith("var."):
            continue
        if ref.startswith("NOMAD_META_") or ref.startswith("meta."):
            continue
        if ref.startswith("NOMAD_"):
            label = next((ref[len(p):] for p in NOMAD_PER_LABEL if ref.startswith(p)), None)
            assert ref in NOMAD_RUNTIME or label in labels, f"{ref}: not set by Nomad"
            continue
        assert ref in NODE_ATTRIBUTES, f"${{{ref}}}: not a node attribute Nomad interpolates"


# -- template block: destination --------------------------------------------------------

TASK_DIRS = ("${NOMAD_TASK_DIR}/", "${NOMAD_SECRETS_DIR}/", "${NOMAD_ALLOC_DIR}/", "local/",
             "secrets/", "alloc/")


@pytest.mark.parametrize("path", JOB_FILES, ids=IDS)
def test_templates_render_only_into_the_tasks_own_directories(path):
    """`template` block, `destination`: rendered relative to the task's working directory;
    with the file sandbox (the default) a path outside the task's local/, secrets/ or the
    shared alloc/ is refused. Templates that read Nomad Variables (secrets) go to secrets/,
    which is never in the allocation's browsable file system."""
    _, job = load_job(path)
    for group in groups(job).values():
        for name, task in tasks(group).items():
            for template in task.get("template", []):
                destination = template["destination"]
                assert destination.startswith(TASK_DIRS) and ".." not in destination, (
                    f"{name}: template destination {destination!r}")
                if "nomadVar" in template.get("data", ""):
                    assert destination.startswith(("${NOMAD_SECRETS_DIR}/", "secrets/")), (
                        f"{name}: a template holding secrets renders into {destination!r}")


# -- docker driver: image (tags) ---------------------------------------------------------

def variable_defaults(path: Path) -> dict[str, str]:
    import hcl2

    with path.open() as fh:
        data = hcl2.load(fh)
    out = {}
    for block in data.get("variable", []):
        for name, body in block.items():
            out[name.strip('"')] = str(body.get("default", "")).strip('"')
    return out


@pytest.mark.parametrize("path", JOB_FILES, ids=IDS)
def test_every_image_is_pinned(path):
    """Docker driver, `image`: "If the tag is omitted or equal to latest the driver will
    always try to pull the image": a restart could then run another version."""
    defaults = variable_defaults(path)
    _, job = load_job(path)
    for group in groups(job).values():
        for name, task in tasks(group).items():
            if task.get("driver") != "docker" or name == "app":  # "app": the user's own
                continue
            [config] = task["config"]
            image = re.sub(r"\$\{var\.([\w-]+)\}", lambda m: defaults[m[1]], config["image"])
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest" and "/" not in tag, (
                f"{name}: image {image!r} is not pinned to a version")


# -- the pool jobs ---------------------------------------------------------------------------

POOL_JOBS = [p for p in JOB_FILES if p.name.startswith("model-pool")]


@pytest.mark.parametrize("path", POOL_JOBS, ids=[p.name for p in POOL_JOBS])
def test_pool_jobs_can_fetch_gated_weights_and_keep_them(path):
    """Gated weights (meta-llama/…) need a Hugging Face token (from Nomad Variables, as an
    env template) and a cache that outlives the allocation (`volume` + `volume_mount`)."""
    _, job = load_job(path)
    [group] = groups(job).values()
    [task] = tasks(group).values()
    envs = [t for t in task.get("template", []) if t.get("env")]
    assert any("HF_TOKEN=" in t["data"] and "nomadVar" in t["data"] for t in envs)
    volumes = {name for v in group.get("volume", []) for name in v}
    [mount] = task["volume_mount"]
    assert mount["volume"] in volumes
    assert mount["destination"] == "/root/.cache/huggingface"


def test_the_scaler_addresses_the_namespace_the_pool_jobs_run_in():
    """Scale API: a job is looked up in the request's namespace (NOMAD_NAMESPACE); a pool job
    without a `namespace` attribute runs in "default"."""
    _, scaler = load_job(ROOT / "nomad" / "scaler.hcl")
    [env] = tasks(next(iter(groups(scaler).values())))["scaler"]["env"]
    namespace = env.get("NOMAD_NAMESPACE", "default")
    pools = json.loads(env["SIDECAR_SCALER_POOLS"])
    jobs = dict(load_job(path) for path in JOB_FILES)
    for spec in pools.values():
        assert jobs[spec["job"]].get("namespace", "default") == namespace, spec["job"]


def test_an_https_nomad_addr_comes_with_the_ca_that_signed_it():
    """NOMAD_ADDR https:// needs NOMAD_CACERT (a private Nomad PKI) rendered into the task, or
    verification would fail against the servers' certificate."""
    _, scaler = load_job(ROOT / "nomad" / "scaler.hcl")
    [task] = tasks(next(iter(groups(scaler).values()))).values()
    [env] = task["env"]
    if not env["NOMAD_ADDR"].startswith("https://"):
        return
    cacert = env.get("NOMAD_CACERT")
    assert cacert, "NOMAD_ADDR is https:// but NOMAD_CACERT is not set"
    assert cacert in {t["destination"] for t in task.get("template", [])}
