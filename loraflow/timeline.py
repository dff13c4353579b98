"""When each phase of a flow run ended, for summary.json's `phases` and the metrics artifact: how long from
`prefect deployment run` (the run's scheduled start) to its process, the backend's import, the dataset, the
model's load, LoRA, the first training step and the end.

Marks are kept per flow run in this process (the steps that make them run in the flow's process); a run outside
Prefect is keyed "local".
"""

from __future__ import annotations

import os
import time

from loraflow.warm_start import process_start_time

_MARKS: dict[str, dict[str, float]] = {}


def run_id() -> str:
    from prefect.runtime import flow_run

    return flow_run.get_id() or "local"


def mark(phase: str, at: float | None = None) -> None:
    """Record that `phase` ended now (or at `at`, epoch seconds) in the current flow run; the first mark wins."""
    _MARKS.setdefault(run_id(), {}).setdefault(phase, time.time() if at is None else at)


def process_started_at() -> float | None:
    """When the run's process started (epoch seconds), from /proc on Linux; None elsewhere. In a warm process
    (loraflow/warm.py), when the run's command started: the warm process itself was ready before."""
    if os.environ.get("LORAFLOW_PROCESS_STARTED_AT"):
        return float(os.environ["LORAFLOW_PROCESS_STARTED_AT"])
    return process_start_time(os.getpid())


def phases(flow_run_id: str) -> dict[str, float]:
    """Seconds from the run's scheduled start (its submission) to the end of each phase, in the order they ended;
    `submitted_at` is epoch seconds. A run in a warm process also has `warm_process_ready`: when that process
    had imported the backend, before the run was submitted (a negative offset)."""
    from prefect.runtime import flow_run

    marks = dict(_MARKS.get(flow_run_id, {}))
    scheduled = flow_run.scheduled_start_time
    submitted = scheduled.timestamp() if scheduled is not None else marks.get("flow_started", time.time())
    started = process_started_at()
    if started is not None:
        marks.setdefault("process_started", started)
    if os.environ.get("LORAFLOW_WARM_READY_AT"):
        marks.setdefault("warm_process_ready", float(os.environ["LORAFLOW_WARM_READY_AT"]))
    offsets = {phase: round(at - submitted, 2) for phase, at in sorted(marks.items(), key=lambda item: item[1])}
    return {"submitted_at": round(submitted, 2), **offsets}
