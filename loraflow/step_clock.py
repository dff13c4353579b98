"""Wall time and real tokens of every optimizer step, and peak memory: what throughput figures are made of."""

from __future__ import annotations

import resource
import time
from typing import Any

from loraflow.logs import run_logger


class StepClock:
    """Wall time and real tokens of every optimizer step, without a host-device sync per micro-batch.

    Tokens are counted on the CPU as the collator builds each micro-batch (attention-mask sum when padded,
    every token when packed or padding-free); the clock syncs CUDA once per optimizer step, where the
    trainer's loss logging syncs anyway.
    """

    def __init__(self, device: str):
        self.device = device
        self.batch_tokens: list[int] = []  # per micro-batch, in the order the collator built them
        self.step_ends: list[float] = []
        self.micro_batches_at_step: list[int] = []
        self.micro_batches = 0
        self.started = 0.0
        self.loop_began = 0.0  # the trainer's on_train_begin: its optimizer, data loader and set-up done

    def count_tokens(self, collator: Any) -> None:
        build = collator.torch_call

        def torch_call(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = build(examples)
            mask = batch.get("attention_mask")
            self.batch_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
            return batch

        collator.torch_call = torch_call

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.loop_began = time.perf_counter()

            def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.micro_batches += 1

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.micro_batches += 1
                clock.step_ended()

        return Callback()

    def start(self) -> None:
        self.started = time.perf_counter()

    def step_ended(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.micro_batches_at_step.append(self.micro_batches)
        if len(self.step_ends) == 1:
            run_logger().info("train: step 1 done %.1f s after train() began (data, compilation, warm-up)",
                              self.step_ends[0] - self.started)

    def step_seconds(self) -> list[float]:
        ends = [self.started, *self.step_ends]
        return [b - a for a, b in zip(ends, ends[1:])]

    def setup_seconds(self) -> float:
        """Seconds from start() to the trainer's loop beginning (0.0 where it never began, e.g. a finished resume)."""
        return max(0.0, self.loop_began - self.started) if self.loop_began else 0.0

    def finish_seconds(self, ended: float) -> float:
        """Seconds from the last step's end to `ended` (perf_counter; the final checkpoint is most of it)."""
        return max(0.0, ended - self.step_ends[-1]) if self.step_ends else 0.0

    def step_tokens(self) -> list[int]:
        bounds = [0, *self.micro_batches_at_step]
        return [sum(self.batch_tokens[a:b]) for a, b in zip(bounds, bounds[1:])]


def peak_memory_bytes(device: str) -> int:
    """Bytes: the peak CUDA allocation since the last reset on a GPU; the process's peak resident set on a CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
