"""Where Unsloth's generated modules and Inductor's and Triton's kernels are kept between runs.

Imports nothing but the standard library, so the warm process (loraflow/warm.py) can point Unsloth at the same
folders before it imports Unsloth, exactly as loraflow/backend_unsloth.py does in a cold process.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path


def compile_cache_dir() -> Path:
    """`$LORAFLOW_CACHE_DIR/compile/<torch>-<transformers>-<unsloth>-<unsloth_zoo>` (default cache folder
    ~/.cache/loraflow).

    Unsloth spends ~25 s at import writing patched modules and ~25 s in the first step compiling kernels; both
    are cached on disk and reused by the next run. Under the project's cache folder (a volume on a worker
    that should keep it) rather than /tmp, and keyed by versions so an upgrade never reads stale code.
    Raises importlib.metadata.PackageNotFoundError where one of the four packages is not installed.
    """
    versions = "-".join(metadata.version(name) for name in ("torch", "transformers", "unsloth", "unsloth_zoo"))
    root = os.environ.get("LORAFLOW_CACHE_DIR") or Path.home() / ".cache" / "loraflow"
    return Path(root) / "compile" / versions.replace("+", "_")


def use_compile_cache() -> None:
    """Point Unsloth, Inductor and Triton at compile_cache_dir(); an explicit setting of their variables wins.
    Must run before Unsloth is imported (it reads UNSLOTH_COMPILE_LOCATION then)."""
    root = compile_cache_dir()
    for variable, folder in (
        ("UNSLOTH_COMPILE_LOCATION", "unsloth"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("TRITON_CACHE_DIR", "triton"),
    ):
        os.environ.setdefault(variable, str(root / folder))
