"""Which object a run trains on: `data.uri` as it is, or the newest data file under a folder.

A folder is a local directory, or an `s3://bucket/prefix/` URI ending in `/`. Its data files are the objects
under it (any depth, nothing hidden: no name below the folder starts with ".") whose names end in a supported suffix (.json, .jsonl, .csv, .parquet); the newest is the one
with the latest last-modified time, ties broken by the larger key, so every reader picks the same one. A file, an
S3 object, an http(s) URL or a Hub id is used as it is. The run's summary records the exact object and its ETag
(S3) beside the sha256 of the bytes read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraflow.data import SUPPORTED_SUFFIXES, no_such_file, suffix_of
from loraflow.errors import DatasetError


@dataclass(frozen=True)
class DataObject:
    """The exact dataset object a run reads."""

    uri: str  # the object itself: a file path, s3://bucket/key, an URL or a Hub id
    source: str  # data.uri as configured (the folder, or the same as uri)
    etag: str | None = None  # S3's ETag, quotes stripped; None for other sources
    last_modified: float | None = None  # epoch seconds (S3 LastModified, a file's mtime); None when unknown

    @property
    def from_folder(self) -> bool:
        return self.uri != self.source


def is_folder(uri: str) -> bool:
    """An s3:// URI ending in / or an existing local directory."""
    if uri.startswith("s3://"):
        return uri.endswith("/")
    return "://" not in uri and Path(uri).expanduser().is_dir()


def newest_object(uri: str) -> DataObject:
    """The object `uri` names: itself, or the newest data file under a folder (see the module docstring).

    Raises DatasetError for a folder with no data file (naming the suffixes looked for), ConnectionError when the
    S3 endpoint cannot be reached (transient: the task retries it)."""
    if not is_folder(uri):
        return describe_object(uri)
    candidates = list_s3_folder(uri) if uri.startswith("s3://") else list_local_folder(uri)
    if not candidates:
        raise DatasetError(f"{uri}: no data file in this folder (looked for {', '.join(SUPPORTED_SUFFIXES)})")
    newest = max(candidates, key=lambda item: (item.last_modified or 0.0, item.uri))
    return DataObject(uri=newest.uri, source=uri, etag=newest.etag, last_modified=newest.last_modified)


def describe_object(uri: str) -> DataObject:
    """A single object: its ETag and last-modified time where the source has them (S3, a local file)."""
    if uri.startswith("s3://"):
        from loraflow.s3 import s3_client, split_s3_uri

        bucket, key = split_s3_uri(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception:  # missing or unreachable: fetch-dataset reads it and says what is wrong
            return DataObject(uri=uri, source=uri)
        return DataObject(uri=uri, source=uri, etag=head["ETag"].strip('"'),
                          last_modified=head["LastModified"].timestamp())
    path = Path(uri).expanduser()
    if "://" not in uri and path.is_file():
        return DataObject(uri=uri, source=uri, last_modified=path.stat().st_mtime)
    return DataObject(uri=uri, source=uri)


def list_local_folder(folder: str) -> list[DataObject]:
    """Every data file under a local directory (any depth; hidden files and folders left out), with its mtime.
    Raises DatasetError when the directory does not exist."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(no_such_file(folder))
    return [DataObject(uri=str(path), source=folder, last_modified=path.stat().st_mtime)
            for path in root.rglob("*")
            if path.is_file() and not hidden(path.relative_to(root).parts) and path.suffix.lower() in SUPPORTED_SUFFIXES]


def hidden(parts: tuple[str, ...] | list[str]) -> bool:
    """A name starting with "." anywhere below the folder: a hidden file, or any file in a hidden folder
    (`.ipynb_checkpoints/train-checkpoint.json` is Jupyter's stale copy, newer than the file it copies)."""
    return any(part.startswith(".") for part in parts)


def list_s3_folder(uri: str) -> list[DataObject]:
    """Every data object under an S3 prefix (any depth; hidden names and folders left out), with its ETag and
    LastModified.
    Raises DatasetError (no bucket, no or refused credentials), ConnectionError (endpoint unreachable)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from loraflow.s3 import s3_client, split_s3_uri
    from loraflow.s3_store import CREDENTIAL_ERRORS

    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            for item in page.get("Contents", []):
                below = item["Key"][len(prefix):].strip("/").split("/") if prefix else item["Key"].split("/")
                if hidden(below) or suffix_of(item["Key"]) not in SUPPORTED_SUFFIXES:
                    continue
                found.append(DataObject(uri=f"s3://{bucket}/{item['Key']}", source=uri, etag=item["ETag"].strip('"'),
                                        last_modified=item["LastModified"].timestamp()))
    except EndpointConnectionError as exc:
        raise ConnectionError(f"{uri}: cannot reach S3 endpoint {client.meta.endpoint_url}: {exc}") from None
    except NoCredentialsError:
        raise DatasetError(f"{uri}: no AWS credentials to list it: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           "or LORAFLOW_AWS_CREDENTIALS_BLOCK") from None
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        if code == "NoSuchBucket":
            raise DatasetError(f"{uri}: no such bucket {bucket!r} at S3 endpoint {client.meta.endpoint_url}") from None
        if code in CREDENTIAL_ERRORS:
            raise DatasetError(f"{uri}: S3 endpoint {client.meta.endpoint_url} refused to list it ({code}); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy") from None
        raise
    return found
