"""Which failures deserve a retry: transient network and storage errors only.

Never retried: bad input (it fails the same way again), CUDA out-of-memory (the same batch will not fit
next time either), or bugs. Used as `retry_condition_fn` on tasks that touch the network.
"""

from __future__ import annotations

import socket
import urllib.error
from typing import Any

from loraflow.errors import LoraflowInputError

THROTTLING_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestLimitExceeded"}


def is_transient(exc: BaseException) -> bool:
    """True for errors that a later attempt can plausibly get past."""
    if isinstance(exc, LoraflowInputError):
        return False
    if "out of memory" in str(exc).lower():
        return False
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, urllib.error.URLError)):
        return True
    return is_transient_botocore(exc) or is_transient_http_client(exc)


def is_transient_botocore(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, ReadTimeoutError
    except ImportError:
        return False
    if isinstance(exc, (BotoConnectionError, ReadTimeoutError)):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in THROTTLING_CODES or status >= 500
    return False


def is_transient_http_client(exc: BaseException) -> bool:
    try:
        import httpx
    except ImportError:
        return False
    if isinstance(exc, (httpx.TransportError,)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only when the failure was transient."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False
