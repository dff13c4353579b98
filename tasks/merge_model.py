"""merge-model: the base model with the trained adapter merged in, 16-bit, for serving without PEFT.

Runs when output.save_merged is set. The base is loaded afresh in 16-bit (never merged into 4-bit
weights, which would round the adapter away), the published adapter is applied and merged with PEFT's
merge_and_unload, and the result (safetensors + tokenizer) is published to the store under `merged/...`
and copied to <output.dir>/merged. It loads with AutoModelForCausalLM.from_pretrained(<output.dir>/merged).

A base checkpoint stored 4-bit (e.g. unsloth/llama-3-8b-bnb-4bit) is dequantized on the GPU first:
those dequantized weights are the ones the adapter was trained against.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.builders import cuda_available, resolve_dtype
from loraflow.config import ModelConfig
from loraflow.errors import ConfigError
from loraflow.logs import run_logger
from loraflow.models import resolve_model
from loraflow.retries import retry_transient
from loraflow.store import open_store

MERGED_FOLDER = "merged"  # inside output.dir


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


def merge_model(model: ModelConfig, store_uri: str, adapter_key: str, output_dir: str) -> str:
    """Publish the merged model to the store (once per adapter) and copy it to <output_dir>/merged."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    log = run_logger()
    store = open_store(store_uri)
    dtype = merged_dtype(model)
    key = merged_key(adapter_key, dtype)
    if store.has(key):
        log.info("merge-model: %s already in the store; no model loaded", key)
    else:
        with tempfile.TemporaryDirectory(prefix="loraflow-merge-") as work:
            adapter_dir, merged_dir = Path(work) / "adapter", Path(work) / "merged"
            store.get_folder(adapter_key, adapter_dir)
            merged = PeftModel.from_pretrained(load_base_16bit(model, dtype), adapter_dir).merge_and_unload()
            merged.save_pretrained(merged_dir, safe_serialization=True)
            AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(merged_dir)
            store.put_folder(merged_dir, key)
        log.info("merge-model: %s merged into %s in %s, published as %s",
                 adapter_key, model.name, str(dtype).removeprefix("torch."), key)
    destination = Path(output_dir) / MERGED_FOLDER
    store.get_folder(key, destination)
    return str(destination)


@task(name="merge-model", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def merge_model_task(model: ModelConfig, store_uri: str, adapter_key: str, output_dir: str) -> str:
    """Merge the adapter into a 16-bit copy of the base model (output.save_merged)."""
    return merge_model(model, store_uri, adapter_key, output_dir)
