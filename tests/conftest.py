"""Shared test set-up: offline Hugging Face, an isolated Prefect home, the tiny model and demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "deployments" / "configs" / "tiny-cpu.yaml"
DEMO_DATA = ROOT / "data" / "demo" / "sentiment_zh.json"

# Tests never reach the internet: models come from files the project makes or packages ship.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    TOKENIZERS_PARALLELISM="false",
    MLFLOW_DISABLE_TELEMETRY="true",  # MLflow 3 sends usage telemetry by default (tests/test_tracking.py logs to it)
)
# In a pytest-xdist worker, the cores are shared out among the workers: each training (in this process or a
# `loraflow run` it starts) gets cores / workers OpenMP threads. Two 2-thread trainings on 2 cores took 50 s each
# for 40 tiny steps, two 1-thread ones 22 s (docs/benchmarks.md, "The test suite's threads"). A value the caller
# set is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


# The longest files first (seconds of both processes, `pytest --durations`), so that with `make test`'s two processes
# (--dist loadfile hands out whole files in collection order; --no-loadscope-reorder, or pytest-xdist would hand
# out the files with the most tests first) no long file starts last while the other process idles.
LONGEST_FIRST = ["test_s3_cache.py", "test_interruptions.py", "test_data_faults.py", "test_store_faults.py",
                 "test_retrain_e2e.py", "test_webhook_e2e.py", "test_deployments.py", "test_quality_gate.py",
                 "test_chat_data.py", "test_cli_signals.py", "test_bad_data.py", "test_tracking.py",
                 "test_multi_rank.py", "test_retry_wiring.py", "test_tasks.py", "test_warm_start.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whole files reordered, longest first; the tests of a file keep their order (the sort is stable)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(scope="session", autouse=True)
def isolated_prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each test session gets its own Prefect database and settings, never the user's ~/.prefect."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def session_prefect_server(isolated_prefect_home: Path) -> Iterator[str]:
    """One real Prefect server on the session's database, named by PREFECT_API_URL for this process and every
    `loraflow run` it starts (tests/prefect_reads.py says why); tests of the temporary server a run starts without
    it use `without_session_server`."""
    from tests.prefect_reads import start_session_server, stop_session_server

    os.environ["PREFECT_API_URL"] = start_session_server()
    yield os.environ["PREFECT_API_URL"]
    os.environ.pop("PREFECT_API_URL", None)
    stop_session_server()


def without_session_server(prefect_home: Path) -> dict[str, str]:
    """The environment of a `loraflow run` that starts Prefect's temporary server itself, as a user's run without
    PREFECT_API_URL does: no API URL, and a Prefect home (database) of its own."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(prefect_home)}


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 600,
            temporary_server_home: Path | None = None) -> subprocess.CompletedProcess:
    """`loraflow ...` in a fresh interpreter, as a user would run it: reporting to the session's Prefect server, or,
    given `temporary_server_home`, to the temporary server it starts itself on that Prefect home."""
    base = without_session_server(temporary_server_home) if temporary_server_home else os.environ
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny config trained once per session through `loraflow run`, with the quality gate on
    (hub.min_eval_accuracy 0.3, under the tiny config's ~0.56: the random tiny base model scores near chance, so
    beating it by a margin is not something 9 eval rows show) and pushing to the Hub stand-in.
    tests/test_flow.py and tests/test_artifacts.py check this run; tests that need the tiny config's adapter
    already published reuse its store (`work / "store"`, or a copy), where the train key (data bytes, config,
    libraries; not hub.*) finds it."""
    from tests.hub_standin import HubStandIn

    work = tmp_path_factory.mktemp("flow")
    with HubStandIn() as hub:
        result = run_cli(
            "run", "--config", str(TINY_CONFIG), "--output", str(work / "out"),
            "--set", f"output.store={work / 'store'}", "--set", "hub.repo_id=loraflow-tests/tiny-adapter",
            "--set", "hub.min_eval_accuracy=0.3",
            # Offline mode would block even the local stand-in; the models come from local files regardless.
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_sentinel_token_for_tests", "HF_HUB_OFFLINE": "0"},
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    return {"result": result, "summary": summary, "hub": hub.record, "work": work}
