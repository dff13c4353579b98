"""`loraflow warm-pool`: keep one process ready with Unsloth (or torch and transformers) imported, for the next run.

Every flow run of a process worker is a new Python process, and a new process pays Unsloth's import (~30 s on the
H200: its patching of transformers, TRL and PEFT) before anything else can happen. The pool keeps a *spare*: a
process started ahead of time that has imported the backend's libraries and waits on a Unix socket. The run's
command, `python -m loraflow.warm_start` (loraflow/warm_start.py), hands it the run; the spare takes the run's
environment, working directory and standard streams, and runs `prefect.engine` exactly as a new process would.
The pool then starts the next spare, which imports while the first run trains. Each run still gets a process of
its own: a spare serves one run and exits with it, so no GPU memory or library state carries over between runs.

What a spare imports is only third-party code (torch, transformers, PEFT, TRL, datasets, Unsloth), never
Prefect (its settings are read from the environment on import) nor the project's own modules (the run imports
the checkout the deployment pulled). A run whose interpreter or import-time environment differs from the
spare's (loraflow/warm_start.py: IMPORT_TIME_PREFIXES) is not handed over; it starts cold, as without a pool.

    spare:  import -> bind the socket -> "ready" -> accept: hello, job + stdin/out/err -> "taken" -> run -> exit
    pool:   start a spare; on "taken" start the next one; on SIGTERM stop the idle spare (runs keep running)
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from importlib import util
from typing import Any

from loraflow.warm_start import MESSAGE_BYTES, import_environment, peer_user, socket_path

log = logging.getLogger("loraflow.warm")

PROJECT_PACKAGES = ("loraflow", "tasks", "flows", "cli")
SPARE_FAILURES_BEFORE_GIVING_UP = 3


def preimport(backend: str) -> list[str]:
    """Import what a run of `backend` (unsloth | transformers | auto) imports before its first step.
    Returns the top-level modules imported. Unsloth first, with the compile cache a cold run would use."""
    import torch

    if backend == "auto":
        backend = "unsloth" if torch.cuda.is_available() and util.find_spec("unsloth") else "transformers"
    if backend == "unsloth":
        from loraflow.compile_cache import use_compile_cache

        from loraflow.logs import root_logging_left_alone

        use_compile_cache()
        with root_logging_left_alone():  # the run's Prefect sets up the console, as in a new process
            import unsloth  # noqa: F401  (before transformers, as in loraflow/backend_unsloth.py)
            from unsloth import FastLanguageModel  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.init()
    if "prefect" in sys.modules:
        raise RuntimeError("a warm process must not import Prefect before its run's environment is set")
    forget_project_modules()
    return sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "peft", "trl", "unsloth",
                                                                   "datasets", "bitsandbytes", "accelerate"})


def forget_project_modules() -> None:
    """Drop loraflow's own modules, so the run imports them from its own checkout (sys.path[0] = its cwd)."""
    for name in [name for name in sys.modules if name.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]


def listen(path: str) -> socket.socket:
    """Bind the socket under a temporary name and rename it into place: a client never finds a half-made one,
    and a spare that replaces a taken one never unlinks its successor's socket."""
    staging = f"{path}.{os.getpid()}"
    if os.path.exists(staging):
        os.unlink(staging)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(staging)
    os.chmod(staging, 0o600)  # who can connect can run code as this user
    server.listen(4)
    os.replace(staging, path)
    return server


def serve_one_run(path: str, backend: str) -> int:
    """The spare: import, then wait for one run, run it, and return its exit code."""
    started, before = time.time(), dict(os.environ)
    imported = preimport(backend)
    ready_at = time.time()
    set_by_imports = {name: value for name, value in os.environ.items() if before.get(name) != value}
    server = listen(path)
    say(f"ready {os.getpid()} {', '.join(imported)} in {ready_at - started:.1f} s")
    hello = {"python": sys.executable, "environment": import_environment(before)}  # what the command compares
    pool = os.getppid()
    server.settimeout(2.0)
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != pool:  # the pool was killed: an idle spare has no one to serve
                return 0
            continue
        job, fds = offer(conn, hello)
        if job is not None:
            break
        conn.close()
    server.close()
    say("taken")
    return run_job(conn, job, fds, ready_at, set_by_imports)


def offer(conn: socket.socket, hello: dict[str, Any]) -> tuple[dict[str, Any] | None, list[int]]:
    """One client: the hello, then its job and its three standard streams, or its reason to decline."""
    try:
        if peer_user(conn)[1] != os.getuid():  # the socket is mode 600; and the kernel says who connected
            log.warning("a process of another user connected; refused")
            return None, []
        conn.settimeout(10)
        conn.send(json.dumps(hello).encode())
        data, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_BYTES, 3)
        message = json.loads(data) if data else {}
    except (OSError, ValueError) as exc:
        log.warning("a client left before handing over a run: %s", exc)
        return None, []
    if "job" not in message or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        log.info("a run started cold instead: %s", message.get("decline", "no job sent"))
        return None, []
    conn.settimeout(None)
    return message["job"], fds


