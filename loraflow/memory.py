"""GPU memory for speed: whether a run can keep its activations instead of recomputing them (gradient checkpointing).

Checkpointing costs a second forward pass per step (~30% of an 8B step on an H200, docs/benchmarks.md); short
micro-batches on a large GPU do not need it.
"""

from __future__ import annotations

from typing import Any


def activation_bytes(hf_config: Any, tokens: int) -> int:
    """What a decoder keeps for backward without gradient checkpointing, a deliberate overestimate:
        per token and layer ≈ 2 bytes × (8 × hidden + 4 × intermediate)      (bf16 projection inputs, norms,
                                                                             attention and MLP intermediates)
    Llama-3-8B: 2 × (8 × 4,096 + 4 × 14,336) = 180 KB per token-layer; measured on the H200 (docs/benchmarks.md):
    turning checkpointing off for micro-batches of ≤2,416 tokens raised peak memory by 6.2 GiB, ~100 KB.
    """
    per_token_layer = 2 * (8 * hf_config.hidden_size + 4 * hf_config.intermediate_size)
    return per_token_layer * hf_config.num_hidden_layers * tokens


def keep_gradient_checkpointing(hf_config: Any, micro_batch_tokens: int, free_gpu_bytes: int) -> bool:
    """lora.gradient_checkpointing auto: recompute activations only when keeping them could crowd the GPU.

    Checkpointing costs a second forward pass per step (~30% of an 8B step); short micro-batches on a large GPU
    do not need it. A quarter of the free memory leaves room for the allocator, the loss and generation.
    """
    return activation_bytes(hf_config, micro_batch_tokens) > free_gpu_bytes // 4
