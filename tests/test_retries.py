"""Only transient failures are retried: network, HTTP 5xx/429, S3 throttling and 5xx; never bad input or OOM."""

from __future__ import annotations

import socket
import urllib.error

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from loraflow.errors import ConfigError, DatasetError, QualityGateError, StoreConfigError, TrainingOutOfMemoryError
from loraflow.retries import is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("exc", [
    ConnectionResetError("reset"),
    TimeoutError("slow"),
    socket.timeout("slow"),
    urllib.error.HTTPError("http://x", 503, "Service Unavailable", {}, None),
    urllib.error.HTTPError("http://x", 429, "Too Many Requests", {}, None),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    client_error("SlowDown", 503),
    client_error("InternalError", 500),
    client_error("ThrottlingException", 400),
], ids=lambda e: type(e).__name__)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    DatasetError("d.json: row 2: field 'output' is missing"),
    ConfigError("train.learning_rate: must be > 0"),
    StoreConfigError("bucket 'x' does not exist"),
    TrainingOutOfMemoryError("CUDA out of memory ..."),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    QualityGateError("smoke-infer: answers are unusable"),
    urllib.error.HTTPError("http://x", 404, "Not Found", {}, None),
    client_error("AccessDenied", 403),
    ValueError("a bug"),
], ids=lambda e: type(e).__name__)
def test_everything_else_fails_at_once(exc: BaseException) -> None:
    assert not is_transient(exc)
