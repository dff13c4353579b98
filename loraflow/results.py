"""Where Prefect persists task results and cache records: beside the artifacts, in the same store.

Prefect 3 needs result storage saved server-side as a block; one block per store, named after it.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator


def block_name(store_uri: str) -> str:
    return "loraflow-results-" + hashlib.sha256(store_uri.encode()).hexdigest()[:12]


def result_storage_for(store_uri: str) -> Any:
    """A local folder store keeps results under <store>/results; an S3 store under <prefix>/results."""
    if store_uri.startswith("s3://"):
        from loraflow.s3_store import s3_result_storage

        block = s3_result_storage(store_uri)
    else:
        from prefect.filesystems import LocalFileSystem

        store_uri = str(Path(store_uri).expanduser().resolve())
        block = LocalFileSystem(basepath=str(Path(store_uri) / "results"))
    block.save(block_name(store_uri), overwrite=True)
    return block


@contextlib.contextmanager
def persist_results_in(store_uri: str) -> Iterator[None]:
    """Inside a flow run: every task called in this block persists its result and cache record in the run's store.

    A task takes its result storage from the flow run's result store unless it names its own; the store is part
    of the config, known only once the run has started, so it is set here once rather than on every task."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("persist_results_in is for the body of a flow run")
    default = context.result_store
    context.result_store = default.model_copy(update={"result_storage": result_storage_for(store_uri)})
    try:
        yield
    finally:
        context.result_store = default
