"""The artifact store on S3 (or any S3-compatible server).

Layout under s3://bucket/prefix/:
    blobs/<sha256>                 file contents, addressed by their own hash: immutable, shared
    <key>/manifest.json            {path in folder: {size, sha256}}, written last, in one PUT
A folder is visible only once its manifest exists, so a reader never sees half an artifact, and two runs
publishing the same key cannot corrupt it: their blobs are immutable and each manifest is whole.
Uploads use boto3's managed transfer (multipart and parallel above 8 MiB).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from loraflow.errors import StoreConfigError, StoreUnavailableError
from loraflow.fingerprint import sha256_file
from loraflow.s3 import aws_credentials_block, s3_client, split_s3_uri
from loraflow.store import MANIFEST, manifest_digest

CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}
MISSING_BUCKET_ERRORS = {"NoSuchBucket"}


def transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20, max_concurrency=8)


class S3Store:
    def __init__(self, uri: str):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = uri.rstrip("/")
        self.client = s3_client()
        self.endpoint = self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def explained(self, action: str) -> Iterator[None]:
        """Turn botocore's errors into one sentence naming the endpoint and the bucket."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"S3 endpoint {self.endpoint}, bucket {self.bucket!r}"
        try:
            yield
        except EndpointConnectionError as exc:
            raise StoreUnavailableError(f"cannot reach the {where} while trying to {action}: {exc}") from None
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
            raise

    def check(self) -> None:
        """Fail early, and clearly, when the bucket cannot be used."""
        with self.explained("check the bucket"):
            self.client.head_bucket(Bucket=self.bucket)

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self.explained(f"read {key}"):
                self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def has(self, key: str) -> bool:
        return self._exists(self._key(f"{key}/{MANIFEST}"))

    def manifest(self, key: str) -> dict[str, Any]:
        with self.explained(f"read {key}/{MANIFEST}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(f"{key}/{MANIFEST}"))["Body"].read()
        return json.loads(body)

    def put_folder(self, folder: Path, key: str) -> str:
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest = sha256_file(path)
            blob = self._key(f"blobs/{digest}")
            if not self._exists(blob):
                with self.explained(f"upload {path.name}"):
                    self.client.upload_file(str(path), self.bucket, blob, Config=transfer_config())
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": digest}
        manifest = json.dumps({"created_at": time.time(), "files": files}, indent=1).encode()
        with self.explained(f"publish {key}/{MANIFEST}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(f"{key}/{MANIFEST}"), Body=manifest)
        return self.uri_of(key)

    def get_folder(self, key: str, destination: Path) -> Path:
        if not self.has(key):
            raise FileNotFoundError(f"s3://{self.bucket}/{self._key(key)}: no complete artifact (no {MANIFEST})")
        destination.mkdir(parents=True, exist_ok=True)
        for relative, meta in self.manifest(key)["files"].items():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.explained(f"download {relative}"):
                self.client.download_file(self.bucket, self._key(f"blobs/{meta['sha256']}"), str(target),
                                          Config=transfer_config())
            if sha256_file(target) != meta["sha256"]:
                raise StoreUnavailableError(f"{relative} from s3://{self.bucket}/{self._key(key)} failed its sha256 check")
        return destination

    def put_bytes(self, data: bytes, key: str) -> str:
        with self.explained(f"write {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return f"s3://{self.bucket}/{self._key(key)}"

    def digest(self, key: str) -> str:
        return manifest_digest(self.manifest(key))

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read_file(self, key: str, relative: str) -> bytes:
        blob = self.manifest(key)["files"][relative]["sha256"]
        with self.explained(f"read {key}/{relative}"):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(f"blobs/{blob}"))["Body"].read()


def s3_result_storage(store_uri: str) -> Any:
    """prefect-aws S3Bucket for Prefect's results and cache records, under <prefix>/results."""
    from prefect_aws import S3Bucket

    bucket, prefix = split_s3_uri(store_uri)
    return S3Bucket(bucket_name=bucket, credentials=aws_credentials_block(),
                    bucket_folder=f"{prefix}/results" if prefix else "results")
