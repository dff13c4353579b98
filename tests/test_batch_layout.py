"""How an optimizer step's examples become micro-batches (loraflow.builders.batch_layout)."""

from __future__ import annotations

from loraflow.builders import batch_layout
from loraflow.config import ModelConfig, TrainSettings

NOTEBOOK = TrainSettings(per_device_batch_size=4, gradient_accumulation_steps=4, max_steps=60)
MODEL = ModelConfig(name="loraflow:tiny-llama", max_seq_length=2048)


def test_unpacked_keeps_the_configured_batch_and_accumulation() -> None:
    layout = batch_layout(NOTEBOOK, MODEL, [105, 151, 61], packing=False)
    assert (layout.batch_size, layout.accumulation, layout.row_tokens) == (4, 4, 2048)


def test_packed_short_examples_fold_the_step_into_one_row() -> None:
    # 16 × 151 = 2,416 tokens at most ≤ 4 × 2,048: the notebook's whole step fits one padding-free row
    layout = batch_layout(NOTEBOOK, MODEL, [61, 105, 151] * 20, packing=True)
    assert (layout.batch_size, layout.accumulation) == (16, 1)


def test_packed_long_examples_fold_only_as_far_as_the_configured_memory() -> None:
    # 16 examples of up to 1,000 tokens: 8 × 1,000 ≤ 8,192 < 16 × 1,000, so 8 per row, 2 rows per step
    layout = batch_layout(NOTEBOOK, MODEL, [1000, 400], packing=True)
    assert (layout.batch_size, layout.accumulation) == (8, 2)


def test_packed_full_length_examples_keep_the_configured_layout() -> None:
    layout = batch_layout(NOTEBOOK, MODEL, [5000], packing=True)  # truncated to 2,048: only 4 fit
    assert (layout.batch_size, layout.accumulation) == (4, 4)


def test_examples_per_step_never_change() -> None:
    odd = TrainSettings(per_device_batch_size=3, gradient_accumulation_steps=5, max_steps=10)
    for lengths in ([10], [700], [2048], [1500, 20]):
        layout = batch_layout(odd, MODEL, lengths, packing=True)
        assert layout.batch_size * layout.accumulation == 15
