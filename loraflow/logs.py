"""A logger that goes to Prefect's run log inside a run and to the standard logging module outside one; and a
guard for imports that configure the root logger behind the process's back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


def run_logger(name: str = "loraflow") -> Any:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # plain function called outside a flow run (tests, benchmarks)
        return logging.getLogger(name)


@contextlib.contextmanager
def root_logging_left_alone() -> Iterator[None]:
    """Undo what the block does to the root logger: handlers it adds are removed, its level restored.

    Unsloth's import calls `logging.basicConfig` (unsloth/import_fixes.py, unsloth_zoo/log.py in 2026.10.9). When
    it runs before Prefect configures logging (`loraflow run` against a Prefect server imports the backend before
    Prefect), Prefect finds a handler on the root logger, takes it for the user's and leaves its own console handler
    out (prefect.logging.configuration.setup_logging): the run's console loses Prefect's lines ("Task run
    'train-…' - …") for Unsloth's bare `[name|LEVEL]message`. Handlers that were there before stay."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
