"""The warm pool (loraflow/warm.py) and the run command that uses it (loraflow/warm_start.py), as real processes:
`loraflow warm-pool` started as a worker host starts it, and `python -m loraflow.warm_start -m <module>` started as
the process worker starts a run (here with a probe module in place of prefect.engine, so each assertion can see the
process it ran in). A deployment run through the pool is in tests/test_deployments.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROBE = '''
import json, os, signal, subprocess, sys, time
child = subprocess.Popen(["sleep", "120"]) if "sleep" in sys.argv else None  # something the run started
seen = {"child": child.pid if child else None, "pid": os.getpid(), "preloaded": sorted(m for m in ("torch", "transformers", "trl", "peft", "prefect", "loraflow")
                                             if m in sys.modules),
        "cwd": os.getcwd(), "value": os.environ.get("PROBE_VALUE"), "argv": sys.argv[1:], "path0": sys.path[0],
        "started_at": os.environ.get("LORAFLOW_PROCESS_STARTED_AT"), "ready_at": os.environ.get("LORAFLOW_WARM_READY_AT"),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "has_token": "HF_TOKEN" in os.environ}
def on_term(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(143)
if "default-sigterm" not in sys.argv:  # installed before the line the test waits for, which then may signal
    signal.signal(signal.SIGTERM, on_term)
print(json.dumps(seen), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if "sleep" in sys.argv:
    time.sleep(120)
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
'''


@pytest.fixture(scope="module")
def pool() -> Iterator[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="lfw-", dir="/tmp"))  # a Unix socket path has at most 107 bytes
    socket = folder / "warm.sock"
    env = {**os.environ, "LORAFLOW_WARM_SOCKET": str(socket)}
    # This test process may have imported torch already, which sets its Inductor cache folder here: the pool and
    # the runs start without it, as from a worker's shell.
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    process = subprocess.Popen([sys.executable, "-m", "cli", "warm-pool"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=open(folder / "pool.log", "w"), start_new_session=True)
    work = folder / "run"
    work.mkdir()
    (work / "probe.py").write_text(PROBE)
    state = {"process": process, "socket": socket, "env": env, "work": work, "log": folder / "pool.log"}
    idle_spare(state)
    yield state
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


def spare_lines(state: dict[str, Any], what: str) -> list[int]:
    """PIDs of the pool's spares that logged `what` (ready | taken), in order."""
    return [int(line.split()[4]) for line in state["log"].read_text().splitlines()
            if line.split()[5:6] == [what]]


