"""attach-LoRA: wrap the base model with LoRA adapters; only the adapters train."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.builders import build_peft_config
from loraflow.config import LoraSettings
from loraflow.live_model import LiveModel
from loraflow.logs import run_logger


def attach_lora(live: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int) -> LiveModel:
    """Unsloth's or PEFT's get_peft_model; logs the trainable-parameter share."""
    if live.backend == "unsloth":
        from loraflow import unsloth_backend

        model = unsloth_backend.attach_lora(live.model, lora, max_seq_length, seed)
    else:
        model = attach_with_peft(live, lora, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run_logger().info(
        "attach-LoRA: r=%d alpha=%d on %s; trainable %.3fM of %.1fM parameters (%.3f%%)",
        lora.r, lora.alpha, ",".join(lora.target_modules), trainable / 1e6, total / 1e6, 100 * trainable / total,
    )
    return LiveModel(model, live.tokenizer, live.backend, live.device, live.dtype, live.model_path,
                     live.attn_implementation, lora.gradient_checkpointing)


def attach_with_peft(live: LiveModel, lora: LoraSettings, seed: int):
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(seed)  # LoRA's A matrices are random: same seed, same start
    checkpointing = lora.gradient_checkpointing != "false"  # "unsloth" and "auto" mean plain checkpointing here
    if getattr(live.model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(live.model, use_gradient_checkpointing=checkpointing)
    else:
        model = live.model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return get_peft_model(model, build_peft_config(lora))


@task(name="attach-LoRA", cache_policy=NO_CACHE, persist_result=False)
def attach_lora_task(live: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int) -> LiveModel:
    """Attach LoRA adapters to the live base model."""
    return attach_lora(live, lora, max_seq_length, seed)
