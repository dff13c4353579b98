"""Retries as wired into the flow, not only the classifier (tests/test_retries.py): a real Prefect server records
every attempt, and the faults are real ones (an HTTP dataset server that answers 503 or hangs up once).

Each case runs the finetune flow in a fresh interpreter (`finetune(config=..., config_file=...)`, the deployment's
way in) against a Prefect server this module starts, then reads the task runs' run_count and state history
back through Prefect's client. The flow is called directly rather than through `loraflow run`, whose
preflight reads the dataset before the flow starts and would take the first fault itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEMO_DATA, ROOT, TINY_CONFIG
from tests.prefect_reads import PrefectReader

pytestmark = pytest.mark.slow

RUN_FLOW = """
import json, sys
{preamble}
from flows.finetune import finetune
state = finetune(config=json.loads(sys.argv[2]), config_file=sys.argv[1], return_state=True)
print("FLOW_RUN " + json.dumps({{"id": str(state.state_details.flow_run_id), "type": state.type.value,
                                 "message": state.message}}))
"""

# Every training step raises the error torch raises when CUDA cannot allocate (torch.OutOfMemoryError, the same
# class on a CPU build): patched into transformers' Trainer, which TRL's SFTTrainer.training_step calls through
# super(), in the flow's own process before the flow starts. loraflow's code is untouched.
OUT_OF_MEMORY_IN_EVERY_STEP = """
import torch, transformers
def out_of_memory(self, *args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (raised by the test in a training step)")
transformers.Trainer.training_step = out_of_memory
"""


class DatasetServer:
    """One dataset file over real HTTP on 127.0.0.1. The first requests get `faults`, one each, in order:
    "503" (Service Unavailable) or "hang-up" (the connection closed with no answer); later ones get the file.
    `answers` records what each request got."""

    def __init__(self, body: bytes, faults: list[str], name: str = "dataset.json") -> None:
        self.answers: list[str] = []
        pending, answers = list(faults), self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                fault = pending.pop(0) if pending else None
                answers.append(fault or "200")
                if fault == "hang-up":
                    self.close_connection = True  # nothing written: the client reads no status line
                    return
                status, content = (503, b"busy") if fault == "503" else (200, body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "DatasetServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def prefect() -> Any:
    """A Prefect server on this session's database; the flow runs report to it and the tests read it."""
    with PrefectReader() as reader:
        yield reader


def run_flow(prefect: PrefectReader, config: dict[str, Any], preamble: str = "") -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", RUN_FLOW.format(preamble=preamble), str(TINY_CONFIG), json.dumps(config)],
        cwd=ROOT, env={**os.environ, "PREFECT_API_URL": prefect.server.api_url},
        capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("FLOW_RUN ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return {**json.loads(lines[-1].removeprefix("FLOW_RUN ")), "log": result.stdout + result.stderr}


def only_task_run(prefect: PrefectReader, flow_run_id: str, task: str) -> Any:
    runs = [run for run in prefect.task_runs(flow_run_id) if run.name.rsplit("-", 1)[0] == task]
    assert len(runs) == 1, [run.name for run in prefect.task_runs(flow_run_id)]
    return runs[0]


def state_names(prefect: PrefectReader, task_run: Any) -> list[str]:
    return [state.name for state in prefect.task_run_states(task_run.id)]


@pytest.mark.parametrize("fault", ["hang-up", "503"])
def test_a_network_failure_once_is_retried_and_the_run_completes(
    fault: str, prefect: PrefectReader, tmp_path: Path
) -> None:
    """The tiny config on the demo file's bytes, served over HTTP; 2 training steps and no answers to score (what
    is checked is the fetch: 2 steps give no usable answers, and smoke-infer would rightly fail the run on them)."""
    with DatasetServer(DEMO_DATA.read_bytes(), faults=[fault]) as server:
        run = run_flow(prefect, {"data": {"uri": server.url},
                                 "train": {"max_steps": 2, "save_steps": 2, "warmup_steps": 0},
                                 "infer": {"prompts": [], "max_eval_examples": 0},
                                 "output": {"dir": str(tmp_path / "out"), "store": str(tmp_path / "store")}})
    assert server.answers == [fault, "200"]  # the fault, then one more request that got the file
    assert run["type"] == "COMPLETED", run["log"][-4000:]
    fetch = only_task_run(prefect, run["id"], "fetch-dataset")
    assert fetch.run_count == 2 and fetch.state.is_completed()
    names = state_names(prefect, fetch)
    assert names.count("AwaitingRetry") == 1 and names[-1] == "Completed", names
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset_uri"] == server.url and summary["num_train_examples"] + summary["num_eval_examples"] == 90


def test_a_step_failing_on_bad_input_runs_exactly_once(prefect: PrefectReader, tmp_path: Path) -> None:
    """fetch-dataset has 3 retries for the network; a malformed row is not the network."""
    rows = [{"instruction": "分类以下文本的情感。", "input": "好", "output": "积极"}, {"instruction": "分类", "input": "差"}]
    with DatasetServer(json.dumps(rows, ensure_ascii=False).encode(), faults=[]) as server:
        run = run_flow(prefect, {"data": {"uri": server.url},
                                 "output": {"dir": str(tmp_path / "out"), "store": str(tmp_path / "store")}})
    assert server.answers == ["200"]  # read once, never again
    assert run["type"] == "FAILED" and "row 2: field 'output' is missing" in run["message"], run["log"][-4000:]
    fetch = only_task_run(prefect, run["id"], "fetch-dataset")
    assert fetch.run_count == 1 and fetch.state.is_failed()
    assert "AwaitingRetry" not in state_names(prefect, fetch)
    ran = sorted(task.name.rsplit("-", 1)[0] for task in prefect.task_runs(run["id"]))
    assert ran == ["fetch-dataset", "find-dataset"]  # nothing after the bad input


def test_out_of_memory_in_train_fails_at_once_with_the_advice(prefect: PrefectReader, tmp_path: Path) -> None:
    """train retries transient failures once after 30 s; an out-of-memory error is not one."""
    run = run_flow(prefect, {"train": {"max_steps": 4},
                             "output": {"dir": str(tmp_path / "out"), "store": str(tmp_path / "store")}},
                   preamble=OUT_OF_MEMORY_IN_EVERY_STEP)
    assert run["type"] == "FAILED", run["log"][-4000:]
    message = run["message"]
    assert "CUDA out of memory at train.per_device_batch_size=8 × model.max_seq_length=128" in message
    assert "lower the batch size" in message and "gradient_checkpointing" in message  # the advice
    assert "raised by the test in a training step" in message  # it came from the trainer's step
    train = only_task_run(prefect, run["id"], "train")
    assert train.run_count == 1 and train.state.is_failed()
    assert "AwaitingRetry" not in state_names(prefect, train)
    assert not (tmp_path / "store" / "adapters").exists()  # nothing was published
