"""attach-LoRA: wrap the base model with LoRA adapters; only the adapters train (loraflow/backends.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.backends import LiveModel, attach_lora
from loraflow.config import LoraSettings
from loraflow.lineage import ParentAdapter


@task(name="attach-LoRA", cache_policy=NO_CACHE, persist_result=False)
def attach_lora_task(
    model: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int, init_adapter: ParentAdapter | None = None
) -> LiveModel:
    """Attach LoRA adapters to the live base model: fresh, or starting from `init_adapter`'s weights."""
    return attach_lora(model, lora, max_seq_length, seed, init_adapter)
