"""The artifact store: adapters, checkpoints and run summaries under content-addressed keys.

A folder is published as `<key>/` plus `<key>/manifest.json`, the manifest written last and listing every
file with its size and sha256. Readers trust only folders whose manifest exists, so nobody sees half an
artifact; two writers of the same key write the same content, and the last rename or manifest wins.
Deleting goes the other way: the manifest (or the whole folder, by one rename) disappears first.
Small mutable records (a model line's aliases) are written by compare-and-swap: `read_versioned` gives the bytes and
a version, `put_if_match` writes only if the version is unchanged (a lock file locally, a conditional PUT on S3).
Two implementations: a local folder (loraflow/local_store.py) and S3 (loraflow/s3_store.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from loraflow.local_store import LocalStore


class Store(Protocol):
    uri: str

    def check(self) -> None: ...
    def has(self, key: str) -> bool: ...
    def uri_of(self, key: str) -> str: ...
    def put_folder(self, folder: Path, key: str, shared_blobs: bool = True) -> str: ...
    def get_folder(self, key: str, destination: Path) -> Path: ...
    def read_file(self, key: str, relative: str) -> bytes: ...
    def digest(self, key: str) -> str: ...
    def put_bytes(self, data: bytes, key: str) -> str: ...
    def read_bytes(self, key: str) -> bytes: ...
    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]: ...
    def conditional_writes(self) -> bool: ...
    def put_if_match(self, key: str, data: bytes, version: str | None) -> bool: ...
    def list_files(self, prefix: str) -> list[str]: ...
    def list_complete(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def open_store(uri: str) -> Store:
    """`s3://bucket/prefix` -> S3Store (credentials from the environment or a block), anything else a local folder.

    Raises ConfigError for an s3:// URI without a bucket."""
    if uri.startswith("s3://"):
        from loraflow.s3_store import S3Store

        return S3Store(uri)
    return LocalStore(uri)


__all__ = ["LocalStore", "Store", "open_store"]
