"""How an optimizer step is laid out (loraflow.batching.batch_layout) and whether it keeps gradient
checkpointing (loraflow.memory.keep_gradient_checkpointing, lora.gradient_checkpointing auto)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraflow.backends import cuda_available
from loraflow.batching import batch_layout
from loraflow.memory import activation_bytes, keep_gradient_checkpointing
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


LLAMA3_8B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
GiB = 2**30


def test_activation_estimate_is_the_documented_arithmetic() -> None:
    # 2 bytes × (8 × 4,096 + 4 × 14,336) = 180,224 bytes per token and layer, × 32 layers
    assert activation_bytes(LLAMA3_8B, 1) == 180_224 * 32
    assert activation_bytes(LLAMA3_8B, 2416) / GiB > 6.2  # above what the H200 measured (+6.2 GiB peak)


def test_short_rows_on_a_large_gpu_drop_checkpointing() -> None:
    # the notebook's packed step (≤2,416 tokens, ~13 GiB estimated) with an H200's ~133 GiB free
    assert not keep_gradient_checkpointing(LLAMA3_8B, 2416, 133 * GiB)


def test_long_batches_or_small_gpus_keep_checkpointing() -> None:
    # 4 × 2,048 tokens: ~44 GiB estimated, more than a quarter of 133 GiB: keep (the 8.5 GiB-peak benchmark)
    assert keep_gradient_checkpointing(LLAMA3_8B, 4 * 2048, 133 * GiB)
    # a 24 GB card with the 8B weights loaded (~17 GiB free): even the short rows keep it
    assert keep_gradient_checkpointing(LLAMA3_8B, 2416, 17 * GiB)


@pytest.mark.skipif(cuda_available(), reason="the CPU's choice; a CUDA box keeps TRL's default")
def test_cpu_trainer_computes_the_loss_without_chunked_recompute(tmp_path) -> None:
    """On a CPU (this suite's machine) the SFT config asks for the plain loss: TRL's chunked default recomputes
    the lm_head under checkpointing, ~40 % slower a step here; padded rows, no TRL bin-packing."""
    import torch

    from loraflow import backend_transformers
    from loraflow.builders import build_sft_config

    cpu_model = SimpleNamespace(device="cpu")
    layout = batch_layout(NOTEBOOK, MODEL, [], packing=False)
    config = build_sft_config(NOTEBOOK, layout, False, torch.float32, backend_transformers.loss_type(cpu_model), False,
                              tmp_path)
    assert config.loss_type == "nll" and config.use_cpu and not config.packing and not config.padding_free


def test_trls_chunked_loss_on_a_transformers_gpu() -> None:
    """Unsloth's own rule ("nll": its fused cross-entropy) is checked where Unsloth imports: tests/test_gpu.py."""
    from loraflow import backend_transformers

    assert backend_transformers.loss_type(SimpleNamespace(device="cuda")) == "chunked_nll"
    assert backend_transformers.loss_type(SimpleNamespace(device="cpu")) == "nll"
