"""The image runs as the job files run it: each task's argv (the Dockerfile's ENTRYPOINT
combined with the task's `command`/`args` the way Nomad's docker driver does) is run with
the installed `llm-sidecar`, with the task's own environment rendered; DogStatsD reaches the
agent by the path the job files configure; docs/operations.md tells how to build and reach it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sidecar import __version__
from sidecar.telemetry import Telemetry
from tests.deploy.test_deploy import ROOT, groups, load_job, pools_template, render, tasks
from tests.deploy.test_nomad_rules import variable_defaults
from tests.support.redis_server import free_port

ENTRYPOINT_BINARY = Path(sys.executable).with_name("llm-sidecar")
NODE_IP = "127.0.0.1"  # what ${attr.unique.network.ip-address} renders to, here


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The last ENTRYPOINT or CMD of the final stage, which must use the exec (JSON) form:
    the shell form would run under /bin/sh and get no signals."""
    text = (ROOT / "Dockerfile").read_text()
    final = text.split("\nFROM ")[-1]
    [*_, line] = re.findall(rf"^{instruction}\s+(.+)$", final, flags=re.M)
    value = json.loads(line)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), line
    return value


def task_argv(task: dict[str, Any]) -> list[str]:
    """Docker driver, `entrypoint`/`command`/`args`: `entrypoint` replaces the image's
    ENTRYPOINT; `command` and `args` become the container's Cmd ("if no command is
    specified, the arguments are passed directly to the container"); with neither, the
    image's CMD runs. The process is ENTRYPOINT + Cmd."""
    [config] = task["config"]
    entrypoint = config.get("entrypoint") or dockerfile_exec_form("ENTRYPOINT")
    command = config.get("command")
    args = list(config.get("args", []))
    cmd = ([command] if command else []) + args if (command or args) \
        else dockerfile_exec_form("CMD")
    return [*entrypoint, *cmd]


def sidecar_image_tasks() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(job file:task, task, group) of every task that runs this project's image."""
    out = []
    for path in sorted((ROOT / "nomad").glob("*.hcl")):
        _, job = load_job(path)
        for group in groups(job).values():
            for name, task in tasks(group).items():
                if task.get("config", [{}])[0].get("image") == "${var.sidecar_image}":
                    out.append((f"{path.name}:{name}", task, group))
    return out


TASKS = sidecar_image_tasks()


def interpolate(value: str, task_dir: Path) -> str:
    """Runtime interpolation as Nomad does it for this test's allocation."""
    return (value.replace("${NOMAD_TASK_DIR}", str(task_dir / "local"))
            .replace("${NOMAD_SECRETS_DIR}", str(task_dir / "secrets"))
            .replace("${attr.unique.network.ip-address}", NODE_IP))


def test_the_image_runs_llm_sidecar_in_exec_form():
    assert dockerfile_exec_form("ENTRYPOINT") == ["llm-sidecar"]
    assert dockerfile_exec_form("CMD") == ["serve"]


