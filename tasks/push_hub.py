"""push-hub: upload the adapter, card, summary and loss curve to the Hugging Face Hub (loraflow/hub.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.config import HubSettings
from loraflow.hub import push_run
from loraflow.retries import retry_transient
from loraflow.summary import RunSummary
from loraflow.training import AdapterRef


@task(name="push-hub", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient)
def push_hub_task(
    summary: RunSummary, model_card: str, loss_curve: bytes, adapter: AdapterRef, merged_key: str | None, hub: HubSettings
) -> dict[str, str | None]:
    """Push when hub.repo_id and a token (HF_TOKEN or the hf-token block) are set: to main (tagged) when promoted,
    else to candidates/<run> or nowhere; returns hub_url, hub_revision, hub_tag."""
    return push_run(summary, model_card, loss_curve, adapter.store_uri, adapter.key, merged_key, hub)
