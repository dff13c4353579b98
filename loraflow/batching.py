"""What one optimizer step is made of: micro-batches of examples, padded or packed (padding-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loraflow.config import ModelConfig, TrainSettings
from loraflow.errors import ConfigError


def packing_enabled(train: TrainSettings, supported: bool) -> bool:
    """Packing concatenates short examples; it is only safe where attention respects example boundaries.

    `supported`: the backend's attention keeps examples apart (Unsloth's and flash-attention read the packed
    position ids); plain sdpa/eager attention would let examples see each other, so auto leaves packing off there.
    Raises ConfigError for train.packing true where it is not supported.
    """
    if train.packing == "true" and not supported:
        raise ConfigError(
            "train.packing: true needs backend unsloth or flash-attention (else packed examples attend to each "
            "other); set train.packing to auto or false"
        )
    return train.packing == "true" or (train.packing == "auto" and supported)


@dataclass(frozen=True)
class BatchLayout:
    """What one optimizer step is made of, per rank: micro-batches of examples, each example up to row_tokens long.

    examples per optimizer step = batch_size × accumulation × world_size = the config's per_device_batch_size ×
    gradient_accumulation_steps, whatever the world size."""

    batch_size: int  # examples per micro-batch on each rank (padded rows unpacked, one padding-free row packed)
    accumulation: int  # micro-batches per optimizer step on each rank
    row_tokens: int  # TRL's max_length: the truncation cap of one example
    world_size: int = 1  # ranks (processes, one per GPU) sharing each step

    def describe(self) -> str:
        return (f"{self.batch_size} examples × {self.accumulation} micro-batches × {self.world_size} rank(s) = "
                f"{self.batch_size * self.accumulation * self.world_size} examples per step")


def examples_per_rank(train: TrainSettings, world_size: int) -> int:
    """The config's effective batch (per_device_batch_size × gradient_accumulation_steps) split evenly among ranks.

    Raises ConfigError when it does not split: every rank must see as many examples per step."""
    examples = train.per_device_batch_size * train.gradient_accumulation_steps
    if examples % world_size:
        raise ConfigError(
            f"train.num_devices: an effective batch of {examples} examples (per_device_batch_size "
            f"{train.per_device_batch_size} × gradient_accumulation_steps {train.gradient_accumulation_steps}) does not "
            f"split evenly over {world_size} ranks; make it a multiple of {world_size} or use fewer devices"
        )
    return examples // world_size


def batch_layout(
    train: TrainSettings, model_cfg: ModelConfig, lengths: list[int], packing: bool, world_size: int = 1
) -> BatchLayout:
    """Each rank's share of the step, keeping the config's examples per step on any number of ranks.

    Unpacked: padded rows of up to max_seq_length tokens; each rank takes the largest micro-batch up to
    per_device_batch_size that divides its share, so the accumulation is what is divided among the ranks:
        the notebook's 4 × 4 on 2 GPUs: 16 / 2 = 8 examples per rank = 4 × 2 accumulation on each
    Packed (padding-free): each micro-batch's examples are concatenated into one row with per-example position
    ids, so a row costs its real tokens only. Each rank keeps its share of the step's examples, in the same order
    (max_steps, warm-up and the learning rate keep their meaning; the loss is the unpacked one), but accumulation
    folds into the micro-batch as far as the memory the config already asks for allows:
        tokens per micro-batch ≤ per_device_batch_size × max_seq_length      (4 × 2,048 = 8,192 in the notebook)
        examples per micro-batch = the largest divisor k of the rank's share with k × longest example ≤ that
    The notebook's 4 × 4 of ≤151-token examples: 16 × 151 = 2,416 ≤ 8,192, so one row of ~1,700 real tokens
    per step instead of four rows of ~425: a quarter of the per-micro-batch cost (kernel launches,
    dequantization), which dominates an 8B step this short.
    Raises ConfigError when the effective batch does not split evenly over `world_size` ranks.
    """
    share = examples_per_rank(train, world_size)
    if not packing or not lengths:
        batch_size = max(k for k in range(1, train.per_device_batch_size + 1) if share % k == 0)
        return BatchLayout(batch_size, share // batch_size, model_cfg.max_seq_length, world_size)
    token_budget = train.per_device_batch_size * model_cfg.max_seq_length
    longest = min(max(lengths), model_cfg.max_seq_length)
    # some k ≤ per_device_batch_size always fits (its examples are at most max_seq_length long)
    batch_size = max(k for k in range(1, share + 1) if share % k == 0 and k * longest <= token_budget)
    return BatchLayout(batch_size, share // batch_size, model_cfg.max_seq_length, world_size)


def check_packing(train: TrainSettings, backend: str) -> None:
    """At the flow's door, before any model loads: train.packing true on a backend that cannot pack is a ConfigError."""
    from loraflow.backends import backend_named

    packing_enabled(train, backend_named(backend).SUPPORTS_PACKING)


MEMORISATION_PASSES = 10  # seen more often than this, a small set is learnt by heart rather than the task


def passes_over_data(train: TrainSettings, num_examples: int, steps: int | None = None) -> float:
    """How many times each training example is seen: examples per optimizer step (batch × accumulation; packing
    keeps it) × steps / examples; train.num_epochs when max_steps is unset (max_steps wins, as in the trainer).
    `steps`: the steps a finished run took, instead of the planned train.max_steps. 0.0 for no examples."""
    if num_examples == 0:
        return 0.0
    steps = steps if steps is not None else train.max_steps
    if steps is None:
        return float(train.num_epochs or 0.0)
    return steps * train.per_device_batch_size * train.gradient_accumulation_steps / num_examples


def memorisation_note(train: TrainSettings, num_examples: int, steps: int | None = None) -> str | None:
    """A sentence with the numbers when each training example is seen more than MEMORISATION_PASSES times; else None."""
    passes = passes_over_data(train, num_examples, steps)
    if passes <= MEMORISATION_PASSES:
        return None
    per_step = train.per_device_batch_size * train.gradient_accumulation_steps
    planned = steps if steps is not None else train.max_steps
    how = (f"{planned} steps × {per_step} examples per step / {num_examples} examples" if planned is not None
           else f"train.num_epochs {train.num_epochs:g}")
    fewer = (f", or lower train.max_steps to {math.floor(MEMORISATION_PASSES * num_examples / per_step) or 1}"
             if planned is not None else ", or lower train.num_epochs")
    return (f"each of the {num_examples} training examples is seen {passes:.0f} times ({how}): the adapter will likely "
            f"memorise them rather than learn the task; add data{fewer} for at most {MEMORISATION_PASSES} passes")
