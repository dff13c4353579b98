"""Live progress of training: a Prefect progress artifact for the UI and a progress bar for the terminal.

The artifact is updated at least every UPDATE_EVERY_PERCENT of the run (more often would be an API call per
step for nothing); the bar shows the last logged loss and real tokens/s since train() began.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable
from uuid import UUID

PROGRESS_ARTIFACT_KEY = "finetune-train-progress"
UPDATE_EVERY_PERCENT = 5.0


def report_due(step: int, max_steps: int, last_reported: float) -> bool:
    """Report now when the next step would take the progress more than UPDATE_EVERY_PERCENT past the last report:
    so no two reports are further apart than that (unless one step alone is), and the last step always reports."""
    if step >= max_steps:
        return True
    return 100.0 * (step + 1) / max_steps - last_reported > UPDATE_EVERY_PERCENT


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class ProgressArtifact:
    """A Prefect progress artifact (0-100 %), created only inside a flow or task run."""

    def __init__(self, description: str):
        from prefect.artifacts import create_progress_artifact

        self.id: UUID = create_progress_artifact(0.0, key=PROGRESS_ARTIFACT_KEY, description=description)
        self.percent = 0.0

    def update(self, percent: float) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.id, percent)
        self.percent = percent


def train_progress_callback(tokens_seen: Callable[[], int] | None = None, file: Any = None) -> Any:
    """A transformers TrainerCallback; `tokens_seen` counts the real tokens trained on so far (for tokens/s)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar: Any = None
            self.artifact: ProgressArtifact | None = None
            self.started = 0.0
            self.tokens_at_start = 0
            self.loss: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self.tokens_at_start = tokens_seen() if tokens_seen else 0
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            file=file or sys.stderr, dynamic_ncols=True, mininterval=0.5)
            if in_prefect_run():
                self.artifact = ProgressArtifact(f"train: {state.max_steps} optimizer steps")
                if state.global_step:  # resumed mid-run
                    self.artifact.update(100.0 * state.global_step / state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # the trainer logs after on_step_end: the bar shows this step's loss
                self.loss = float(logs["loss"])
                self.bar.set_postfix_str(self.postfix(), refresh=False)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step, max_steps = state.global_step, state.max_steps
            self.bar.update(step - self.bar.n)
            if self.artifact and report_due(step, max_steps, self.artifact.percent):
                self.artifact.update(100.0 * step / max_steps)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.close()  # draws the bar one last time

        def postfix(self) -> str:
            elapsed = time.perf_counter() - self.started
            parts = [] if self.loss is None else [f"loss={self.loss:.4f}"]
            if tokens_seen and elapsed > 0:
                parts.append(f"tok/s={(tokens_seen() - self.tokens_at_start) / elapsed:.0f}")
            return ", ".join(parts)

    return TrainProgress()
