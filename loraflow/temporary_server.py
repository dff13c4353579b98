"""The temporary Prefect server that `loraflow run` uses when no PREFECT_API_URL is set, kept out of our signals.

Ctrl-C in a terminal and SIGTERM from a supervisor go to the run's whole process group. Prefect starts its
temporary server as a child in that group, so the server died with the signal, and the flow engine then spent
~45 s retrying to report the run Crashed to it before the process could exit (measured here and on the H200:
a SIGTERM'd `loraflow run` needed SIGKILL after 30 s). Started in a session of its own it outlives the signal,
the run is reported Crashed at once and the process exits; Prefect still stops the server at a normal exit.
Linux asks the kernel to end the server when the run's process dies any other way (SIGKILL, OOM killer), so no
server is left behind; elsewhere Prefect's default (the server in the run's group, started at the flow's first
call) is kept.

On Linux `loraflow run` also starts that server as soon as its config is read (start_temporary_server_early), so
the ~10-20 s the server takes to boot overlap the data checks and the flow's imports instead of following them;
a run whose input is refused kills it (EarlyServer.abandon) before printing its error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from loraflow.processes import end_with_parent_sigterm


class OwnSessionSubprocess:
    """`subprocess` as prefect.server.api.server sees it: its one Popen, the uvicorn server, starts in a session of
    its own and ends with this process. Only that module's name is replaced, so no other thread's Popen is touched.

    kill_servers() ends what it started at once and refuses later starts: a run that stops at its input must not
    leave a server booting, whose interrupted start-up prints errors after the run's own `error:` line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: list[subprocess.Popen[Any]] = []
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802 - subprocess's own name
        """subprocess.Popen in a new session, ended by the kernel when this process dies.
        Raises RuntimeError after kill_servers()."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the temporary server was not started: this run stopped before its flow")
            server = subprocess.Popen(*args, **kwargs, start_new_session=True, preexec_fn=end_with_parent_sigterm)
            self._servers.append(server)
            return server

    def kill_servers(self) -> None:
        """SIGKILL each server started here (its whole session), reap it, and refuse any later start. SIGKILL, not
        Prefect's SIGTERM: a server stopped mid start-up logs "Application shutdown failed" to our stderr; its
        SQLite database is left consistent either way (every write is a transaction)."""
        with self._lock:
            self._closed = True
            for server in self._servers:
                if server.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


def start_temporary_server_in_own_session() -> OwnSessionSubprocess | None:
    """Make Prefect (3.9's SubprocessASGIServer) start its temporary server in a session of its own (Linux only);
    returns the replacement, or None where it does not apply."""
    if not sys.platform.startswith("linux"):
        return None
    from prefect.server.api import server

    if not isinstance(server.subprocess, OwnSessionSubprocess):
        server.subprocess = OwnSessionSubprocess()  # type: ignore[assignment]
    return server.subprocess


class EarlyServer:
    """The temporary server's start, running in a thread (start_temporary_server_early).

    ready(): wait until the start has finished (before the flow runs). abandon(): the run stops before its flow;
    kill the server silently, at whatever point of its start it is."""

    def __init__(self, processes: OwnSessionSubprocess | None = None) -> None:
        self._processes = processes
        self._started = threading.Event()
        if processes is None:
            self._started.set()
            return
        threading.Thread(target=self._boot, name="prefect-temporary-server", daemon=True).start()

    def _boot(self) -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's client starts it again and raises what is wrong
            pass
        finally:
            self._started.set()
        threading.Event().wait()  # the server's parent thread: it must not end before the process does

    def ready(self) -> None:
        self._started.wait()

    def abandon(self) -> None:
        if self._processes is not None:
            self._processes.kill_servers()


def start_temporary_server_early() -> EarlyServer:
    """Start the temporary server now, in a thread, so that it boots (~10-20 s on a 2-core machine) while this
    process validates its input and imports the flow. Nothing is started when PREFECT_API_URL names a server,
    ephemeral mode is off, or the platform is not Linux (where the server could not be kept out of our signals).

    The flow's own client then finds Prefect's one SubprocessASGIServer running; a start that failed here is tried
    again by the flow, which reports it. The thread lives as long as the process: the kernel's parent-death signal
    (end_with_parent_sigterm) follows the thread that started the server, not the process. A run that stops before
    its flow (bad input) calls EarlyServer.abandon."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return EarlyServer()
    return EarlyServer(start_temporary_server_in_own_session())
