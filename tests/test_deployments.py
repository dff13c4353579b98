"""Deployed for real: `make stack`'s script brings up a Prefect server (SQLite) and an S3 server on free
127.0.0.1 ports, the `gpu` pool, the blocks, `prefect deploy --all` and a worker; then
`prefect deployment run finetune/manual` trains the tiny config into the bucket."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.local_stack import read_env_file, stack_env, stack_script

pytestmark = pytest.mark.slow  # the local stack: Prefect server, nanio, worker

PREFECT = str(Path(sys.executable).parent / "prefect")
BUCKET = "loraflow-deploy-tests"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    state = tmp_path_factory.mktemp("stack")
    env = stack_env(state, BUCKET)
    up = stack_script("up.sh", env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        again = stack_script("up.sh", env)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        keys = read_env_file(state / "s3.env")
        api = f"http://127.0.0.1:{env['LORAFLOW_PREFECT_PORT']}/api"
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{env['LORAFLOW_S3_PORT']}", region_name="us-east-1",
                          aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        cli_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "prefect-home")}
        yield {"state": state, "env": cli_env, "s3": s3, "up": up.stdout}
    finally:
        down = stack_script("down.sh", env, timeout=120)
        pids = [p for p in (state / "pids").glob("*.pid")]
        assert down.returncode == 0 and not pids, down.stdout + down.stderr


def prefect(stack: dict, *args: str, timeout: int = 120) -> str:
    result = subprocess.run([PREFECT, *args], env=stack["env"], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def flow_run_state(stack: dict, run_id: str) -> str:
    import httpx

    response = httpx.get(f"{stack['env']['PREFECT_API_URL']}/flow_runs/{run_id}", timeout=30)
    response.raise_for_status()
    return response.json()["state"]["type"]


def warm_spare_ready(stack: dict, timeout: float = 180) -> None:
    """Until the stack's warm pool (loraflow/warm.py) has a spare with torch and transformers imported."""
    log = stack["state"] / "logs" / "warm-pool.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and " ready " in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"the warm pool had no spare ready within {timeout} s: {log.read_text(errors='replace')}")


def test_manual_deployment_run_completes_into_the_bucket(stack: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = {"output": {"dir": str(out), "store": f"s3://{BUCKET}/runs"}}
    warm_spare_ready(stack)
    started = time.monotonic()
    printed = prefect(stack, "deployment", "run", "finetune/manual",
                      "--param", "config_file=deployments/configs/tiny-cpu.yaml",
                      "--param", f"config={json.dumps(overrides)}")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", printed).group(1)
    state = "SCHEDULED"
    while state not in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} and time.monotonic() - started < 600:
        time.sleep(2)
        state = flow_run_state(stack, run_id)
    wall = time.monotonic() - started
    print(f"deployment run -> {state} in {wall:.1f} s")
    worker_log = (stack["state"] / "logs" / "worker.log").read_text(errors="replace")
    assert state == "COMPLETED", worker_log[-5000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss_last"] < summary["train_loss_first"]
    # It ran in the warm pool's spare: ready (its imports done) before the run was submitted, and the run's
    # command handed over to it, no cold start.
    assert summary["phases"]["warm_process_ready"] < 0 < summary["phases"]["process_started"]
    assert "loraflow warm start:" not in worker_log
    adapter_prefix = summary["adapter_uri"].removeprefix(f"s3://{BUCKET}/")
    manifest = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key=f"{adapter_prefix}/manifest.json")["Body"].read())
    assert "adapter_model.safetensors" in manifest["files"]
    stored = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key=f"runs/summaries/{run_id}.json")["Body"].read())
    assert stored["dataset_sha256"] == summary["dataset_sha256"]
    # The flow runs read the store through the AwsCredentials block: the keys were never in their environment.
    assert read_env_file(stack["state"] / "s3.env")["AWS_SECRET_ACCESS_KEY"] not in worker_log


def test_nightly_deployment_has_its_next_runs_scheduled(stack: dict) -> None:
    import httpx

    api = stack["env"]["PREFECT_API_URL"]
    deployment = httpx.get(f"{api}/deployments/name/finetune/nightly", timeout=30).json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert deployment["concurrency_limit"] == 1 or deployment.get("global_concurrency_limit", {}).get("limit") == 1
    deadline = time.monotonic() + 90
    runs: list = []
    while not runs and time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=30, json={
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        }).json()
        time.sleep(2)
    assert runs, "no scheduled runs for nightly"
    times = sorted(run["expected_start_time"] for run in runs)
    assert all("T03:00:00" in t for t in times)
