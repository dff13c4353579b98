"""Library objects built from config, in one place: backend, dtype, BitsAndBytes, PEFT and SFT configs."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.config import LoraSettings, ModelConfig, TrainSettings
from loraflow.errors import ConfigError

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    """auto: Unsloth on CUDA where it is installed, else transformers (bitsandbytes on CUDA, full precision on CPU)."""
    if requested == "unsloth":
        if not cuda_available():
            raise ConfigError("model.backend: unsloth needs a CUDA GPU; use backend auto or transformers on this machine")
        if importlib.util.find_spec("unsloth") is None:
            raise ConfigError("model.backend: unsloth is not installed (pip install 'loraflow[gpu]')")
        return "unsloth"
    if requested == "auto":
        return "unsloth" if cuda_available() and importlib.util.find_spec("unsloth") is not None else "transformers"
    return requested


def resolve_dtype(requested: str) -> Any:
    """auto = bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if not cuda_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_bnb_config(dtype: Any) -> Any:
    """QLoRA's NF4: 4-bit normal-float weights, double quantization, compute in the training dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def build_peft_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def packing_enabled(train: TrainSettings, backend: str, attn_implementation: str | None) -> bool:
    """Packing concatenates short examples; it is only safe where attention respects example boundaries.

    Unsloth and flash-attention read the packed position ids and keep attention within each example;
    plain sdpa/eager attention would let examples see each other, so auto leaves packing off there.
    """
    supported = backend == "unsloth" or (attn_implementation or "").startswith("flash_attention")
    if train.packing == "true" and not supported:
        raise ConfigError(
            "train.packing: true needs backend unsloth or flash-attention (else packed examples attend to each "
            "other); set train.packing to auto or false"
        )
    return train.packing == "true" or (train.packing == "auto" and supported)


@dataclass(frozen=True)
class BatchLayout:
    """What one optimizer step is made of: micro-batches of examples, each example up to row_tokens long."""

    batch_size: int  # examples per micro-batch (padded rows unpacked, one padding-free row packed)
    accumulation: int  # micro-batches per optimizer step
    row_tokens: int  # TRL's max_length: the truncation cap of one example


def batch_layout(train: TrainSettings, model_cfg: ModelConfig, lengths: list[int], packing: bool) -> BatchLayout:
    """Unpacked: the config's batch × accumulation, padded rows of up to max_seq_length tokens.

    Packed (padding-free): each micro-batch's examples are concatenated into one row with per-example position
    ids, so a row costs its real tokens only. The optimizer step keeps the config's batch × accumulation
    examples, in the same order (max_steps, warm-up and the learning rate keep their meaning; the loss is the
    unpacked one), but accumulation folds into the micro-batch as far as the memory the config already asks
    for allows:
        tokens per micro-batch ≤ per_device_batch_size × max_seq_length      (4 × 2,048 = 8,192 in the notebook)
        examples per micro-batch = the largest divisor k of batch × accumulation with k × longest example ≤ that
    The notebook's 4 × 4 of ≤151-token examples: 16 × 151 = 2,416 ≤ 8,192, so one row of ~1,700 real tokens
    per step instead of four rows of ~425: a quarter of the per-micro-batch cost (kernel launches,
    dequantization), which dominates an 8B step this short.
    """
    if not packing or not lengths:
        return BatchLayout(train.per_device_batch_size, train.gradient_accumulation_steps, model_cfg.max_seq_length)
    examples_per_step = train.per_device_batch_size * train.gradient_accumulation_steps
    token_budget = train.per_device_batch_size * model_cfg.max_seq_length
    longest = min(max(lengths), model_cfg.max_seq_length)
    # k = per_device_batch_size always fits (its examples are at most max_seq_length long)
    batch_size = max(
        k for k in range(1, examples_per_step + 1) if examples_per_step % k == 0 and k * longest <= token_budget
    )
    return BatchLayout(batch_size, examples_per_step // batch_size, model_cfg.max_seq_length)


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


def sft_loss_type(backend: str, on_cuda: bool) -> str:
    """How TRL computes the loss: its own chunked head ("chunked_nll", TRL 1.14's default) or the model's ("nll").

    - Unsloth: "nll", so the loss is Unsloth's fused cross-entropy. TRL's chunked head bypasses the model's forward
      (Unsloth pins "nll" as the default itself, but any explicit value, None included, overrides that pin).
    - transformers on a GPU: TRL's chunked head; it never holds the logits of a 128k vocabulary at once.
    - a CPU: "nll"; memory is plentiful and the chunked recompute is not free: 7.4 s against 5.3 s a step for
      SmolLM2-135M, batch 8 × ~90 tokens, on this workplace's 2 cores.
    """
    return "chunked_nll" if on_cuda and backend == "transformers" else "nll"


def build_sft_config(
    train: TrainSettings,
    model_cfg: ModelConfig,
    backend: str,
    dtype: Any,
    output_dir: Path,
    packing: bool,
    layout: BatchLayout | None = None,
    run_name: str | None = None,
) -> Any:
    """TRL's SFTConfig from loraflow's settings, then train.trainer_args over them (the keys loraflow sets are
    refused at validation, so those only add or override defaults such as dataloader_num_workers). `run_name` is
    what trackers call the run: the Prefect flow run's name."""
    import torch
    from trl import SFTConfig

    on_cuda = cuda_available()
    optimizer = train.optimizer if train.optimizer != "auto" else ("adamw_8bit" if on_cuda else "adamw_torch")
    layout = layout or batch_layout(train, model_cfg, [], packing=False)
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=layout.batch_size,
        gradient_accumulation_steps=layout.accumulation,
        warmup_steps=train.warmup_steps,
        max_steps=train.max_steps or -1,
        num_train_epochs=train.num_epochs or 1.0,
        learning_rate=train.learning_rate,
        optim=optimizer,
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler,
        seed=train.seed,
        logging_steps=train.logging_steps,
        # A checkpoint every save_steps and one at the end; train copies each to the store as it is written
        # (loraflow/checkpoints.py), so a retry resumes from it. The local copies live in the task's temporary
        # folder, the newest save_total_limit of them.
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        bf16=on_cuda and dtype == torch.bfloat16,
        fp16=on_cuda and dtype == torch.float16,
        use_cpu=not on_cuda,
        max_length=layout.row_tokens,
        dataset_text_field="text",
        completion_only_loss=train.completion_only_loss,
        loss_type=sft_loss_type(backend, on_cuda),
        # Packing = padding-free rows: each micro-batch's examples concatenated into one row, position ids restarting
        # at every example, which Unsloth's and flash-attention's variable-length attention keep apart. Not TRL's
        # `packing` (bin-packing into max_length rows): 16 rows of 2,048 tokens per step would train the notebook's
        # 960 examples in 3 optimizer steps. Unpacked rows stay padded rows: left unset, Unsloth flattens every
        # micro-batch itself, and its variable-length attention skips its compiled decoder blocks (measured 0.83x
        # of a plain loop at 4 x 2048 on the 1B shape).
        packing=False,
        padding_free=packing,
        # attach-LoRA already turned checkpointing on (Unsloth's or PEFT's); the trainer must not redo it.
        gradient_checkpointing=False,
        # Both would read a GPU value back after every micro-batch (a host-device sync, the GPU idles while
        # Python catches up): train counts real tokens on the CPU instead, and a NaN loss is logged as NaN.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        report_to=list(train.report_to) or "none",  # the integrations' own callbacks log (loraflow/tracking.py)
        run_name=run_name,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return SFTConfig(**{**settings, **train.trainer_args})
