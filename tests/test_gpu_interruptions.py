"""GPU tier of the interruption tests: what a cancel does to a training run on a CUDA box, with Unsloth.

`prefect flow-run cancel` ends in SIGTERM to the run's process group (then SIGKILL after 30 s); here that
signal goes to a `loraflow run` started in a session of its own, after its first checkpoint. The process and
its GPU memory must be gone, and the same command again must resume from the checkpoint (Unsloth patches the
trainer: its resume path is not the transformers one the CPU tests cover).

On the GPU machine:  source bench/gpu_env.sh; python3 -m pytest -q -m gpu tests/test_gpu_interruptions.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_CONFIG

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_a_terminated_gpu_run_frees_the_gpu_and_the_rerun_resumes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "cli", "run", "--config", str(TINY_CONFIG), "--output", str(tmp_path / "out"),
               "--set", f"output.store={tmp_path / 'store'}", "--set", "model.backend=unsloth",
               "--set", "model.load_in_4bit=true", "--set", "train.save_steps=20"]
    baseline = gpu_memory_used_mib()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines, used_during = [], 0
    for line in process.stdout:
        lines.append(line)
        if "train: checkpoint at step" in line:
            used_during = gpu_memory_used_mib()
            break
    # (GPU memory, not nvidia-smi's process list: inside a container that list often shows no PIDs)
    assert process.poll() is None and used_during > baseline + 100, "".join(lines)[-5000:]
    # Keep reading its output: a process whose stdout pipe is full blocks on its next log line and cannot exit.
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    group = process.pid
    terminated_at = time.monotonic()
    os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)  # what Prefect does after its 30 s of grace
        process.wait(timeout=30)
    gone_after = time.monotonic() - terminated_at
    time.sleep(2)  # the driver reclaims a dead process's memory as it is reaped
    used_after = gpu_memory_used_mib()
    print(f"SIGTERM -> exited in {gone_after:.1f} s; GPU memory used: {baseline} MiB before the run, "
          f"{used_during} MiB while it trained, {used_after} MiB after")
    assert gone_after < 30
    assert used_after <= baseline + 64

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["backend"] == "unsloth" and summary["resumed_from_step"] >= 20
    assert [step for step, _ in summary["train_losses"]] == list(range(1, 121))
    assert summary["train_losses"][summary["resumed_from_step"]][1] < 0.5 * summary["train_losses"][0][1]
    print(f"resumed from step {summary['resumed_from_step']}; loss {summary['train_loss_first']:.3f} -> "
          f"{summary['train_loss_last']:.3f}")
