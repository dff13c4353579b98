"""The temporary Prefect server that `loraflow run` uses when no PREFECT_API_URL is set, kept out of our signals.

Ctrl-C in a terminal and SIGTERM from a supervisor go to the run's whole process group. Prefect starts its
temporary server as a child in that group, so the server died with the signal, and the flow engine then spent
~45 s retrying to report the run Crashed to it before the process could exit (measured here and on the H200:
a SIGTERM'd `loraflow run` needed SIGKILL after 30 s). Started in a session of its own it outlives the signal,
the run is reported Crashed at once and the process exits; Prefect still stops the server at a normal exit.
Linux asks the kernel to end the server when the run's process dies any other way (SIGKILL, OOM killer), so no
server is left behind; elsewhere Prefect's default (the server in the run's group) is kept.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from loraflow.processes import end_with_parent_sigterm

def start_temporary_server_in_own_session() -> None:
    """Make Prefect (3.9's SubprocessASGIServer) start its temporary server in a session of its own (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api import server

    start_server = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(start_server, "loraflow_own_session", False):
        return

    def run_uvicorn_in_own_session(self: Any) -> subprocess.Popen[Any]:
        popen = server.subprocess.Popen
        server.subprocess.Popen = lambda *args, **kwargs: popen(  # type: ignore[misc]
            *args, **kwargs, start_new_session=True, preexec_fn=end_with_parent_sigterm
        )
        try:
            return start_server(self)
        finally:
            server.subprocess.Popen = popen

    run_uvicorn_in_own_session.loraflow_own_session = True  # type: ignore[attr-defined]
    server.SubprocessASGIServer._run_uvicorn_command = run_uvicorn_in_own_session
