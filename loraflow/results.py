"""Where Prefect persists task results and cache records: beside the artifacts, in the same store.

Prefect 3 needs result storage saved server-side as a block; one block per store, named after it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


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
