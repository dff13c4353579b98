"""fetch-dataset: read and validate the training (or eval) dataset (loraflow/data.py)."""

from __future__ import annotations

from prefect import task

from loraflow.cache_keys import dataset_cache_key, note_cache_hit
from loraflow.data import Dataset, read_dataset
from loraflow.retries import retry_transient


@task(name="fetch-dataset", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_key_fn=dataset_cache_key, persist_result=True, on_completion=[note_cache_hit])
def fetch_dataset_task(uri: str) -> Dataset:
    """Read and validate the dataset at `uri` (a file, s3://, http(s):// or a Hub id); bad rows fail here."""
    return read_dataset(uri)