def idle_spare(state: dict[str, Any], timeout: float = 180) -> int:
    """The PID of the pool's idle spare once it is ready (its imports done, its socket bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, taken = spare_lines(state, "ready"), spare_lines(state, "taken")
        if len(ready) > len(taken):
            return ready[-1]
        assert state["process"].poll() is None, state["log"].read_text()
        time.sleep(0.2)
    raise AssertionError(f"no spare ready within {timeout} s: {state['log'].read_text()}")


def start_run(state: dict[str, Any], *args: str, **env: str) -> subprocess.Popen[str]:
    """The run's command as a process worker starts it: its own pipes, the worker's environment plus the run's."""
    return subprocess.Popen([sys.executable, "-m", "loraflow.warm_start", "-m", "probe", *args], cwd=state["work"],
                            env={**state["env"], "PROBE_VALUE": "run-value", **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen[str], timeout: float = 60) -> tuple[int, dict[str, Any], str, str]:
    out, err = run.communicate(timeout=timeout)
    first = out.splitlines()[0]
    return run.returncode, json.loads(first), out, err


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_run_handed_to_the_spare_runs_there_with_its_environment_streams_and_exit_code(pool: dict) -> None:
    spare = idle_spare(pool)
    run = start_run(pool, "first", "3")
    code, seen, out, err = finish(run)
    assert seen["pid"] == spare != run.pid  # it ran in the spare, not in a new interpreter
    # The spare imported the heavy libraries before the run and none of Prefect or the project (the run imports
    # those itself, from its own checkout and with its own settings).
    assert {"torch", "transformers", "trl", "peft"} <= set(seen["preloaded"])
    assert "prefect" not in seen["preloaded"] and "loraflow" not in seen["preloaded"]
    # The run's environment, working directory, sys.path[0], arguments, both streams and exit code.
    assert seen["value"] == "run-value" and seen["argv"] == ["first", "3"]
    assert seen["cwd"] == str(pool["work"]) == seen["path0"]
    # What the imports set in the environment stays set, as in a process that imported them itself (torch's
    # Inductor sets its cache folder; Unsloth sets variables it reads again at load).
    assert "TORCHINDUCTOR_CACHE_DIR" not in pool["env"] and seen["inductor_cache"]
    assert "to stderr" in err and "loraflow warm start" not in err
    assert code == 3
    # The timeline's process start is the command's, and the spare was ready before it.
    assert float(seen["ready_at"]) <= float(seen["started_at"]) <= time.time()


def test_the_pool_starts_the_next_spare_for_the_next_run(pool: dict) -> None:
    spare = idle_spare(pool)
    code, first, _, _ = finish(start_run(pool, "0"))
    assert first["pid"] == spare and code == 0
    following = idle_spare(pool)
    code, second, _, _ = finish(start_run(pool, "0"))
    assert second["pid"] == following != spare and code == 0


def test_sigterm_to_the_command_reaches_the_run_and_what_it_started(pool: dict) -> None:
    spare = idle_spare(pool)
    run = start_run(pool, "sleep")
    seen = json.loads(run.stdout.readline())
    assert seen["pid"] == spare
    run.send_signal(signal.SIGTERM)  # what a cancel sends the run's process group
    out, _ = run.communicate(timeout=30)
    assert "got SIGTERM" in out and run.returncode == 143
    deadline = time.monotonic() + 10
    while not (gone(spare) and gone(seen["child"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(spare) and gone(seen["child"])


def test_a_run_that_died_of_a_forwarded_signal_exits_as_a_shell_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow import warm_start
    import socket

    monkeypatch.setattr(warm_start, "FORWARDED", [signal.SIGTERM])
    command, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare.close()  # the spare died of the SIGTERM it was sent, with no exit code of its own
    assert warm_start.wait_for_exit(command) == 128 + signal.SIGTERM == 143
    command, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare.send(json.dumps({"exit": 0}).encode())  # it handled the signal and finished cleanly
    spare.close()
    assert warm_start.wait_for_exit(command) == 0
    monkeypatch.setattr(warm_start, "FORWARDED", [])
    command, spare = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spare.close()  # it vanished unsignalled (the OOM killer): a failure, never a success
    assert warm_start.wait_for_exit(command) == 1


def test_sigkill_to_the_command_ends_the_run_at_once(pool: dict) -> None:
    spare = idle_spare(pool)
    run = start_run(pool, "sleep")
    seen = json.loads(run.stdout.readline())
    assert seen["pid"] == spare
    run.kill()  # the OOM killer, or the worker's SIGKILL after a cancel's grace period
    run.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not (gone(spare) and gone(seen["child"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(spare), "the spare kept running a run whose process was killed"
    assert gone(seen["child"]), "what the run started outlived it"


def test_a_run_with_another_import_time_environment_starts_cold_and_says_why(pool: dict) -> None:
    spare = idle_spare(pool)
    run = start_run(pool, "0", CUDA_VISIBLE_DEVICES="7", HF_HOME="/srv/private-hf-home")
    code, seen, _, err = finish(run)
    assert seen["pid"] == run.pid  # the command became the run itself (exec), as without a pool
    assert "other values of CUDA_VISIBLE_DEVICES, HF_HOME" in err and code == 0
    assert "/srv/private-hf-home" not in err  # names, never values
    assert "torch" not in seen["preloaded"]
    # The spare declined and is still there for the next run; a credential of the run's own (read when used,
    # never compared) does not send it elsewhere, and it is in the run's environment, not in its output.
    run = start_run(pool, "0", HF_TOKEN="hf_run_secret_value")
    code, seen, out, err = finish(run)
    assert seen["pid"] == spare and seen["has_token"] and code == 0
    assert "hf_run_secret_value" not in out + err


def test_without_a_pool_the_run_starts_cold_and_says_why(tmp_path: Path) -> None:
    state = {"env": {**os.environ, "LORAFLOW_WARM_SOCKET": str(tmp_path / "none.sock")}, "work": tmp_path}
    (tmp_path / "probe.py").write_text(PROBE)
    run = start_run(state, "5")
    code, seen, _, err = finish(run)
    assert seen["pid"] == run.pid and code == 5
    assert f"no warm process at {tmp_path / 'none.sock'}" in err and "starting python -m probe here" in err


def test_stopping_the_pool_stops_its_idle_spare_and_removes_the_socket(pool: dict) -> None:
    spare = idle_spare(pool)
    pool["process"].send_signal(signal.SIGTERM)
    assert pool["process"].wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while not gone(spare) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(spare) and not pool["socket"].exists()


def test_a_socket_path_too_long_for_unix_sockets_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "cli", "warm-pool", "--socket", "/tmp/" + "x" * 120], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Unix sockets allow 107" in done.stderr.splitlines()[-1]


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to listen as another user")
def test_the_run_environment_goes_to_no_process_of_another_user(tmp_path: Path) -> None:
    """A socket at the pool's path that another user's process listens on (the default path is in /tmp) gets
    no hello answered and nothing of the run: the run's environment holds its secrets."""
    folder = Path(tempfile.mkdtemp(prefix="lfw-", dir="/tmp"))
    folder.chmod(0o777)
    path = folder / "other.sock"
    listener = ("import os, socket, sys, time\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o777)\n"
                "s.listen(1); print('listening', flush=True)\n"
                "c, _ = s.accept(); c.settimeout(5)\n"
                "try:\n    print('received', len(c.recv(1 << 20)), flush=True)\nexcept OSError as e:\n    print('nothing', e, flush=True)\n")
    other = subprocess.Popen([sys.executable, "-c", listener, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "listening"
        (tmp_path / "probe.py").write_text(PROBE)
        state = {"env": {**os.environ, "LORAFLOW_WARM_SOCKET": str(path), "SECRET_FOR_THE_RUN": "s3cr3t"},
                 "work": tmp_path}
        run = start_run(state, "0")
        code, seen, _, err = finish(run)
        assert seen["pid"] == run.pid and code == 0  # the run started cold, here
        assert "runs as user 65534" in err
        assert other.stdout.readline().split()[:2] in (["received", "0"], ["nothing"])  # no job, no environment
    finally:
        other.kill()
        shutil.rmtree(folder, ignore_errors=True)
