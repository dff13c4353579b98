"""The artifact store in a local folder (the embedded default): each published folder renamed into place whole."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from loraflow.manifest import MANIFEST, build_manifest, manifest_digest


class LocalStore:
    """A folder on disk (the embedded default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def has(self, key: str) -> bool:
        return (self.root / key / MANIFEST).is_file()

    def uri_of(self, key: str) -> str:
        return str(self.root / key)

    def read_file(self, key: str, relative: str) -> bytes:
        return (self.root / key / relative).read_bytes()

    def digest(self, key: str) -> str:
        return manifest_digest(json.loads((self.root / key / MANIFEST).read_text()))

    def put_folder(self, folder: Path, key: str, shared_blobs: bool = True) -> str:
        """`shared_blobs` only matters on S3; here every folder holds its own files."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            (staging / MANIFEST).write_text(json.dumps(build_manifest(staging), indent=1))
            if target.exists():  # same key = same content: keep the one already published
                return str(target)
            os.rename(staging, target)
        except OSError:
            if not self.has(key):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target)

    def get_folder(self, key: str, destination: Path) -> Path:
        if not self.has(key):
            raise FileNotFoundError(f"{self.root / key}: no complete artifact (no {MANIFEST})")
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.root / key, destination, dirs_exist_ok=True)
        (destination / MANIFEST).unlink(missing_ok=True)
        return destination

    def put_bytes(self, data: bytes, key: str) -> str:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        staging.write_bytes(data)
        os.replace(staging, target)
        return str(target)

    def read_bytes(self, key: str) -> bytes:
        """What put_bytes wrote under `key`. Raises FileNotFoundError."""
        return (self.root / key).read_bytes()

    def conditional_writes(self) -> bool:
        """put_if_match is always a true compare-and-swap here (a lock file)."""
        return True

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, version) of what put_bytes / put_if_match wrote under `key`, or (None, None) when there is
        nothing; the version is the content's sha256, what put_if_match compares."""
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """An exclusive lock on `<key>.lock` (fcntl.flock: released when the process dies, so never stale)."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(f"{target.name}.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield target
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put_if_match(self, key: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap: write `data` under `key` only if its content is still `version` (None: only if there is
        nothing there yet). Under an exclusive lock file, the current content is compared, then `data` goes to a
        temporary file renamed over the key, so readers see the old or the new bytes, never half. Returns False,
        writing nothing, when another writer changed it first."""
        with self._locked(key) as target:
            if self.read_versioned(key)[1] != version:
                return False
            staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            staging.write_bytes(data)
            os.replace(staging, target)
        return True

    def list_files(self, prefix: str) -> list[str]:
        """Keys of the files put_bytes wrote directly under `prefix` (lock and staging files left out)."""
        parent = self.root / prefix
        if not parent.is_dir():
            return []
        return sorted(f"{prefix}/{p.name}" for p in parent.iterdir()
                      if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock"))

    def list_complete(self, prefix: str) -> list[str]:
        """Keys of the complete folders directly under `prefix` (staging and half-deleted ones are hidden)."""
        parent = self.root / prefix
        if not parent.is_dir():
            return []
        return [f"{prefix}/{p.name}" for p in parent.iterdir()
                if not p.name.startswith(".") and (p / MANIFEST).is_file()]

    def delete(self, key: str) -> None:
        """One rename takes the folder out of sight, so no reader finds it half deleted; then it is removed."""
        target = self.root / key
        doomed = target.with_name(f".deleting-{target.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, doomed)
        except FileNotFoundError:  # someone else deleted it first
            return
        shutil.rmtree(doomed, ignore_errors=True)
