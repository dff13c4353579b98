"""How an optimizer step is laid out (loraflow.batching.batch_layout) and whether it keeps gradient
checkpointing (loraflow.memory.keep_gradient_checkpointing, lora.gradient_checkpointing auto)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraflow.backends import cuda_available
from loraflow.batching import batch_layout
from loraflow.memory import GpuMemory, activation_bytes, keep_gradient_checkpointing
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


H200 = dict(total=int(139.8 * GiB), allocated=int(5.8 * GiB))  # the 8B NF4 model and LoRA loaded


def h200(free_gib: float = 133.0, fraction: float = 1.0) -> GpuMemory:
    return GpuMemory(free=int(free_gib * GiB), fraction=fraction, **H200)


def test_activation_estimate_is_calibrated_on_the_h200_measurements() -> None:
    # 2 bytes × (8 × 4,096 + 4 × 14,336) × 0.65 per token and layer, × 32 layers
    assert activation_bytes(LLAMA3_8B, 1) == int(180_224 * 0.65 * 32)
    # measured 2026-11-30, Unsloth off vs on: 4 × 2,048 +28.2 GiB, 8 × 2,048 +56.4 GiB; the estimate is at most 2 % over
    for tokens, measured_gib in ((4 * 2048, 28.2), (8 * 2048, 56.4)):
        estimate = activation_bytes(LLAMA3_8B, tokens) / GiB
        assert measured_gib <= estimate <= measured_gib * 1.02, (tokens, estimate)


def test_a_large_gpu_drops_checkpointing_for_the_notebooks_and_the_benchmarks_batches() -> None:
    # budget = 133 GiB free - 14 GiB headroom = 119 GiB: the packed notebook step, 4 × 2,048 and 8 × 2,048 all fit
    for tokens in (2416, 4 * 2048, 8 * 2048):
        assert not keep_gradient_checkpointing(LLAMA3_8B, tokens, h200())


def test_checkpointing_stays_on_when_the_memory_is_not_there() -> None:
    # the process capped to 24 GiB (torch.cuda.set_per_process_memory_fraction): 24 - 5.8 - 2.4 = 15.8 GiB < 28.8
    capped = h200(fraction=24 / 139.8)
    assert capped.budget < 16 * GiB
    assert keep_gradient_checkpointing(LLAMA3_8B, 4 * 2048, capped)
    assert not keep_gradient_checkpointing(LLAMA3_8B, 2416, capped)  # the packed notebook step still fits (+8.5 GiB)
    # another process holds most of the GPU: 30 GiB free
    assert keep_gradient_checkpointing(LLAMA3_8B, 4 * 2048, h200(free_gib=30))
    # a 24 GB card with the 8B loaded: long batches keep it
    card = GpuMemory(total=24 * GiB, free=int(17.5 * GiB), allocated=int(5.8 * GiB))
    assert keep_gradient_checkpointing(LLAMA3_8B, 4 * 2048, card)


@pytest.mark.skipif(cuda_available(), reason="the CPU's choice; a CUDA box keeps TRL's default")
def test_cpu_trainer_computes_the_loss_without_chunked_recompute(tmp_path) -> None:
    """On a CPU (this suite's machine) with the loss on every token, the SFT config asks for the plain loss: TRL's
    chunked default recomputes the lm_head under checkpointing, ~40 % slower a step here; padded rows, no TRL
    bin-packing."""
    import torch

    from loraflow import backend_transformers
    from loraflow.builders import build_sft_config

    cpu_model = SimpleNamespace(device="cpu")
    layout = batch_layout(NOTEBOOK, MODEL, [], packing=False)
    loss_type = backend_transformers.loss_type(cpu_model, completion_only_loss=False)
    config = build_sft_config(NOTEBOOK, layout, False, torch.float32, loss_type, False, tmp_path)
    assert config.loss_type == "nll" and config.use_cpu and not config.packing and not config.padding_free


@pytest.mark.parametrize(("device", "completion_only_loss", "expected"), [
    ("cuda", False, "chunked_nll"), ("cuda", True, "chunked_nll"),  # never a 128k vocabulary's logits at once
    ("cpu", False, "nll"),  # every position is labelled: chunking only adds the recompute
    ("cpu", True, "chunked_nll"),  # the prompt tokens never reach the vocabulary
])
def test_trls_chunked_loss_where_it_saves_work(device: str, completion_only_loss: bool, expected: str) -> None:
    """Unsloth's own rule ("nll": its fused cross-entropy) is checked where Unsloth imports: tests/test_gpu.py."""
    from loraflow import backend_transformers

    assert backend_transformers.loss_type(SimpleNamespace(device=device), completion_only_loss) == expected
