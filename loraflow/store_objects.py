"""The store as raw objects, for maintenance (gc, verify): list with sizes and ages, read, hash, delete.

Runs use the folder-level API of loraflow/store.py; maintenance has to see what that API hides: files of a
folder whose manifest never came (an upload cut short), blobs no manifest lists, temporary files. Keys are
relative to the store's root (`adapters/<key>/manifest.json`, `blobs/<sha256>`), '/'-separated, on both backends.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraflow.errors import StoreDataError
from loraflow.local_store import LocalStore
from loraflow.manifest import MANIFEST

# adapters/<key>, checkpoints/<key>/<step-N-attempt>, compile-cache/<tag>/<files digest> (loraflow/compile_cache.py)
FOLDER_DEPTH = {"adapters": 2, "merged": 2, "checkpoints": 3, "compile-cache": 3}
POINTER_NAMES = {"compile-cache": "latest.json"}  # compile-cache/<tag>/latest.json: a record beside the folders


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the store's root
    size: int  # bytes
    modified: float  # epoch seconds: S3 LastModified, a file's mtime


class ObjectAccess(Protocol):
    def list(self, prefix: str) -> list[StoredObject]: ...
    def read(self, key: str) -> bytes: ...
    def sha256(self, key: str) -> str | None: ...
    def delete(self, keys: list[str]) -> None: ...


def object_access(store: object) -> ObjectAccess:
    """Raw access to a LocalStore or an S3Store (anything else raises TypeError)."""
    if isinstance(store, LocalStore):
        return LocalObjects(store.root)
    from loraflow.s3_store import S3Store

    if isinstance(store, S3Store):
        return S3Objects(store)
    raise TypeError(f"no raw object access for {type(store).__name__}")


class LocalObjects:
    """Files under a local store's root, hidden staging folders and temporary files included."""

    def __init__(self, root: Path):
        self.root = root

    def list(self, prefix: str) -> list[StoredObject]:
        """Every file under `prefix` (a folder, e.g. "checkpoints/"), in no particular order."""
        top = self.root / prefix
        found = []
        for folder, _, names in os.walk(top):
            for name in names:
                path = Path(folder) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted while we walked (pruning, a rename into place)
                    continue
                found.append(StoredObject(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime))
        return found

    def read(self, key: str) -> bytes:
        """Raises FileNotFoundError when it is gone."""
        return (self.root / key).read_bytes()

    def sha256(self, key: str) -> str | None:
        """Hex sha256 of the file's bytes, None when there is no such file."""
        digest = hashlib.sha256()
        try:
            with (self.root / key).open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def delete(self, keys: list[str]) -> None:
        """Remove the files (gone already is fine), then the folders this left empty, up to the category folder."""
        for key in keys:
            (self.root / key).unlink(missing_ok=True)
        for key in keys:
            parent = (self.root / key).parent
            while parent != self.root and parent.parent != self.root:  # keep adapters/, checkpoints/, ... themselves
                try:
                    parent.rmdir()
                except OSError:  # not empty, or gone
                    break
                parent = parent.parent

    def delete_folder(self, key: str) -> None:
        """A whole folder, hidden or not: one rename out of sight, then removal (like LocalStore.delete)."""
        target = self.root / key
        doomed = target.with_name(f".deleting-{target.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, doomed)
        except FileNotFoundError:
            return
        shutil.rmtree(doomed, ignore_errors=True)


class S3Objects:
    """Objects under an S3 store's prefix. Every call retries an unreachable endpoint (S3Store.call)."""

    def __init__(self, store: object):
        self.store = store
        self.base = f"{store.prefix}/" if store.prefix else ""

    def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`."""
        paginator = self.store.client.get_paginator("list_objects_v2")

        def listing() -> list[StoredObject]:
            return [StoredObject(item["Key"][len(self.base):], int(item["Size"]), item["LastModified"].timestamp())
                    for page in paginator.paginate(Bucket=self.store.bucket, Prefix=self.base + prefix)
                    for item in page.get("Contents", [])]

        return self.store.call(f"list {prefix or 'the store'}", listing)

    def read(self, key: str) -> bytes:
        """Raises FileNotFoundError when it is gone."""
        from botocore.exceptions import ClientError

        from loraflow.s3_store import MISSING_OBJECT_ERRORS

        def read() -> bytes:
            return self.store.client.get_object(Bucket=self.store.bucket, Key=self.base + key)["Body"].read()

        try:
            return self.store.call(f"read {key}", read)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                raise FileNotFoundError(f"s3://{self.store.bucket}/{self.base}{key}") from None
            raise

    def sha256(self, key: str) -> str | None:
        """Hex sha256 of the object's bytes, streamed; None when there is no such object."""
        from botocore.exceptions import ClientError

        from loraflow.s3_store import MISSING_OBJECT_ERRORS

        def digest() -> str:  # read inside the retry, so a connection dropped mid-body starts over
            body = self.store.client.get_object(Bucket=self.store.bucket, Key=self.base + key)["Body"]
            hasher = hashlib.sha256()
            for chunk in body.iter_chunks(1 << 20):
                hasher.update(chunk)
            return hasher.hexdigest()

        try:
            return self.store.call(f"read {key}", digest)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                return None
            raise

    def delete(self, keys: list[str]) -> None:
        """DeleteObjects, 1000 keys a request; a key already gone is fine. Raises OSError naming what failed."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self.base + key} for key in keys[start:start + 1000]]
            answer = self.store.call(f"delete {len(batch)} objects", functools.partial(
                self.store.client.delete_objects, Bucket=self.store.bucket, Delete={"Objects": batch, "Quiet": True}))
            errors = answer.get("Errors") or []
            if errors:
                raise OSError(f"could not delete {len(errors)} objects, e.g. {errors[0].get('Key')}: "
                              f"{errors[0].get('Code')} {errors[0].get('Message')}")


def maintenance_logger() -> Any:
    """Prefect's run logger inside a flow run (the store-gc deployment), else plain logging: the CLI prints its own
    report and need not import Prefect (seconds) only to learn that it runs outside a flow."""
    if "prefect" in sys.modules:
        from loraflow.logs import run_logger

        return run_logger()
    return logging.getLogger("loraflow")


def human_bytes(size: float) -> str:
    """A byte count for people: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover  (the loop returns at GiB)


def is_hidden(key: str) -> bool:
    """A staging folder or temporary file: LocalStore's `.name-xxxx` / `.deleting-*` / `.name.pid.tmp`, nanio's
    `.tmp.<id>` (its file being written, visible in listings, and left behind when the server dies mid-PUT)."""
    return any(part.startswith(".") for part in key.split("/"))


def listed_objects(folder: str, manifest: dict, shared_blobs_layout: bool) -> set[str]:
    """The objects a manifest accounts for: itself and its files (S3: its own copies or blobs/<sha256>)."""
    listed = {f"{folder}/{MANIFEST}"}
    for relative, meta in manifest.get("files", {}).items():
        if shared_blobs_layout:
            listed.add(meta.get("object") or f"blobs/{meta['sha256']}")
        else:
            listed.add(f"{folder}/{relative}")
    return listed


def read_manifest(access: ObjectAccess, folder: str) -> dict | None:
    """The folder's manifest; None when it went away meanwhile. Raises StoreDataError when it is not valid."""
    try:
        manifest = json.loads(access.read(f"{folder}/{MANIFEST}"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' mapping")
        for meta in manifest["files"].values():
            str(meta["sha256"])
        return manifest
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreDataError(f"{folder}/{MANIFEST} is not a valid manifest ({exc})") from None
