"""save-local: the output folder, written whole, and the run's record in the store (loraflow/outputs.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.outputs import save_local
from loraflow.retries import retry_transient
from loraflow.summary import RunSummary
from loraflow.training import AdapterRef


@task(name="save-local", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient)
def save_local_task(
    summary: RunSummary, model_card: str, loss_curve: bytes, adapter: AdapterRef, merged_key: str | None, output_dir: str,
    overwrite: bool = False,
) -> RunSummary:
    """Write adapter, tokenizer, model card, summary.json and loss curve to output.dir; returns the summary."""
    return save_local(summary, model_card, loss_curve, adapter.store_uri, adapter.key, merged_key, output_dir, overwrite)
