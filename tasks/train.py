"""train: TRL's SFTTrainer; checkpoints and the adapter go to the store (loraflow/training.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.backends import LiveModel
from loraflow.prompts import Prompts
from loraflow.retries import retry_transient
from loraflow.training import AdapterRef, TrainSpec, train_adapter


@task(name="train", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train_task(model: LiveModel, prompts: Prompts, spec: TrainSpec) -> AdapterRef:
    """Fine-tune the LoRA adapters and publish them; a retry (or a rerun) resumes from the newest stored checkpoint."""
    return train_adapter(model, prompts, spec)
