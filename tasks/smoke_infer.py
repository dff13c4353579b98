"""smoke-infer: greedy answers for the eval and demo prompts; accuracy of the fine-tuned and the base model
(loraflow/inference.py)."""

from __future__ import annotations

from prefect import task

from loraflow.cache_keys import note_cache_hit, smoke_infer_cache_key
from loraflow.config import InferSettings, ModelConfig
from loraflow.inference import InferResult, infer_adapter
from loraflow.prompts import Prompts
from loraflow.retries import retry_transient
from loraflow.training import AdapterRef


@task(name="smoke-infer", cache_key_fn=smoke_infer_cache_key, persist_result=True, on_completion=[note_cache_hit],
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def smoke_infer_task(
    adapter: AdapterRef, prompts: Prompts, infer: InferSettings, model: ModelConfig, backend: str
) -> InferResult:
    """Try the adapter: the model that trained it in this process, else the base with the adapter from the store.
    Unusable answers come back with the reason (InferResult.unusable); the flow fails the run once it is saved."""
    return infer_adapter(model, backend, adapter.store_uri, adapter.key, prompts, infer)
