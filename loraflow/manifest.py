"""A published folder's manifest: every file with its size and sha256, written last so readers see whole folders."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from loraflow.fingerprint import sha256_file

MANIFEST = "manifest.json"


def build_manifest(folder: Path) -> dict:
    """{created_at: epoch seconds, files: {relative path: {size: bytes, sha256: hex}}} of every file but the manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        "created_at": time.time(),
        "files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }


def manifest_digest(manifest: dict) -> str:
    """One hash for a published folder: of its manifest's file list (paths, sizes, sha256s)."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
