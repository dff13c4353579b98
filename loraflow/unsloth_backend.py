"""The only module that imports Unsloth: its import patches transformers, so nothing else may trigger it.

The flow imports this module first thing when the run's backend is unsloth, before transformers, TRL or
PEFT load, which is the order Unsloth needs to apply all of its kernels.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any

from loraflow.config import LoraSettings, ModelConfig
from loraflow.models import cache_dir


def compile_cache_dir() -> Path:
    """Where Unsloth's generated modules and Inductor's and Triton's kernels go, per library versions.

    Unsloth spends ~25 s at import writing patched modules and ~25 s in the first step compiling kernels; both
    are cached on disk and reused by the next run. Under the project's cache folder (a volume on a worker
    that should keep it) rather than /tmp, and keyed by versions so an upgrade never reads stale code.
    """
    versions = "-".join(metadata.version(name) for name in ("torch", "transformers", "unsloth", "unsloth_zoo"))
    return cache_dir().parent / "compile" / versions.replace("+", "_")


def use_compile_cache() -> None:
    root = compile_cache_dir()
    for variable, folder in (
        ("UNSLOTH_COMPILE_LOCATION", "unsloth"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"),
    ):
        os.environ.setdefault(variable, str(root / folder))  # an explicit setting wins


use_compile_cache()

import unsloth  # noqa: E402, F401  (must precede transformers; see the module docstring)
from unsloth import FastLanguageModel  # noqa: E402


def load(model_path: str, cfg: ModelConfig, dtype: Any) -> tuple[Any, Any]:
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        revision=cfg.revision,
        max_seq_length=cfg.max_seq_length,
        dtype=dtype,
        load_in_4bit=cfg.load_in_4bit,
    )
    return model, tokenizer


def attach_lora(model: Any, lora: LoraSettings, max_seq_length: int, seed: int) -> Any:
    checkpointing: Any = {"unsloth": "unsloth", "true": True, "false": False}[lora.gradient_checkpointing]
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=list(lora.target_modules),
        use_gradient_checkpointing=checkpointing,
        random_state=seed,
        max_seq_length=max_seq_length,
    )


def for_inference(model: Any) -> None:
    FastLanguageModel.for_inference(model)


def for_training(model: Any) -> None:
    FastLanguageModel.for_training(model)
