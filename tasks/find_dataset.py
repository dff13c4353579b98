"""find-dataset: the object data.uri names, or the newest data file under a folder (loraflow/sources.py)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.retries import retry_transient
from loraflow.sources import DataObject, newest_object


@task(name="find-dataset", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient)
def find_dataset_task(uri: str) -> DataObject:
    """The exact object to train on: `uri` itself, or the newest file under it (last-modified, ties by key)."""
    return newest_object(uri)
