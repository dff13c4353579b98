"""`loraflow run` stopped by a signal, as a terminal (Ctrl-C) or a supervisor (SIGTERM, SIGKILL) stops it: the
process exits at once, leaves no temporary Prefect server behind, and after a SIGTERM the run is Crashed and the
same command resumes from the last checkpoint (loraflow/temporary_server.py says why the server must not share
the run's process group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TINY_CONFIG, run_cli, without_session_server

pytestmark = [
    pytest.mark.slow,  # training runs, stopped and started again
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the server's parent-death signal is Linux's"),
]


def start_run(work: Path) -> tuple[subprocess.Popen, list[str]]:
    """A tiny run in a session of its own, without PREFECT_API_URL (so with Prefect's temporary server), read until
    its first checkpoint is in the store."""
    command = [sys.executable, "-m", "cli", "run", "--config", str(TINY_CONFIG), "--output", str(work / "out"),
               "--set", f"output.store={work / 'store'}", "--set", "train.save_steps=20"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=without_session_server(work / "prefect-home"))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "train: checkpoint at step 20" in line:
            break
    assert process.poll() is None, "".join(lines)[-3000:]
    # keep reading: a process whose output pipe is full blocks on its next log line and cannot exit
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def temporary_servers(pid: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(child.cmdline())]


@pytest.mark.parametrize("how", ["SIGTERM to the process group", "SIGKILL to the process"])
def test_a_stopped_run_exits_at_once_leaves_no_server_and_resumes(how: str, tmp_path: Path) -> None:
    process, lines = start_run(tmp_path)
    servers = temporary_servers(process.pid)
    assert len(servers) == 1, "".join(lines)[-3000:]
    stopped_at = time.monotonic()
    if how.startswith("SIGTERM"):
        os.killpg(process.pid, signal.SIGTERM)
    else:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    exited_after = time.monotonic() - stopped_at
    assert exited_after < 30, f"{how}: exited after {exited_after:.1f} s (Prefect's grace before SIGKILL is 30 s)"
    gone, alive = psutil.wait_procs(servers, timeout=15)
    assert not alive, f"{how}: the temporary Prefect server outlived the run"
    if how.startswith("SIGKILL"):
        return  # resuming after a SIGKILL is tests/test_interruptions.py's
    assert any("Crashed('Execution was aborted by a termination signal.')" in line for line in lines), "".join(lines)[-3000:]
    again = run_cli("run", "--config", str(TINY_CONFIG), "--output", str(tmp_path / "out"),
                    "--set", f"output.store={tmp_path / 'store'}", "--set", "train.save_steps=20",
                    temporary_server_home=tmp_path / "prefect-home")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_step"] >= 20
    assert [step for step, _ in summary["train_losses"]] == list(range(1, 121))
