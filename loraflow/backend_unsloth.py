"""The Unsloth backend, and the only module that imports Unsloth: its import patches transformers, so nothing
else may trigger it.

The flow imports this module (loraflow.backends.backend_named) first thing when the run's backend is unsloth,
before transformers, TRL or PEFT load, which is the order Unsloth needs to apply all of its kernels.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from loraflow.backends import LiveModel, local_device_index
from loraflow.config import LoraSettings, ModelConfig
from loraflow.logs import root_logging_left_alone, run_logger
from loraflow.compile_cache import use_compile_cache
from loraflow.memory import describe_decision, keep_gradient_checkpointing, measure_gpu
from loraflow.scoring import whole_row_log_likelihoods

use_compile_cache()

with root_logging_left_alone():  # Unsloth's logging.basicConfig would take the place of Prefect's console handler
    import unsloth  # noqa: E402, F401  (must precede transformers; see the module docstring)
    from unsloth import FastLanguageModel  # noqa: E402
    from unsloth.utils import attention_dispatch  # noqa: E402

_UNSLOTH_VARLEN = (attention_dispatch._TORCH_VARLEN_ATTN, attention_dispatch._LEAN_VARLEN,
                   getattr(attention_dispatch, "_varlen_can_use_cudnn", None))


def use_flash_varlen(enabled: bool = True) -> bool:
    """Packed rows through one variable-length flash-attention call per layer, on torch 2.11 too.

    Unsloth 2026.10.9 takes torch's varlen flash kernel only where `torch.nn.attention.varlen.varlen_attn`
    has `enable_gqa` (torch >= 2.12). On torch 2.11 (the H200 image) it falls back to one SDPA call per packed
    example per layer and pass: correct, but a packed step becomes host-bound. The kernel it would call, aten's
    `_flash_attention_forward` with cumulative sequence lengths (grouped-query heads native), is in torch 2.11;
    Unsloth's own `_LeanFlashVarlen` calls exactly that, so route its varlen calls there. Each example still
    attends only to itself (cu_seqlens = the example boundaries; tests/test_gpu.py checks the logits).
    Returns whether the route is on; a no-op where Unsloth already has a varlen kernel.
    """
    import torch

    native, lean, cudnn = _UNSLOTH_VARLEN
    if native is not None or not torch.backends.cuda.is_flash_attention_available():
        return False
    if not enabled:
        attention_dispatch._TORCH_VARLEN_ATTN, attention_dispatch._LEAN_VARLEN = native, lean
        if cudnn is not None:
            attention_dispatch._varlen_can_use_cudnn = cudnn
        return False

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        return attention_dispatch._LeanFlashVarlen.apply(
            query, key, value, cu_seq_q, max_q, window_size == (-1, 0), scale, window_size[0], window_size[1]
        )

    attention_dispatch._TORCH_VARLEN_ATTN = varlen_attn
    attention_dispatch._LEAN_VARLEN = True
    attention_dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    return True


use_flash_varlen(os.environ.get("LORAFLOW_FLASH_VARLEN", "1") != "0")


NAME = "unsloth"
SUPPORTS_PACKING = True  # Unsloth's attention reads the packed position ids and keeps each example to itself


def load(path: str, model: ModelConfig, dtype: Any) -> LiveModel:
    """FastLanguageModel.from_pretrained on this rank's GPU (4-bit when model.load_in_4bit); Unsloth's documented
    multi-GPU path is one process per GPU with device_map={"": local_rank}."""
    loaded, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        revision=model.revision,
        max_seq_length=model.max_seq_length,
        dtype=dtype,
        load_in_4bit=model.load_in_4bit,
        device_map={"": local_device_index()},
    )
    return LiveModel(loaded, tokenizer, sys.modules[__name__], "cuda", dtype, path)


def attach_lora(live: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int) -> Any:
    """Unsloth's get_peft_model. auto checkpointing starts as Unsloth's; prepare_for_training may turn it off."""
    checkpointing: Any = {"auto": "unsloth", "unsloth": "unsloth", "true": True, "false": False}[lora.gradient_checkpointing]
    return FastLanguageModel.get_peft_model(
        live.model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        use_gradient_checkpointing=checkpointing,
        random_state=seed,
        max_seq_length=max_seq_length,
    )


def prepare_for_training(live: LiveModel, micro_batch_tokens: int) -> str:
    """lora.gradient_checkpointing auto: off for this run when the activations of its largest micro-batch fit the
    GPU's budget, measured now (loraflow/memory.py); returns the decision with its numbers (also logged)."""
    if live.gradient_checkpointing != "auto":
        return f"{live.gradient_checkpointing} (as configured)"
    gpu = measure_gpu()
    keep = keep_gradient_checkpointing(live.model.config, micro_batch_tokens, gpu)
    set_gradient_checkpointing(live.model, "unsloth" if keep else False)
    decision = describe_decision(keep, live.model.config, micro_batch_tokens, gpu)
    run_logger().info("train: gradient checkpointing %s", decision)
    return decision


def force_gradient_checkpointing(live: LiveModel) -> None:
    """Unsloth's checkpointing on for the next train(), whatever auto decided (after an out-of-memory)."""
    set_gradient_checkpointing(live.model, "unsloth")


def set_gradient_checkpointing(model: Any, mode: Any) -> None:
    """Checkpointing for the next train(): Unsloth's trainer re-applies, at the start of every train(), the mode
    get_peft_model recorded on the model (`_unsloth_gradient_checkpointing`), so that record is what to change."""
    model._unsloth_gradient_checkpointing = mode


def prepare_for_inference(live: LiveModel) -> None:
    FastLanguageModel.for_inference(live.model)
    live.model.eval()


def for_training(model: Any) -> None:
    FastLanguageModel.for_training(model)


def loss_type(live: LiveModel, completion_only_loss: bool) -> str:
    """"nll" whatever the loss covers, so the loss is Unsloth's fused cross-entropy. TRL's chunked head would
    bypass the model's forward (Unsloth pins "nll" as the default itself, but any explicit value, None included, overrides that pin)."""
    return "nll"


def label_log_likelihoods(live: LiveModel, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Unsloth's fast inference path owns its cache: each (prompt, label) pair is one row of its own."""
    return whole_row_log_likelihoods(live, prompts, completions)
