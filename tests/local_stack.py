"""The `make stack` scripts, driven from tests: state in a temporary folder, every port free on 127.0.0.1; and
helpers to start deployment runs, wait for their states and find their processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.conftest import ROOT
from tests.s3_server import free_port

STACK_SCRIPTS = ROOT / "infra" / "stack"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def stack_env(state: Path, bucket: str, **extra: str) -> dict[str, str]:
    """The environment up.sh/down.sh run with: none of the caller's Prefect or AWS settings leak in."""
    env = {
        **os.environ,
        "LORAFLOW_STACK_DIR": str(state),
        "LORAFLOW_PREFECT_PORT": str(free_port()),
        "LORAFLOW_S3_PORT": str(free_port()),
        "LORAFLOW_WEBHOOK_PORT": str(free_port()),  # never up.sh's default 8787: stacks of two test processes meet
        "LORAFLOW_BUCKET": bucket,
        "LORAFLOW_BIN": str(Path(sys.executable).parent),
        **extra,
    }
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    return env


def stack_script(name: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK_SCRIPTS / name)], env=env, capture_output=True, text=True, timeout=timeout)


def start_deployment_run(env: dict[str, str], deployment: str, config_file: str, config: dict[str, Any]) -> str:
    """`prefect deployment run` with a partial config; returns the flow run's id."""
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", deployment,
         "--param", f"config_file={config_file}", "--param", f"config={json.dumps(config)}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert printed.returncode == 0, printed.stdout + printed.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", printed.stdout).group(1)


def set_deployment_parameters(api: str, deployment: str, parameters: dict[str, Any]) -> str:
    """PATCH the parameters of deployment `flow/name`; returns its id. A 503 is retried, as Prefect's own client
    retries it: the server answers 503 when its SQLite database stays locked past its timeout under load."""
    deployment_id = httpx.get(f"{api}/deployments/name/{deployment}", timeout=30).json()["id"]
    for attempt in range(6):
        patched = httpx.patch(f"{api}/deployments/{deployment_id}", timeout=30, json={"parameters": parameters})
        if patched.status_code != 503:
            break
        time.sleep(2 ** attempt)
    assert patched.status_code < 300, patched.text
    return deployment_id


def flow_run_state(api: str, run_id: str) -> str:
    response = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30)
    response.raise_for_status()
    return response.json()["state"]["type"]


def wait_for_state(api: str, run_id: str, wanted: set[str], timeout: float) -> str:
    """Poll until the run reaches one of `wanted` or any terminal state; returns the state type."""
    deadline, state = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        state = flow_run_state(api, run_id)
        if state in wanted | TERMINAL_STATES:
            return state
        time.sleep(1)
    return state


def flow_run_processes(run_id: str) -> list[psutil.Process]:
    """Every process of this flow run: the worker starts it with PREFECT__FLOW_RUN_ID in its environment, and its
    children (data-loader workers, compilers, anything it spawns) inherit that, or are its descendants anyway."""
    found = {}
    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return list(found.values())


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