@pytest.mark.parametrize("where,task,group", TASKS, ids=[t[0] for t in TASKS])
def test_every_task_argv_is_a_valid_invocation_of_the_entrypoint(where, task, group):
    """The argv each task runs, with `--help`: argparse exits 0 only when every word up to
    there is a subcommand and options that exist (`llm-sidecar llm-sidecar wait` exits 2)."""
    argv = task_argv(task)
    assert argv[0] == "llm-sidecar", where
    done = subprocess.run([str(ENTRYPOINT_BINARY), *argv[1:], "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"{where}: {argv} → {done.stderr.strip()}"


def test_the_prestart_gate_fails_cleanly_when_nothing_answers():
    """The `wait-for-sidecar` task's own argv, pointed at a port where nothing listens and
    with a 1 s timeout: exit 1 and one line saying why, no traceback."""
    [(_, task, _)] = [t for t in TASKS if t[0].endswith(":wait-for-sidecar")]
    argv = task_argv(task)
    argv[argv.index("--timeout") + 1] = "1"
    url = argv[argv.index("--url") + 1]
    argv[argv.index("--url") + 1] = re.sub(r":\d+/", f":{free_port()}/", url)
    done = subprocess.run([str(ENTRYPOINT_BINARY), *argv[1:]], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "did not answer 200 within 1" in done.stderr and "Traceback" not in done.stderr


def test_the_sidecar_task_serves_health_with_the_jobs_environment(tmp_path, redis_server):
    """The `sidecar` task's argv and env (Redis and the listen ports moved to loopback ones
    here; the pools file rendered by its template) answers /health, and SIGTERM ends it 0."""
    [(_, task, _)] = [t for t in TASKS if t[0].endswith("sidecar.hcl:sidecar")]
    (tmp_path / "local").mkdir()
    (tmp_path / "secrets").mkdir()
    template, data = pools_template()
    Path(interpolate(template["destination"], tmp_path)).write_text(render(data, {}))
    [env] = task["env"]
    env = {k: interpolate(v, tmp_path) for k, v in env.items()}
    admin = free_port()
    env.update(SIDECAR_LISTEN=f"127.0.0.1:{free_port()}", SIDECAR_ADMIN_LISTEN=f"127.0.0.1:{admin}",
               SIDECAR_REDIS_URL=redis_server.url, PATH=os.environ["PATH"])
    process = subprocess.Popen([str(ENTRYPOINT_BINARY), *task_argv(task)[1:]], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr \
                else "exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "no /health within 30 s"
                time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


@pytest.mark.parametrize("where,task,group", TASKS, ids=[t[0] for t in TASKS])
def test_services_send_dogstatsd_to_the_nodes_agent(where, task, group, tmp_path):
    """In bridge mode 127.0.0.1 is the allocation's own namespace: the agent is reached at
    the node's address (${attr.unique.network.ip-address}, interpolated by Nomad in `env`),
    where a containerised agent accepts DogStatsD from other hosts' namespaces
    (DD_DOGSTATSD_NON_LOCAL_TRAFFIC=true). The env the task gets builds a DogStatsD client."""
    if "wait" in task_argv(task):
        return  # the prestart gate sends no metrics
    [env] = task["env"]
    assert env.get("DD_AGENT_HOST") == "${attr.unique.network.ip-address}", where
    rendered = {k: interpolate(v, tmp_path) for k, v in env.items()}
    telemetry = Telemetry(rendered)
    assert telemetry.datadog_enabled, where
    client = telemetry._client
    assert (client.host, client.port) == (NODE_IP, int(rendered.get("DD_DOGSTATSD_PORT", 8125)))
    telemetry.close()


def test_no_healthcheck_that_only_serve_could_pass():
    """One image runs `serve`, `scaler`, `wait` and `fake-llm`: a HEALTHCHECK probing the
    admin listener would mark every container but `serve` unhealthy forever."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^HEALTHCHECK\s+(?!NONE)", text, flags=re.M)


def test_the_jobs_run_the_image_of_this_version():
    for path in sorted((ROOT / "nomad").glob("*.hcl")):
        image = variable_defaults(path).get("sidecar_image")
        if image is not None:
            assert image.rsplit(":", 1)[1] == __version__, path.name


def test_the_operations_guide_says_how_to_build_push_and_reach_the_admin_port():
    guide = (ROOT / "docs" / "operations.md").read_text()
    image = variable_defaults(ROOT / "nomad" / "sidecar.hcl")["sidecar_image"]
    assert f"docker build -t {image} ." in guide and f"docker push {image}" in guide
    # The admin port is mapped to a dynamic host port: never a fixed <alloc>:7879.
    assert "<alloc>:7879" not in guide


def test_scaler_check_warns_when_it_would_scale_without_a_token():
    env = {"PATH": os.environ["PATH"], "SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0",
           "SIDECAR_SCALER_POOLS": json.dumps({"small": {
               "job": "llm-small", "group": "server", "min": 1, "max": 2,
               "replica_tokens_per_s": 100, "cold_start_s": 600}}),
           "SIDECAR_SCALER_DRY_RUN": "0"}
    done = subprocess.run([str(ENTRYPOINT_BINARY), "scaler", "--check"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "warning: NOMAD_TOKEN is not set" in done.stderr
    quiet = subprocess.run([str(ENTRYPOINT_BINARY), "scaler", "--check"], capture_output=True,
                           env={**env, "SIDECAR_SCALER_DRY_RUN": "1"}, text=True, timeout=60)
    assert "warning" not in quiet.stderr
