"""Read what a flow run left in Prefect (its state, its artifacts) through Prefect's own client.

Each test process (each pytest-xdist worker) runs one Prefect server on its session's database for the whole
session (tests/conftest.py: session_prefect_server, which sets PREFECT_API_URL): every `loraflow run` the tests
start reports to it, as a user's run reports to their server, and the reader asks it. A server's start costs
~12 s of CPU on this machine; one per `loraflow run` and one more per reader was minutes of the suite. The
temporary server a run starts when no PREFECT_API_URL is set has tests of its own (tests/test_cli_signals.py,
tests/test_temporary_server.py), on a Prefect home of their own: two servers on one SQLite file would contend for
its lock.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

STARTUP_TIMEOUT_SECONDS = 120  # a fresh database's migrations on a busy 2-core machine (as in cli/main.py)

_session_server: Any = None


def start_session_server() -> str:
    """Start this process's Prefect server on PREFECT_HOME's database (once); returns its API URL.
    Raises RuntimeError (Prefect's) when it does not answer within STARTUP_TIMEOUT_SECONDS."""
    global _session_server
    if _session_server is None:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start(timeout=STARTUP_TIMEOUT_SECONDS)
        _session_server = server
    return _session_server.api_url


def stop_session_server() -> None:
    global _session_server
    if _session_server is not None:
        _session_server.stop()
        _session_server = None


class PrefectReader:
    """`with PrefectReader() as prefect: prefect.artifacts(run_id)`: the session's server (started if it is not
    yet), read through Prefect's client."""

    def __enter__(self) -> "PrefectReader":
        start_session_server()
        self.server = _session_server
        return self

    def __exit__(self, *exc: Any) -> None:
        pass  # the server is the session's: session_prefect_server stops it

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.server.api_url)

    def artifacts(self, flow_run_id: str) -> dict[str, Any]:
        """The flow run's artifacts by key."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
            )
        return {artifact.key: artifact for artifact in artifacts}

    def state(self, flow_run_id: str) -> Any:
        with self.client() as client:
            return client.read_flow_run(UUID(flow_run_id)).state

    def task_runs(self, flow_run_id: str) -> list[Any]:
        """The flow run's task runs (each with its name, run_count and final state), oldest first."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.client.schemas.sorting import TaskRunSort

        with self.client() as client:
            return client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])), sort=TaskRunSort.EXPECTED_START_TIME_ASC
            )

    def task_run_states(self, task_run_id: Any) -> list[Any]:
        """Every state the task run went through, as the server recorded them, oldest first."""
        with self.client() as client:
            states = client.read_task_run_states(UUID(str(task_run_id)))
        return sorted(states, key=lambda state: state.timestamp)
