"""`loraflow store verify`: re-hash every object a manifest lists; report the missing and the corrupt ones.

Every complete folder (adapters/, merged/, checkpoints/) is read through its manifest: each file's bytes
(S3: blobs/<sha256> or the folder's own copy; local: the file in the folder) are hashed again and compared with
the manifest's sha256. A blob listed by several manifests is hashed once. A folder deleted while verify runs
(checkpoint pruning, gc) is not a finding: its manifest is read again before a missing file is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from loraflow.errors import StoreDataError
from loraflow.manifest import MANIFEST
from loraflow.store import open_store
from loraflow.store_objects import (
    FOLDER_DEPTH, LocalObjects, ObjectAccess, human_bytes, is_hidden, maintenance_logger, object_access, read_manifest,
)


@dataclass
class Finding:
    problem: str  # "missing" or "corrupt"
    key: str  # the object, relative to the store's root
    listed_by: list[str]  # "<folder>: <file in it>"
    actual_sha256: str | None = None


@dataclass
class VerifyReport:
    store: str
    manifests: int = 0
    objects: int = 0
    bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def lines(self) -> list[str]:
        """One line per missing or corrupt object (with what lists it), then the totals."""
        out = []
        for f in self.findings:
            got = f" (sha256 now {f.actual_sha256})" if f.actual_sha256 else ""
            out.append(f"{f.problem:8} {f.key}{got}  listed by {', '.join(f.listed_by)}")
        missing = sum(f.problem == "missing" for f in self.findings)
        out.append(f"store verify {self.store}: {self.objects} objects ({human_bytes(self.bytes)}) listed by "
                   f"{self.manifests} manifests re-hashed: {missing} missing, {len(self.findings) - missing} corrupt")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "manifests": self.manifests, "objects": self.objects, "bytes": self.bytes,
                "findings": [f.__dict__ for f in self.findings]}


def manifest_folders(access: ObjectAccess) -> list[str]:
    """Every complete folder: adapters/<k>, merged/<m>, checkpoints/<k>/<c>, compile-cache/<tag>/<d> with a manifest.json."""
    found = []
    for category, depth in FOLDER_DEPTH.items():
        for obj in access.list(f"{category}/"):
            parts = obj.key.split("/")
            if len(parts) == depth + 1 and parts[-1] == MANIFEST and not is_hidden(obj.key):
                found.append("/".join(parts[:depth]))
    return sorted(found)


def verify_store(store_uri: str) -> VerifyReport:
    """Re-hash every object the store's manifests list; `report.ok` is False when any is missing or corrupt.

    Raises StoreUnavailableError when the store cannot be reached (after the store's retries), StoreConfigError for
    a missing bucket or refused credentials. A manifest that cannot be read is itself reported corrupt."""
    store = open_store(store_uri)
    store.check()
    access = object_access(store)
    shared = not isinstance(access, LocalObjects)
    report = VerifyReport(store.uri)
    expected: dict[str, tuple[str, int]] = {}  # object -> (sha256, size) as the first manifest listing it says
    listed_by: dict[str, list[str]] = {}
    for folder in manifest_folders(access):
        try:
            manifest = read_manifest(access, folder)
        except StoreDataError as exc:
            report.findings.append(Finding("corrupt", f"{folder}/{MANIFEST}", [str(exc)]))
            continue
        if manifest is None:
            continue  # deleted since it was listed
        report.manifests += 1
        for relative, meta in manifest["files"].items():
            key = (meta.get("object") or f"blobs/{meta['sha256']}") if shared else f"{folder}/{relative}"
            expected.setdefault(key, (meta["sha256"], int(meta.get("size", 0))))
            listed_by.setdefault(key, []).append(f"{folder}: {relative}")
    for key, (sha256, size) in sorted(expected.items()):
        actual = access.sha256(key)
        report.objects += 1
        report.bytes += size
        if actual == sha256:
            continue
        if actual is None:
            # Gone with its folder (pruned or collected while we hashed) is no finding; still listed, it is.
            still = [by for by in listed_by[key] if still_listed(access, by.split(": ")[0])]
            if still:
                report.findings.append(Finding("missing", key, still))
        else:
            report.findings.append(Finding("corrupt", key, listed_by[key], actual))
    log = maintenance_logger()
    for line in report.lines():
        (log.error if line.startswith(("missing", "corrupt")) else log.info)("%s", line)
    return report


def still_listed(access: ObjectAccess, folder: str) -> bool:
    """The folder's manifest is still there (verify ran beside pruning or gc)."""
    try:
        json.loads(access.read(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # an unreadable manifest still points at its files
    return True
