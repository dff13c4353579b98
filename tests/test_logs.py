"""The run's console keeps Prefect's handler when an import configures the root logger first (Unsloth does)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

# What Unsloth 2026.10.9's import does (unsloth/import_fixes.py), then what Prefect does on import
# (prefect.logging.configuration.setup_logging); prints the root logger's handlers and level.
SCRIPT = textwrap.dedent("""
    import logging
    from loraflow.logs import root_logging_left_alone

    with root_logging_left_alone():
        logging.basicConfig(level=logging.WARNING, format="[%(name)s|%(levelname)s]%(message)s")
        assert len(logging.getLogger().handlers) == 1  # the guard lets the import do what it does
    import prefect.main  # noqa: F401
    root = logging.getLogger()
    print(sorted(type(h).__name__ for h in root.handlers), logging.getLevelName(root.level))
""")


def run_script(guarded: bool) -> str:
    script = SCRIPT if guarded else SCRIPT.replace("with root_logging_left_alone():", "if True:")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_prefect_console_handler_survives_an_import_that_calls_basic_config() -> None:
    # without the guard Prefect takes the import's handler for the user's and leaves its console out
    assert run_script(guarded=False) == "['StreamHandler'] WARNING"
    assert run_script(guarded=True) == "['PrefectConsoleHandler'] WARNING"
