"""Cheap fingerprints of what an output depends on: cache keys are built from these."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(uri: str) -> str | None:
    """The content hash of a local file, the ETag of an S3 object; None where neither is known (no caching)."""
    if uri.startswith("s3://"):
        from loraflow.s3 import s3_client, split_s3_uri

        bucket, key = split_s3_uri(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception:  # missing or unreachable: let the task run and report it properly
            return None
        return "s3-" + hashlib.sha256(f"{bucket}/{key}/{head['ETag']}".encode()).hexdigest()
    path = Path(uri)
    return sha256_file(path) if path.is_file() else None


def stable_hash(*parts: Any) -> str:
    """sha256 over JSON-serialised parts; pydantic models (config sections) by their field values."""
    def plain(part: Any) -> Any:
        return part.model_dump(mode="json") if isinstance(part, BaseModel) else part

    encoded = json.dumps([plain(p) for p in parts], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()
