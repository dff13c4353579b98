"""`python -m loraflow.warm_start`: the flow-run command of a process work pool, run in a warm process.

A process worker starts every flow run as a new `python -m prefect.engine`, which then spends ~30 s importing
Unsloth, torch and transformers before the first task. With `loraflow warm-pool` running beside the worker
(loraflow/warm.py), this command instead hands the run to the pool's spare process, which has already imported
them: it sends the spare its environment, working directory and arguments, and passes its standard input, output
and error (SCM_RIGHTS over a Unix socket), so the run's output goes where the worker reads it. It then waits for
the spare to end and exits with its code, forwarding SIGTERM, SIGINT and SIGHUP to the spare's process group (a
cancel reaches the run); if this command is killed, the spare kills its group too (loraflow/warm.py).

Nothing is lost without a pool: when no spare answers at the socket, or the spare was started with another
interpreter or another import-time environment (CUDA_VISIBLE_DEVICES, HF_*, ... see IMPORT_TIME_PREFIXES), this
process becomes `python -m prefect.engine` itself (exec) and says why in one line on stderr.

Deployments use it through the `command` job variable (infra/stack/prefect-local.yaml, prefect.yaml). The socket
is $LORAFLOW_WARM_SOCKET, else /tmp/loraflow-warm-<uid>.sock. Standard library only, so it starts in ~50 ms.
Linux only (SOCK_SEQPACKET); elsewhere it always falls back.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

DEFAULT_MODULE = "prefect.engine"
MESSAGE_BYTES = 1 << 20  # one JSON message: the job's environment is a few KB
HANDSHAKE_SECONDS = 10.0

# Variables that torch, CUDA, transformers, huggingface_hub, Unsloth, Triton and bitsandbytes read when they are
# imported or when CUDA starts: a spare started with other values would run the job with the wrong ones.
IMPORT_TIME_PREFIXES = ("CUDA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "UNSLOTH_", "TORCH", "PYTORCH_", "TRITON_",
                        "BNB_", "XFORMERS_", "OMP_", "MKL_", "LD_")
IMPORT_TIME_NAMES = ("LORAFLOW_CACHE_DIR", "HOME", "XDG_CACHE_HOME", "PYTHONPATH", "PYTHONHOME", "PYTHONNOUSERSITE")
# Credentials are read when used (HF_TOKEN by huggingface_hub at each request), never compared, never printed.
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def socket_path() -> str:
    """The pool's Unix socket: $LORAFLOW_WARM_SOCKET, else /tmp/loraflow-warm-<uid>.sock (at most 107 bytes)."""
    return os.environ.get("LORAFLOW_WARM_SOCKET") or f"/tmp/loraflow-warm-{os.getuid()}.sock"


def import_environment(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that a process has already used once torch, transformers and Unsloth are
    imported; two processes can run the same job only where these agree."""
    return {name: value for name, value in sorted(env.items())
            if (name.startswith(IMPORT_TIME_PREFIXES) or name in IMPORT_TIME_NAMES)
            and not any(word in name for word in SECRET_WORDS)}


def environment_difference(spare: dict[str, str], ours: dict[str, str]) -> str:
    """'' where the two import-time environments agree, else the names that differ, for the log line (names
    only: a value may be a path a user would rather not print, and the line goes to the run's log)."""
    names = sorted(name for name in set(spare) | set(ours) if spare.get(name) != ours.get(name))
    return ", ".join(names)


def peer_user(conn: socket.socket) -> tuple[int, int]:
    """(PID, UID) of the process at the other end of a connected Unix socket, from the kernel (SO_PEERCRED):
    the run's environment holds secrets, so it goes only to a process of the same user."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), from /proc on Linux; None elsewhere."""
    try:
        return os.stat(f"/proc/{pid}").st_ctime
    except OSError:
        return None


def cold_start(module: str, args: list[str], why: str) -> NoReturn:
    """Become `python -m <module> <args>` in this process (same PID, same output), as without a pool."""
    print(f"loraflow warm start: {why}; starting python -m {module} here", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def receive(conn: socket.socket) -> dict[str, Any] | None:
    data = conn.recv(MESSAGE_BYTES)
    return json.loads(data) if data else None


def hand_over(conn: socket.socket, module: str, args: list[str]) -> tuple[int, str]:
    """Offer the job to the spare: (its PID, '') once it has it, else (0, why not) and nothing was handed over."""
    pid, uid = peer_user(conn)
    if uid != os.getuid():
        return 0, f"the process at the socket runs as user {uid}, not {os.getuid()}"
    hello = receive(conn)
    if hello is None:
        return 0, "the warm process closed the connection"
    if os.path.realpath(hello["python"]) != os.path.realpath(sys.executable):
        reason = f"the warm process runs {hello['python']}, this command {sys.executable}"
    else:
        reason = environment_difference(hello["environment"], import_environment(dict(os.environ)))
    if reason:
        conn.send(json.dumps({"decline": reason}).encode())
        return 0, f"the warm process was started with other values of {reason}"
    job = {"module": module, "args": args, "env": dict(os.environ), "cwd": os.getcwd(),
           "started_at": process_start_time(os.getpid())}
    forward_signals(pid)  # from here on a cancel must reach the spare, which may already be running the job
    socket.send_fds(conn, [json.dumps({"job": job}).encode()], [0, 1, 2])
    return pid, ""


FORWARDED: list[int] = []  # the signals forward_signals passed on, in order


def forward_signals(pid: int) -> None:
    """SIGTERM, SIGINT and SIGHUP here go to the spare's process group (the spare leads one): a cancel reaches
    the run and whatever it started, as the worker's signal to this command's group would have."""
    def forward(signum: int, _frame: Any) -> None:
        FORWARDED.append(signum)
        try:
            os.killpg(pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)


def wait_for_exit(conn: socket.socket) -> int:
    """The spare's exit code; the connection closes when the spare's process ends (its socket is not inherited).
    A spare that ended without sending one after a forwarded signal died of it: 128 + the signal's number, as a
    shell reports a process killed by a signal (143 for SIGTERM); otherwise 1."""
    code: int | None = None
    while True:
        try:
            message = receive(conn)
        except InterruptedError:
            continue
        if message is None:
            break
        code = int(message.get("exit", 1))
    if code is not None:
        return code
    return 128 + FORWARDED[-1] if FORWARDED else 1


def main(argv: list[str] | None = None) -> int:
    """argv: [-m MODULE] [ARGS...]; MODULE defaults to prefect.engine (what a process worker runs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    module = DEFAULT_MODULE
    if args[:1] == ["-m"] and len(args) >= 2:
        module, args = args[1], args[2:]
    path = socket_path()
    conn: socket.socket | None = None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.settimeout(HANDSHAKE_SECONDS)
        conn.connect(path)
        pid, reason = hand_over(conn, module, args)
    except (OSError, ValueError, KeyError, AttributeError) as exc:  # no pool, a busy spare, no Unix sockets here
        pid, reason = 0, f"no warm process at {path} ({exc.__class__.__name__}: {exc})"
    if not pid or conn is None:
        if conn is not None:
            conn.close()
        cold_start(module, args, reason)
    conn.settimeout(None)
    return wait_for_exit(conn)


if __name__ == "__main__":
    sys.exit(main())
