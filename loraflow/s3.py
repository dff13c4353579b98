"""One place that builds S3 clients: endpoint and credentials from the standard AWS environment
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) or, when
`LORAFLOW_AWS_CREDENTIALS_BLOCK` names one, a prefect-aws `AwsCredentials` block. Any S3-compatible
endpoint works (AWS, MinIO, nanio, ...). Secrets are never passed around as arguments or parameters.
"""

from __future__ import annotations

import os
from typing import Any

from loraflow.errors import ConfigError

CREDENTIALS_BLOCK_ENV = "LORAFLOW_AWS_CREDENTIALS_BLOCK"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key/parts -> ("bucket", "key/parts")."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"{uri}: no bucket in the S3 URI")
    return bucket, key.strip("/")


def aws_credentials_block() -> Any:
    """The prefect-aws AwsCredentials to use: the named block, or one that defers to the environment."""
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    name = os.environ.get(CREDENTIALS_BLOCK_ENV)
    if name:
        return AwsCredentials.load(name)
    # No keys here: boto3 reads them from the environment (or an instance role) when the client is made.
    return AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=os.environ.get("AWS_ENDPOINT_URL")))


def s3_client(max_attempts: int = 5) -> Any:
    """A boto3 S3 client; `max_attempts` per request (botocore's standard retry mode backs off on throttling, 5xx,
    timeouts and refused connections). The artifact store asks for 2: it retries for a set time itself."""
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    if os.environ.get(CREDENTIALS_BLOCK_ENV):
        block = aws_credentials_block()
        endpoint = block.aws_client_parameters.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        return block.get_boto3_session().client("s3", endpoint_url=endpoint, config=config)
    import boto3

    # A fresh session each time: boto3's default session keeps the first credentials it resolved for the life of
    # the process, so a key rotated in the environment would never be read. It reads AWS_ENDPOINT_URL and the keys.
    return boto3.session.Session().client("s3", config=config)
