"""The store's weekly clean-up: one gc pass (loraflow/store_gc.py), as the `store-gc` deployment runs it.

    prefect deployment run store-gc/store-gc --param store=s3://bucket/prefix --param dry_run=true

Each pass deletes what an earlier pass marked at least `grace_hours` ago and nothing needs now, and marks what
it finds newly unused; the parameters are `loraflow store gc`'s flags.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from loraflow.store_gc import GcPolicy, collect_garbage

DEFAULTS = GcPolicy()


@flow(name="store-gc")
def store_gc(
    store: str = ".loraflow/store",
    dry_run: bool = False,
    grace_hours: float = DEFAULTS.grace_hours,
    keep_checkpoints: int = DEFAULTS.keep_checkpoints,
    retention_days: float = DEFAULTS.retention_days,
    candidate_retention_days: float = DEFAULTS.candidate_retention_days,
) -> dict[str, Any]:
    """Delete what nothing in the store references any more; returns the report (deleted and marked, with bytes)."""
    policy = GcPolicy(grace_hours, keep_checkpoints, retention_days, candidate_retention_days)
    return collect_garbage(store, policy, dry_run=dry_run).as_dict()
