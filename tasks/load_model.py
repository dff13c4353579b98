"""load-4bit-model: the base model and tokenizer by the run's backend (loraflow/backends.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.backends import LiveModel, load_model
from loraflow.config import ModelConfig


@task(name="load-4bit-model", cache_policy=NO_CACHE, persist_result=False)
def load_model_task(model: ModelConfig, backend: str) -> LiveModel:
    """Load the base model (a live object: never cached or persisted)."""
    return load_model(model, backend)
