"""Where Unsloth's generated modules and Inductor's and Triton's kernels are kept between runs.

Imports nothing but the standard library, so the warm process (loraflow/warm.py) can point Unsloth at the same
folders before it imports Unsloth, exactly as loraflow/backend_unsloth.py does in a cold process. The train step
also shares the cache through the artifact store (restore_compile_cache before training, publish_compile_cache
after), so a fresh worker's first step reuses the kernels another machine of the same kind compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any


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


# --- through the store: a fresh worker starts with the kernels another machine compiled ----------------------------
#
#   compile-cache/<versions>-py<X.Y>-sm<NN>/<sha256 of the file list>/   a published folder (manifest last)
#   compile-cache/<versions>-py<X.Y>-sm<NN>/latest.json                 {"key": that folder, "files": [paths]}
#
# The tag keeps apart what cannot be shared: other library versions (the folder's name), another Python (Unsloth's
# generated modules are imported as source, but their bytecode is not portable) and another GPU architecture
# (Triton's cubins). Each publish is a superset of what the run restored, so the newest pointer is the union
# of what the runs before it compiled; two runs publishing at once lose nothing but each other's newest kernels.

COMPILE_CACHE_PREFIX = "compile-cache"


def in_the_making(part: str) -> bool:
    """A path part that is not a finished cache file: a lock (Inductor's locks/, *.lock), a file being written
    (Triton's <name>.tmp.pid_<pid>_<n>, Inductor's .<pid>.<thread>.tmp) or bytecode (__pycache__: rebuilt on import)."""
    return part in ("locks", "__pycache__") or part.endswith((".lock", ".tmp")) or ".tmp." in part


def compile_cache_tag(gpu_capability: tuple[int, int]) -> str:
    """`<torch>-<transformers>-<unsloth>-<unsloth_zoo>-py<X.Y>-sm<major><minor>`, e.g. ...-py3.12-sm90 on an H100/H200.
    Raises importlib.metadata.PackageNotFoundError where Unsloth is not installed (compile_cache_dir)."""
    import sys

    return f"{compile_cache_dir().name}-py{sys.version_info[0]}.{sys.version_info[1]}-sm{gpu_capability[0]}{gpu_capability[1]}"


def cached_files(root: Path) -> list[str]:
    """Relative paths of the finished files under `root`, sorted; files in the making and locks left out."""
    if not root.is_dir():
        return []
    return sorted(str(path.relative_to(root)) for path in root.rglob("*")
                  if path.is_file() and not any(in_the_making(part) for part in path.relative_to(root).parts))


def restore_compile_cache(store: Any, tag: str, root: Path | None = None) -> int:
    """Copy into the local compile cache (`root`, default compile_cache_dir()) the files of the store's newest
    compile cache for `tag` that are not here yet; returns how many. A file already here is never replaced (another
    process may be reading it): each arrives under a temporary name and is renamed into place.
    Raises what the store raises (the caller decides whether a missing cache matters)."""
    root = root or compile_cache_dir()
    pointer = latest_pointer(store, tag)
    if pointer is None:
        return 0
    have = set(cached_files(root))
    if set(pointer["files"]) <= have:
        return 0
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=root.parent))
    try:
        store.get_folder(pointer["key"], staging)
        added = 0
        for relative in pointer["files"]:
            target = root / relative
            if relative in have or target.exists() or not (staging / relative).is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / relative, target)
            added += 1
        return added
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_compile_cache(store: Any, tag: str, root: Path | None = None) -> int:
    """Publish the local compile cache for `tag` when it holds files the store's newest one lacks; returns how many
    new files (0: nothing published). Raises what the store raises."""
    root = root or compile_cache_dir()
    files = cached_files(root)
    pointer = latest_pointer(store, tag)
    new = set(files) - set(pointer["files"] if pointer else [])
    if not new:
        return 0
    listing = json.dumps([[name, (root / name).stat().st_size] for name in files]).encode()
    key = f"{COMPILE_CACHE_PREFIX}/{tag}/{hashlib.sha256(listing).hexdigest()[:32]}"
    staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=root.parent))
    try:
        for name in files:  # the finished files only, as they are now (a link: no copy of a large cache)
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / name, staging / name)
            except OSError:
                shutil.copy2(root / name, staging / name)
        store.put_folder(staging, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    store.put_bytes(json.dumps({"key": key, "files": files}).encode(), f"{COMPILE_CACHE_PREFIX}/{tag}/latest.json")
    return len(new)


def latest_pointer(store: Any, tag: str) -> dict[str, Any] | None:
    """The store's newest compile cache for `tag` ({"key", "files"}), or None where there is none."""
    try:
        return json.loads(store.read_bytes(f"{COMPILE_CACHE_PREFIX}/{tag}/latest.json"))
    except FileNotFoundError:
        return None
