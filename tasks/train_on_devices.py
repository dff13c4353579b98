"""train, on several GPUs: the same training in one process per GPU, launched by accelerate (loraflow/launcher.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.launcher import launch_training
from loraflow.prompts import Prompts
from loraflow.retries import retry_transient
from loraflow.training import AdapterRef, TrainSpec


@task(name="train", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train_on_devices_task(spec: TrainSpec, prompts: Prompts) -> AdapterRef:
    """Each rank loads the model on its GPU, attaches LoRA and trains its share of every step; rank 0 publishes.
    A retry (or a rerun) resumes from the newest stored checkpoint, with any number of ranks."""
    return launch_training(spec, prompts)
