"""The temporary Prefect server that `loraflow run` uses when no PREFECT_API_URL is set, kept out of our signals.

Ctrl-C in a terminal and SIGTERM from a supervisor go to the run's whole process group. Prefect starts its
temporary server as a child in that group, so the server died with the signal, and the flow engine then spent
~45 s retrying to report the run Crashed to it before the process could exit (measured here and on the H200:
a SIGTERM'd `loraflow run` needed SIGKILL after 30 s). Started in a session of its own it outlives the signal,
the run is reported Crashed at once and the process exits; Prefect still stops the server at a normal exit.
Linux asks the kernel to end the server when the run's process dies any other way (SIGKILL, OOM killer), so no
server is left behind; elsewhere Prefect's default (the server in the run's group) is kept.

`loraflow run` also starts that server as soon as its config is read (start_temporary_server_early), so the ~10-20 s
the server takes to boot overlap the data checks and the flow's imports instead of following them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any, Callable

from loraflow.processes import end_with_parent_sigterm


class OwnSessionSubprocess:
    """`subprocess` as prefect.server.api.server sees it: its one Popen, the uvicorn server, starts in a session of
    its own and ends with this process. Only that module's name is replaced, so no other thread's Popen is touched."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802 - subprocess's own name
        return subprocess.Popen(*args, **kwargs, start_new_session=True, preexec_fn=end_with_parent_sigterm)


def start_temporary_server_in_own_session() -> None:
    """Make Prefect (3.9's SubprocessASGIServer) start its temporary server in a session of its own (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api import server

    if not isinstance(server.subprocess, OwnSessionSubprocess):
        server.subprocess = OwnSessionSubprocess()  # type: ignore[assignment]


def start_temporary_server_early() -> Callable[[], None]:
    """Start the temporary server now, in a thread, so that it boots (~10-20 s on a 2-core machine) while this
    process validates its input and imports the flow; returns the function to call before the flow runs, which
    waits until the start has finished. Nothing is started when PREFECT_API_URL names a server or ephemeral mode
    is off.

    The flow's own client then finds Prefect's one SubprocessASGIServer running; a start that failed here is tried
    again by the flow, which reports it. The thread lives as long as the process: the kernel's parent-death signal
    (end_with_parent_sigterm) follows the thread that started the server, not the process. A run that stops before
    its flow (bad input) stops the server at exit (Prefect's atexit) or, killed, by that signal."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return lambda: None
    start_temporary_server_in_own_session()  # here, so the flow's own start (if this one fails) is in one too
    started = threading.Event()

    def boot() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's client starts it again and raises what is wrong
            pass
        finally:
            started.set()
        threading.Event().wait()  # the server's parent thread: it must not end before the process does

    threading.Thread(target=boot, name="prefect-temporary-server", daemon=True).start()
    return started.wait
