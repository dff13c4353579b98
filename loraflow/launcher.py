"""One training on several GPUs of a host: the same TrainSpec in N processes, data parallel (DDP).

`accelerate launch` starts the ranks (Unsloth's documented multi-GPU path); each loads the 4-bit model on its
own GPU (device_map={"": local_rank}), attaches LoRA and trains its share of every optimizer step
(loraflow.batching.batch_layout); gradients are averaged by DDP through NCCL (gloo on a CPU). Rank 0 alone
publishes checkpoints and the adapter. The ranks inherit this process's environment unchanged (on the device
machines that carries NCCL_NVLS_ENABLE=0 and the other multicast switches).

Failures keep the rules of the in-process step: a rank's out-of-memory or input error fails the step at once,
a transient one (the store's endpoint) is retried by the task, and a rank that dies makes the launcher end the
others (torch elastic), so the step fails instead of waiting for the collective timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from loraflow.errors import TrainingOutOfMemoryError
from loraflow.logs import run_logger
from loraflow.processes import end_with_parent_sigterm
from loraflow.prompts import Prompts, store_prompts
from loraflow.store import open_store
from loraflow.training import AdapterRef, TrainSpec


class TrainingRankError(RuntimeError):
    """A training rank failed or died; the message says which and why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(spec_file: Path, results: Path, world_size: int) -> list[str]:
    """accelerate launch of `python -m loraflow.training <spec> <results>` in `world_size` ranks on this host."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(world_size), "--num_machines", "1",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        # precision and compilation are the trainer's settings (SFTConfig), not the launcher's
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "loraflow.training", str(spec_file), str(results),
    ]


def launch_training(spec: TrainSpec, prompts: Prompts) -> AdapterRef:
    """Train `spec` in spec.world_size processes and return the adapter rank 0 published.

    Raises TrainingOutOfMemoryError or a ConfigError-like input error as the rank raised it (never retried),
    ConnectionError for a transient failure (retried by the task), TrainingRankError for anything else,
    including a rank that died without a word (a signal)."""
    log = run_logger()
    # the ranks read the prompt set from the store, under its content key
    spec = spec.model_copy(update={"prompts_key": store_prompts(open_store(spec.store_uri), prompts)})
    with tempfile.TemporaryDirectory(prefix="loraflow-ranks-") as work:
        spec_file, results = Path(work) / "spec.json", Path(work)
        spec_file.write_text(spec.model_dump_json())
        command = launch_command(spec_file, results, spec.world_size)
        log.info("train: %d ranks via accelerate launch (%s)", spec.world_size, " ".join(command[1:6]))
        # The launcher dies with this process (a killed worker, a cancelled run), and each rank with the launcher
        # (loraflow.training.main): no rank is ever left holding a GPU.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "TQDM_DISABLE": "1"}, preexec_fn=end_with_parent_sigterm)
        try:
            for line in process.stdout:  # the ranks' log, as it comes
                log.info("%s", line.rstrip())
            code = process.wait()
        finally:  # this step was interrupted (cancelled): take the ranks down with it
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        if code == 0 and (results / "adapter.json").is_file():
            return AdapterRef.from_dict(json.loads((results / "adapter.json").read_text()))
        raise rank_failure(results, code)


def rank_failure(results: Path, code: int) -> Exception:
    """The error to fail the step with, from what the failed ranks wrote (loraflow.training.describe_failure)."""
    from loraflow.errors import LoraflowInputError

    failures = sorted(results.glob("error-rank*.json"))
    if not failures:
        return TrainingRankError(f"a training rank died without reporting an error (launcher exit {code}); "
                                 "see the ranks' log above")
    first = json.loads(failures[0].read_text())
    where = f"{failures[0].stem.removeprefix('error-')}: {first['type']}: {first['message']}"
    if first["kind"] == "out_of_memory":
        return TrainingOutOfMemoryError(where)
    if first["kind"] == "input":
        return LoraflowInputError(where)
    if first["kind"] == "transient":
        return ConnectionError(where)
    return TrainingRankError(where)
