"""Read what a flow run left in Prefect (its state, its artifacts) through Prefect's own client.

`loraflow run` in a subprocess and the test process share PREFECT_HOME (see conftest), so a Prefect server
started here serves the same database once the run's process has exited. The reader starts and stops that
server itself: the ephemeral one that a bare get_client() starts is stopped at interpreter exit, after
pytest has closed the stream its shutdown logs to.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

STARTUP_TIMEOUT_SECONDS = 120  # a fresh database's migrations on a busy 2-core machine (as in cli/main.py)


class PrefectReader:
    """`with PrefectReader() as prefect: prefect.artifacts(run_id)`: a server on this session's database, for as
    long as the block lasts. Start it only after the run's process has exited: two servers on one SQLite file
    would contend for its lock."""

    def __enter__(self) -> "PrefectReader":
        from prefect.server.api.server import SubprocessASGIServer

        self.server = SubprocessASGIServer()
        self.server.start(timeout=STARTUP_TIMEOUT_SECONDS)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()

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
