"""The artifact store on S3 (or any S3-compatible server).

Layout under s3://bucket/prefix/:
    blobs/<sha256>                 file contents, addressed by their own hash: immutable, shared
    <key>/manifest.json            {path in folder: {size, sha256[, object]}}, written last, in one PUT
    <key>/files/<path>             a folder's own copy of a file (shared_blobs=False: checkpoints)
A folder is visible only once its manifest exists, so a reader never sees half an artifact, and two runs
publishing the same key cannot corrupt it: their blobs are immutable and each manifest is whole.
Blobs are never deleted here (another manifest may list them; `loraflow store gc` collects those no manifest
lists); a folder that will be deleted again (a checkpoint, pruned once newer ones exist) keeps its files under
its own key instead, and deleting removes the manifest first, then those files.
Uploads use boto3's managed transfer (multipart and parallel above 8 MiB).

An endpoint that cannot be reached (refused, reset mid-request, timed out, 5xx) is retried by every operation
but `check` for up to LORAFLOW_STORE_RETRY_SECONDS (default 120 s) before it fails with one line naming the
endpoint: an S3 outage shorter than that only delays a run. The manifest is written only after every upload
succeeded, so an upload cut short leaves unreferenced objects (for gc), never a manifest that points at them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from loraflow.errors import ConfigError, StoreConfigError, StoreUnavailableError
from loraflow.fingerprint import sha256_file
from loraflow.logs import run_logger
from loraflow.s3 import aws_credentials_block, s3_client, split_s3_uri
from loraflow.manifest import MANIFEST, manifest_digest

T = TypeVar("T")

CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}
MISSING_BUCKET_ERRORS = {"NoSuchBucket"}
MISSING_OBJECT_ERRORS = {"404", "NoSuchKey", "NotFound"}
RETRY_SECONDS_ENV = "LORAFLOW_STORE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0


def retry_seconds() -> float:
    """How long one store operation keeps retrying an unreachable endpoint: LORAFLOW_STORE_RETRY_SECONDS, else 120.

    Raises ConfigError when the variable is not a number >= 0."""
    raw = os.environ.get(RETRY_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"{RETRY_SECONDS_ENV}={raw!r}: expected a number of seconds >= 0")
    return seconds


def is_unreachable(exc: BaseException) -> bool:
    """The endpoint is down or dropped the request: refused, reset or closed mid-transfer, timed out, or a 5xx /
    throttling answer after botocore's own retries. boto3's managed transfer lets these through unwrapped
    (it wraps only ClientError, in S3UploadFailedError), and RetriesExceededError for a download cut short."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    from loraflow.retries import THROTTLING_CODES

    if isinstance(exc, (BotoConnectionError, HTTPClientError, RetriesExceededError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or exc.response.get("Error", {}).get("Code") in THROTTLING_CODES
    return False


# A conditional PUT that lost: 412 (If-Match / If-None-Match did not hold), 409 (a concurrent conditional write).
CONDITION_FAILED_ERRORS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_CONDITIONAL_WRITES: dict[tuple[str | None, str], bool] = {}  # (endpoint, bucket) -> the server honours If-Match


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20, max_concurrency=8)


class S3Store:
    def __init__(self, uri: str):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = uri.rstrip("/")
        # botocore tries each request twice; longer outages are the store's own retry loop (`call`), which counts
        # seconds rather than attempts, so LORAFLOW_STORE_RETRY_SECONDS is what an outage may last.
        self.client = s3_client(max_attempts=2)
        self.endpoint = self.client.meta.endpoint_url
        self.retry_seconds = retry_seconds()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def explained(self, action: str) -> Iterator[None]:
        """Turn botocore's errors into one sentence naming the endpoint and the bucket."""
        from botocore.exceptions import ClientError, NoCredentialsError

        where = f"S3 endpoint {self.endpoint}, bucket {self.bucket!r}"
        try:
            yield
        except NoCredentialsError:
            raise StoreConfigError(f"no AWS credentials for the {where}: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY, or LORAFLOW_AWS_CREDENTIALS_BLOCK") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in CREDENTIAL_ERRORS:
                raise StoreConfigError(f"the {where} rejected the credentials ({code}) while trying to {action}; "
                                       "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
            if code in MISSING_BUCKET_ERRORS or (code == "404" and action == "check the bucket"):
                raise StoreConfigError(f"bucket {self.bucket!r} does not exist at S3 endpoint {self.endpoint}") from None
            if is_unreachable(exc):
                raise StoreUnavailableError(f"the {where} failed while trying to {action}: {exc}") from None
            raise
        except Exception as exc:
            if is_unreachable(exc):
                raise StoreUnavailableError(f"cannot reach the {where} while trying to {action}: {exc}") from None
            raise

    def call(self, action: str, operation: Callable[[], T]) -> T:
        """`operation()` with botocore's errors explained; while the endpoint cannot be reached it is tried again,
        backing off 1, 2, 4, 8, then 10 s, until `retry_seconds` (LORAFLOW_STORE_RETRY_SECONDS) have passed.

        Every operation given here must be safe to repeat (a PUT of the same bytes, a GET, a DELETE).
        Raises StoreUnavailableError (one line naming the endpoint) once the budget is spent; credentials, a missing
        bucket and other client errors are raised at once."""
        deadline, delay = time.monotonic() + self.retry_seconds, 1.0
        while True:
            try:
                with self.explained(action):
                    return operation()
            except StoreUnavailableError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailableError(f"{exc} (still failing after {self.retry_seconds:g} s of retries, "
                                                f"{RETRY_SECONDS_ENV})") from None
                wait = min(delay, left)
                run_logger().warning("store: %s; trying again in %.0f s (for %.0f s more)", exc, wait, left)
                time.sleep(wait)
                delay = min(2 * delay, 10.0)

    def check(self) -> None:
        """Fail early, and clearly, when the bucket cannot be used."""
        with self.explained("check the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def _size(self, key: str) -> int | None:
        """The object's size in bytes, None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            head = self.call(f"read {key}", functools.partial(self.client.head_object, Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                return None
            raise
        return int(head["ContentLength"])

    def _exists(self, key: str) -> bool:
        return self._size(key) is not None

    def _has_whole(self, key: str, size: int) -> bool:
        """The object is there with `size` bytes. S3 never shows an upload cut short (nanio neither: it writes a
        temporary file and renames it), but an object of another size is certainly not this file: upload it again."""
        return self._size(key) == size

    def _upload(self, path: Path, key: str) -> None:
        self.call(f"upload {path.name}", functools.partial(
            self.client.upload_file, str(path), self.bucket, key, Config=transfer_config()))

    def _restore_reused(self, reused: dict[str, Path]) -> None:
        """Upload again any reused blob that is gone: gc deletes blobs no manifest lists, and a blob this upload
        found and reused may have been such a one until this folder's manifest lands."""
        for key, path in reused.items():
            if not self._has_whole(key, path.stat().st_size):
                run_logger().warning("store: %s vanished while %s was being published; uploading it again", key, path.name)
                self._upload(path, key)

    def has(self, key: str) -> bool:
        return self._exists(self._key(f"{key}/{MANIFEST}"))

    def _get(self, key: str, action: str) -> bytes:
        def read() -> bytes:  # the body is read inside the retry: a connection dropped mid-body is retried too
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        return self.call(action, read)

    def manifest(self, key: str) -> dict[str, Any]:
        return json.loads(self._get(self._key(f"{key}/{MANIFEST}"), f"read {key}/{MANIFEST}"))

    def put_folder(self, folder: Path, key: str, shared_blobs: bool = True) -> str:
        """Upload every file, then the manifest, in one PUT, only once all of them are there."""
        files: dict[str, dict[str, Any]] = {}
        reused: dict[str, Path] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest, relative = sha256_file(path), str(path.relative_to(folder))
            files[relative] = {"size": path.stat().st_size, "sha256": digest}
            if shared_blobs:
                target = self._key(f"blobs/{digest}")
                if self._has_whole(target, files[relative]["size"]):
                    reused[target] = path
                    continue
            else:  # the key is the writer's own (run-scoped), so nobody else writes these objects
                files[relative]["object"] = f"{key}/files/{relative}"
                target = self._key(files[relative]["object"])
            self._upload(path, target)
        self._restore_reused(reused)
        manifest = json.dumps({"created_at": time.time(), "files": files}, indent=1).encode()
        self.call(f"publish {key}/{MANIFEST}", functools.partial(
            self.client.put_object, Bucket=self.bucket, Key=self._key(f"{key}/{MANIFEST}"), Body=manifest))
        # From here on the blobs are listed, so no later gc takes them; one that listed before the manifest may have.
        self._restore_reused(reused)
        return self.uri_of(key)

    def get_folder(self, key: str, destination: Path) -> Path:
        if not self.has(key):
            raise FileNotFoundError(f"s3://{self.bucket}/{self._key(key)}: no complete artifact (no {MANIFEST})")
        destination.mkdir(parents=True, exist_ok=True)
        from botocore.exceptions import ClientError

        for relative, meta in self.manifest(key)["files"].items():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.call(f"download {relative}", functools.partial(
                    self.client.download_file, self.bucket, self.object_of(meta), str(target), Config=transfer_config()))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                    raise FileNotFoundError(f"s3://{self.bucket}/{self._key(key)}: {relative} is gone (deleted)") from None
                raise
            if sha256_file(target) != meta["sha256"]:
                raise StoreUnavailableError(f"{relative} from s3://{self.bucket}/{self._key(key)} failed its sha256 check")
        return destination

    def object_of(self, meta: dict[str, Any]) -> str:
        """Where a manifest entry's bytes are: the folder's own copy, else the shared blob."""
        return self._key(meta.get("object") or f"blobs/{meta['sha256']}")

    def list_files(self, prefix: str) -> list[str]:
        """Keys of the objects directly under `prefix` (not in its sub-folders; hidden probe objects left out)."""
        base = self._key(prefix) + "/"
        keys = []
        with self.explained(f"list {prefix}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    name = item["Key"][len(base):]
                    if "/" not in name and not name.startswith("."):
                        keys.append(f"{prefix}/{name}")
        return sorted(keys)

    def list_complete(self, prefix: str) -> list[str]:
        """Keys of the complete folders directly under `prefix`: those whose manifest exists."""
        paginator = self.client.get_paginator("list_objects_v2")
        base = self._key(prefix) + "/"

        def listing() -> list[str]:
            keys = []
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for item in page.get("Contents", []):
                    name, _, rest = item["Key"][len(base):].partition("/")
                    if rest == MANIFEST:
                        keys.append(f"{prefix}/{name}")
            return keys

        return self.call(f"list {prefix}", listing)

    def delete(self, key: str) -> None:
        """The manifest goes first (readers stop seeing the folder), then the folder's own files; shared blobs stay."""
        from botocore.exceptions import ClientError

        try:
            manifest = self.manifest(key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                return  # someone else deleted it first
            raise
        own = [meta["object"] for meta in manifest["files"].values() if meta.get("object")]
        for name in [f"{key}/{MANIFEST}", *own]:
            self.call(f"delete {key}", functools.partial(self.client.delete_object, Bucket=self.bucket, Key=self._key(name)))

    def put_bytes(self, data: bytes, key: str) -> str:
        self.call(f"write {key}", functools.partial(self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data))
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_bytes(self, key: str) -> bytes:
        """What put_bytes wrote under `key`. Raises FileNotFoundError when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            with self.explained(f"read {key}"):
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                raise FileNotFoundError(f"s3://{self.bucket}/{self._key(key)}: no such object") from None
            raise

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of the object under `key`, or (None, None) when there is none."""
        from botocore.exceptions import ClientError

        try:
            with self.explained(f"read {key}"):
                got = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING_OBJECT_ERRORS:
                return None, None
            raise
        return got["Body"].read(), got["ETag"]

    def put_if_match(self, key: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap by a conditional PUT: `If-Match: <version>` (the ETag read_versioned gave), or
        `If-None-Match: *` when `version` is None (create only). Returns False when the server answers 412/409:
        another writer got there first, nothing was written.

        AWS S3 (since 2024) and MinIO honour both headers. A server that ignores them (nanio 0.1.7 does) writes
        unconditionally: the last writer wins, and a concurrent update can be lost; `conditional_writes()` finds
        that out once per bucket and logs a warning."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            with self.explained(f"write {key}"):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if error.get("Code") in CONDITION_FAILED_ERRORS or status in {"412", "409"}:
                return False
            raise
        return True

    def conditional_writes(self) -> bool:
        """Whether this endpoint honours conditional PUTs: a probe object is created with If-None-Match: *, then
        created again the same way, which must be refused. Asked once per (endpoint, bucket) and process; a server
        that ignores the condition gets one warning, since concurrent alias updates there can lose a write."""
        place = (self.endpoint, self.bucket)
        if place not in _CONDITIONAL_WRITES:
            import uuid

            from loraflow.logs import run_logger

            probe = f"probes/conditional-write-{uuid.uuid4().hex}"  # not under aliases/: readers there see lines only
            self.put_if_match(probe, b"1", None)
            honoured = not self.put_if_match(probe, b"2", None)
            with self.explained(f"delete {probe}"):
                self.client.delete_object(Bucket=self.bucket, Key=self._key(probe))
            _CONDITIONAL_WRITES[place] = honoured
            if not honoured:
                run_logger().warning(
                    "store: S3 endpoint %s ignores conditional writes (If-Match / If-None-Match): alias updates there "
                    "are last-writer-wins, and two runs moving aliases of one line at the same moment can lose one "
                    "change. AWS S3 and MinIO honour them.", self.endpoint)
        return _CONDITIONAL_WRITES[place]

    def digest(self, key: str) -> str:
        return manifest_digest(self.manifest(key))

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_file(self, key: str, relative: str) -> bytes:
        meta = self.manifest(key)["files"][relative]
        return self._get(self.object_of(meta), f"read {key}/{relative}")


def s3_result_storage(store_uri: str) -> Any:
    """prefect-aws S3Bucket for Prefect's results and cache records, under <prefix>/results."""
    from prefect_aws import S3Bucket

    bucket, prefix = split_s3_uri(store_uri)
    return S3Bucket(bucket_name=bucket, credentials=aws_credentials_block(),
                    bucket_folder=f"{prefix}/results" if prefix else "results")
