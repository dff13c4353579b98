"""Library objects built from config, in one place: BitsAndBytes, PEFT and TRL's SFT configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.batching import BatchLayout
from loraflow.config import LoraSettings, TrainSettings, resolved_optimizer


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


def build_sft_config(
    train: TrainSettings, layout: BatchLayout, on_cuda: bool, dtype: Any, loss_type: str, packing: bool, output_dir: Path,
    run_name: str | None = None,
) -> Any:
    """TRL's SFTConfig: the micro-batch and accumulation of `layout` (examples per step stay the config's
    batch × accumulation), the precision of `dtype` on CUDA, the backend's `loss_type`, padding-free rows when
    `packing`, checkpoints every train.save_steps under `output_dir`; then train.trainer_args over them (the keys
    loraflow sets are refused at validation, so those only add or override defaults such as
    dataloader_num_workers). `run_name` is what trackers call the run: the Prefect flow run's name."""
    import torch
    from trl import SFTConfig

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=layout.batch_size,
        gradient_accumulation_steps=layout.accumulation,
        warmup_steps=train.warmup_steps,
        max_steps=train.max_steps or -1,
        num_train_epochs=train.num_epochs or 1.0,
        learning_rate=train.learning_rate,
        optim=resolved_optimizer(train.optimizer, on_cuda),
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
        loss_type=loss_type,
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
        # Several ranks (train.num_devices): how long one waits for the others in a collective; LoRA under
        # checkpointing trains every adapter each step, so DDP need not search the graph for unused parameters.
        ddp_timeout=train.ddp_timeout_seconds,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )
    return SFTConfig(**{**settings, **train.trainer_args})
