"""One place that builds S3 clients: endpoint and credentials from the standard AWS environment.

`AWS_ENDPOINT_URL` points at any S3-compatible server (MinIO, nanio, ...); boto3 reads it, and the keys,
itself. Secrets are never passed around as arguments.
"""

from __future__ import annotations

from typing import Any

from loraflow.errors import ConfigError


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/parts -> ("bucket", "key/parts")."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket in the S3 URI")
    return bucket, key


def s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # Standard retry mode backs off on throttling, 5xx and timeouts.
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10))