def say(line: str) -> None:
    """One line to the pool, on the spare's own stdout (the pool reads it until the run's streams replace it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def adopt(job: dict[str, Any], fds: list[int], ready_at: float, set_by_imports: dict[str, str]) -> None:
    """Become the process the run's command would have started: its streams, cwd and sys.path[0], and its
    environment as it would be after the same imports there (Unsloth and torch set variables they read later)."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(job["env"])
    os.environ.update(set_by_imports)
    if job.get("started_at"):
        os.environ["LORAFLOW_PROCESS_STARTED_AT"] = str(job["started_at"])  # loraflow/timeline.py
    os.environ["LORAFLOW_WARM_READY_AT"] = str(ready_at)
    os.chdir(job["cwd"])
    sys.path[0] = job["cwd"]  # what `python -m` puts first: the run's checkout, not the pool's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_job(conn: socket.socket, job: dict[str, Any], fds: list[int], ready_at: float,
            set_by_imports: dict[str, str]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    adopt(job, fds, ready_at, set_by_imports)
    finished = threading.Event()
    threading.Thread(target=end_if_orphaned, args=(conn, finished), daemon=True).start()
    code = run_module(job["module"], job["args"])
    finished.set()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.send(json.dumps({"exit": code}).encode())
    except OSError:
        pass
    return code  # the connection closes when this process ends, which is what the run's command waits for


def run_module(module: str, args: list[str]) -> int:
    """`python -m module args` in this process; its exit code (1 and the traceback for an uncaught exception)."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would print before exiting 1
        traceback.print_exc()
        return 1
    return 0


def end_if_orphaned(conn: socket.socket, finished: threading.Event) -> None:
    """The run's command was killed (the worker's SIGKILL after a cancel's grace period, the OOM killer): die as
    that process died, at once and without clean-up, so the run ends exactly as it would have in a cold process.
    (SIGTERM and SIGINT never kill the command: it forwards them here.)"""
    try:
        while conn.recv(MESSAGE_BYTES):
            pass
    except OSError:
        pass
    if not finished.is_set():
        if os.getpgid(0) == os.getpid():  # the pool starts each spare in a session of its own
            os.killpg(os.getpid(), signal.SIGKILL)  # and what the run started with it, as a group SIGKILL would
        os.kill(os.getpid(), signal.SIGKILL)


class Pool:
    """Keeps one idle spare at `path`, started with this interpreter; the spares' runs are not the pool's to stop."""

    def __init__(self, path: str, backend: str) -> None:
        self.path, self.backend = path, backend
        self.busy: list[subprocess.Popen[str]] = []
        self.idle: subprocess.Popen[str] | None = None
        self.stopping = False

    def start_spare(self) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "loraflow.warm", "--socket", self.path, "--backend", self.backend],
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)

    def run(self) -> None:
        """Until SIGTERM/SIGINT. Raises RuntimeError when SPARE_FAILURES_BEFORE_GIVING_UP spares in a row die
        before they are ready (a broken install: their stderr says why)."""
        failures = 0
        while not self.stopping:
            spare = self.start_spare()
            outcome = self.watch(spare)
            if outcome == "taken":
                spare.stdout.close()  # the spare's stdout is its run's now
                self.busy.append(spare)
                failures = 0
                continue
            if self.stopping:
                break
            failures += 1
            log.error("warm-pool: the spare (pid %d) ended before a run (exit %s)", spare.pid, spare.poll())
            if failures >= SPARE_FAILURES_BEFORE_GIVING_UP:
                raise RuntimeError(f"{failures} spares in a row ended before they were ready; see their errors above")
            time.sleep(2.0 * failures)

    def watch(self, spare: subprocess.Popen[str]) -> str:
        """Read the spare's lines until it says "taken" ('taken') or ends ('ended')."""
        assert spare.stdout is not None
        self.idle = spare
        for line in spare.stdout:
            self.reap()
            log.info("warm-pool: spare %d %s", spare.pid, line.strip())
            if line.strip() == "taken":
                return "taken"
        spare.wait()
        return "ended"

    def reap(self) -> None:
        self.busy = [spare for spare in self.busy if spare.poll() is None]

    def stop(self, *_: Any) -> None:
        """Stop the idle spare (it holds no run) and the loop; spares running a run are left to finish it."""
        self.stopping = True
        idle = self.idle
        if idle is not None and idle.poll() is None and idle not in self.busy:
            try:
                os.killpg(idle.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended meanwhile
                pass


def run_pool(path: str | None = None, backend: str = "auto") -> None:
    """`loraflow warm-pool`: serve spares at `path` (default loraflow.warm_start.socket_path()) until SIGTERM."""
    path = path or socket_path()
    if len(path.encode()) > 107:
        raise ValueError(f"the warm pool's socket path is {len(path.encode())} bytes; Unix sockets allow 107: {path}")
    try:
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).close()
    except (AttributeError, OSError) as exc:
        raise RuntimeError(f"the warm pool needs SOCK_SEQPACKET Unix sockets (Linux): {exc}; runs start cold") from exc
    pool = Pool(path, backend)
    signal.signal(signal.SIGTERM, pool.stop)
    signal.signal(signal.SIGINT, pool.stop)
    log.info("warm-pool: one spare at %s (backend %s, %s)", path, backend, sys.executable)
    try:
        pool.run()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    """The spare's entry point (`python -m loraflow.warm --socket PATH --backend NAME`), started by the pool."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m loraflow.warm")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    return serve_one_run(args.socket, args.backend)


if __name__ == "__main__":
    sys.exit(main())
