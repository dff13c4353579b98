"""GPU memory for speed: whether a run keeps its activations instead of recomputing them (gradient checkpointing).

Checkpointing costs a second forward pass per step: on an H200, 8B NF4 LoRA r16, 4 × 2,048 tokens, 10,738 tokens/s
with Unsloth's checkpointing against 15,219 without (docs/benchmarks.md, 2026-11-30). So `lora.gradient_checkpointing:
auto` turns it off whenever the activations of the run's largest micro-batch fit in the memory the GPU has left,
measured when training starts, after a headroom; else it stays on, as on a small GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GiB = 2**30
# The decoder's saved activations per token and layer, 2 bytes × (8 × hidden + 4 × intermediate) (bf16 projection
# inputs, norms, attention and MLP intermediates), scaled to what the H200 measured for Llama-3-8B under Unsloth:
#   4 × 2,048 tokens: peak 36.0 GiB off vs 7.8 GiB on = 28.2 GiB / (8,192 tokens × 32 layers) = 115.5 KB
#   8 × 2,048 tokens: 66.3 GiB vs 9.9 GiB               = 56.4 GiB / (16,384 × 32)          = 115.5 KB
# against the formula's 180.2 KB: 0.641, rounded up.
ACTIVATION_CALIBRATION = 0.65
# Kept free besides the activations: the allocator's fragmentation, the logits of the loss, generation's KV cache
# after training, the optimizer's first step. 10 % of the GPU (14 GiB of an H200), at least 2 GiB.
HEADROOM_FRACTION = 0.10
HEADROOM_MIN_BYTES = 2 * GiB


def activation_bytes(hf_config: Any, tokens: int) -> int:
    """Bytes a Llama-family decoder keeps for backward without checkpointing, for `tokens` tokens in one micro-batch
    (see ACTIVATION_CALIBRATION for the formula and the measurements behind it)."""
    per_token_layer = 2 * (8 * hf_config.hidden_size + 4 * hf_config.intermediate_size) * ACTIVATION_CALIBRATION
    return int(per_token_layer * hf_config.num_hidden_layers * tokens)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as this process may use it, in bytes."""

    total: int  # the device's memory
    free: int  # free on the device now (other processes' use already taken off)
    allocated: int  # this process's tensors now (the model's weights, LoRA)
    fraction: float = 1.0  # torch.cuda.set_per_process_memory_fraction's cap, 1.0 = none

    @property
    def budget(self) -> int:
        """What activations may take: the free memory (or what the process cap leaves), less the headroom."""
        cap = int(self.total * self.fraction)
        usable = min(self.free, cap - self.allocated)
        return usable - max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * cap))


def measure_gpu() -> GpuMemory:
    """The current CUDA device's memory, as torch sees it now."""
    import torch

    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return GpuMemory(total=total, free=free, allocated=torch.cuda.memory_allocated(), fraction=fraction)


def keep_gradient_checkpointing(hf_config: Any, micro_batch_tokens: int, gpu: GpuMemory) -> bool:
    """lora.gradient_checkpointing auto: recompute the activations only when keeping those of the run's largest
    micro-batch (`micro_batch_tokens`, padded rows included) would not fit in the GPU's budget."""
    return activation_bytes(hf_config, micro_batch_tokens) > gpu.budget


def describe_decision(keep: bool, hf_config: Any, micro_batch_tokens: int, gpu: GpuMemory) -> str:
    """The decision with its numbers, for the log and summary.json."""
    return (f"{'on' if keep else 'off'}: activations of a {micro_batch_tokens}-token micro-batch ≈ "
            f"{activation_bytes(hf_config, micro_batch_tokens) / GiB:.1f} GiB, budget {gpu.budget / GiB:.1f} GiB "
            f"({gpu.free / GiB:.1f} GiB free of {gpu.total / GiB:.1f}, cap {gpu.fraction:.2f}, "
            f"{gpu.allocated / GiB:.1f} GiB allocated, headroom kept)")
