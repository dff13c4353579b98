"""A logger that goes to Prefect's run log inside a run and to the standard logging module outside one."""

from __future__ import annotations

import logging
from typing import Any


def run_logger(name: str = "loraflow") -> Any:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # plain function called outside a flow run (tests, benchmarks)
        return logging.getLogger(name)
