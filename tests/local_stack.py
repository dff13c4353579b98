"""The `make stack` scripts, driven from tests: state in a temporary folder, every port free on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.s3_server import free_port

STACK_SCRIPTS = ROOT / "infra" / "stack"


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def stack_env(state: Path, bucket: str, **extra: str) -> dict[str, str]:
    """The environment up.sh/down.sh run with: none of the caller's Prefect or AWS settings leak in."""
    env = {
        **os.environ,
        "LORAFLOW_STACK_DIR": str(state),
        "LORAFLOW_PREFECT_PORT": str(free_port()),
        "LORAFLOW_S3_PORT": str(free_port()),
        "LORAFLOW_BUCKET": bucket,
        "LORAFLOW_BIN": str(Path(sys.executable).parent),
        **extra,
    }
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    return env


def stack_script(name: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK_SCRIPTS / name)], env=env, capture_output=True, text=True, timeout=timeout)
