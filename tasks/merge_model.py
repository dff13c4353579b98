"""merge-model: the base model with the adapter merged in, 16-bit, published to the store (loraflow/merging.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.config import ModelConfig
from loraflow.merging import merge_adapter
from loraflow.retries import retry_transient
from loraflow.training import AdapterRef


@task(name="merge-model", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def merge_model_task(adapter: AdapterRef, model: ModelConfig) -> str:
    """Merge the adapter into a 16-bit copy of the base model (output.save_merged); returns its store key."""
    return merge_adapter(model, adapter.store_uri, adapter.key)
