"""A run that stops at its input after Prefect's temporary server began to boot (loraflow/temporary_server.py):
the server is gone at once, nothing it prints follows the run's error, and no later start slips through."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, without_session_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the own-session server is Linux's")

ABANDON_MID_START = textwrap.dedent("""
    import sys, time
    import psutil
    from loraflow.temporary_server import start_temporary_server_early

    server = start_temporary_server_early()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not psutil.Process().children():
        time.sleep(0.05)  # the uvicorn process exists, its start-up has begun
    booting = psutil.Process().children()
    time.sleep(float(sys.argv[1]))
    server.abandon()
    print(f"servers {len(booting)} alive {sum(child.is_running() for child in booting)}", flush=True)
    print("error: the run's own last line", file=sys.stderr, flush=True)
    sys.exit(2)
""")


@pytest.mark.parametrize("seconds_into_start", [0.5, 3.0])
def test_abandon_kills_a_booting_server_silently(seconds_into_start: float, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", ABANDON_MID_START, str(seconds_into_start)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env=without_session_server(tmp_path / "prefect-home"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "servers 1 alive 0" in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: the run's own last line", result.stderr[-3000:]


def test_no_server_starts_after_abandon() -> None:
    from loraflow.temporary_server import OwnSessionSubprocess

    processes = OwnSessionSubprocess()
    sleeper = processes.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    processes.kill_servers()
    assert sleeper.returncode == -9
    with pytest.raises(RuntimeError, match="not started"):
        processes.Popen([sys.executable, "-c", "pass"])
