"""Merging: the base model with the trained adapter merged in, 16-bit, for serving without PEFT.

Used when output.save_merged is set. The base is loaded afresh in 16-bit (never merged into 4-bit
weights, which would round the adapter away), the published adapter is applied and merged with PEFT's
merge_and_unload, and the result (safetensors + tokenizer) is published to the store under `merged/...`;
save-local copies it to <output.dir>/merged. It loads with AutoModelForCausalLM.from_pretrained(<output.dir>/merged).

A base checkpoint stored 4-bit (e.g. unsloth/llama-3-8b-bnb-4bit) is dequantized on the GPU first:
those dequantized weights are the ones the adapter was trained against.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from loraflow.backends import cuda_available, resolve_dtype
from loraflow.config import ModelConfig
from loraflow.errors import ConfigError
from loraflow.logs import run_logger
from loraflow.models import resolve_model
from loraflow.store import open_store


def merged_dtype(model: ModelConfig) -> Any:
    """16-bit: float16 where training ran in float16 (GPUs without bf16), else bfloat16 (also after fp32 on a CPU)."""
    import torch

    return torch.float16 if resolve_dtype(model.dtype) == torch.float16 else torch.bfloat16


def merged_key(adapter_key: str, dtype: Any) -> str:
    """adapters/<train key> -> merged/<train key>-bfloat16: same training, same merged model."""
    return f"merged/{adapter_key.rsplit('/', 1)[-1]}-{str(dtype).removeprefix('torch.')}"


def is_prequantized(path: str, revision: str | None) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, revision=revision), "quantization_config", None) is not None


def load_base_16bit(model: ModelConfig, dtype: Any) -> Any:
    """The base model's weights in `dtype`, on the CPU (merging is a few small matrix products per layer)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model.name)
    if not is_prequantized(path, model.revision):
        return AutoModelForCausalLM.from_pretrained(path, revision=model.revision, dtype=dtype)
    if not cuda_available():
        raise ConfigError(f"output.save_merged: {model.name} is stored quantized; dequantizing it needs CUDA")
    quantized = AutoModelForCausalLM.from_pretrained(path, revision=model.revision, dtype=dtype, device_map={"": 0})
    return quantized.dequantize().to(device="cpu", dtype=dtype)


def merge_adapter(model: ModelConfig, store_uri: str, adapter_key: str) -> str:
    """Publish the base model with the adapter merged in to the store (once per adapter); returns its store key.

    Raises ConfigError when the base is stored quantized and there is no CUDA to dequantize it."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    log = run_logger()
    store = open_store(store_uri)
    dtype = merged_dtype(model)
    key = merged_key(adapter_key, dtype)
    if store.has(key):
        log.info("merge-model: %s already in the store; no model loaded", key)
        return key
    with tempfile.TemporaryDirectory(prefix="loraflow-merge-") as work:
        adapter_dir, merged_dir = Path(work) / "adapter", Path(work) / "merged"
        store.get_folder(adapter_key, adapter_dir)
        merged = PeftModel.from_pretrained(load_base_16bit(model, dtype), adapter_dir).merge_and_unload()
        merged.save_pretrained(merged_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
        store.put_folder(merged_dir, key)
    log.info("merge-model: %s merged into %s in %s, published as %s",
             adapter_key, model.name, str(dtype).removeprefix("torch."), key)
    return key
