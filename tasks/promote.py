"""promote: the challenger against the line's production adapter on the same eval examples; aliases move only on
evidence (loraflow/promotion.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.config import FinetuneConfig
from loraflow.inference import InferResult
from loraflow.promotion import Promotion, promote
from loraflow.prompts import Prompts
from loraflow.retries import retry_transient
from loraflow.summary import RunSummary
from loraflow.training import AdapterRef


@task(name="promote", cache_policy=NO_CACHE, persist_result=False,
      retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def promote_task(
    summary: RunSummary, adapter: AdapterRef, inferred: InferResult, prompts: Prompts, cfg: FinetuneConfig, backend: str
) -> Promotion:
    """Score the champion on the challenger's eval examples, decide, move the aliases, emit the promotion event."""
    return promote(cfg, backend, adapter, inferred, prompts, summary)
