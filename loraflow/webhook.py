"""`loraflow webhook serve`: dataset-upload notifications in, one `loraflow.dataset.uploaded` Prefect event out.

    S3 / SNS / MinIO / any uploader ──POST /hooks/dataset-upload──► authenticate ─► parse ─► allow-list
        ─► SQLite (accepted, pending) ─► 202 ─► emitter loop: POST $PREFECT_API_URL/events ─► mark emitted
    Prefect's `on-upload` deployment trigger matches the event and starts `finetune` with data.uri from it.

Prefect OSS has no webhooks of its own; this is loraflow's. Settings come from the environment:
  LORAFLOW_WEBHOOK_SECRET        shared secret (else the Prefect Secret block $LORAFLOW_WEBHOOK_SECRET_BLOCK,
                                 default `loraflow-webhook-secret`)
  LORAFLOW_WEBHOOK_ALLOWED       "bucket/prefix,bucket2": the only objects that may start a run (required)
  LORAFLOW_WEBHOOK_DEBOUNCE      seconds; uploads under one prefix within this window start one run (60)
  LORAFLOW_WEBHOOK_SNS_HOSTS     host[:port] patterns a SubscribeURL may point at (sns.*.amazonaws.com)
  LORAFLOW_WEBHOOK_DB            the SQLite file of accepted uploads (.loraflow/webhook.sqlite)
  PREFECT_API_URL                where events go

Authentication, any one of: `X-Loraflow-Timestamp` + `X-Loraflow-Signature: sha256=HMAC(secret, ts + "." + body)`
(within 300 s); `Authorization: Bearer <secret>` (MinIO's webhook target); HTTP Basic with the secret as password,
or `?token=<secret>` in the URL (SNS subscriptions, which cannot sign or set headers).

De-duplication: an object version (bucket, key, ETag — else sequencer, else version id) is accepted once, keyed in
SQLite; its event id is uuid5 of that key, so even a re-sent event is one event to Prefect. Debounce: the first
upload under a prefix opens a window; later uploads there within it replace it ("superseded"), and when the window
closes the latest one is emitted: a burst starts one run, on the newest file.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlparse

MAX_BODY_BYTES = 1024 * 1024
SIGNATURE_TOLERANCE_SECONDS = 300
EVENT_NAME = "loraflow.dataset.uploaded"
RESOURCE_PREFIX = "loraflow.dataset."
EVENT_NAMESPACE = uuid.UUID("6c0f3a52-4f5e-4d4b-9a57-2f1f8f7b6a10")  # uuid5 namespace of loraflow upload events
SECRET_BLOCK_DEFAULT = "loraflow-webhook-secret"

logger = logging.getLogger("loraflow.webhook")


class Reject(Exception):
    """A request refused with an HTTP status and a short reason; nothing was accepted."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


# --- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    bucket: str
    prefix: str = ""

    def covers(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(self.prefix)


@dataclass(frozen=True)
class WebhookSettings:
    secret: str
    allowed: tuple[Allowed, ...]
    debounce_seconds: float = 60.0
    sns_hosts: tuple[str, ...] = ("sns.*.amazonaws.com",)
    db_path: Path = Path(".loraflow/webhook.sqlite")
    api_url: str = ""

    @classmethod
    def from_env(cls) -> "WebhookSettings":
        env = os.environ
        allowed = parse_allowed(env.get("LORAFLOW_WEBHOOK_ALLOWED", ""))
        if not allowed:
            raise ValueError('set LORAFLOW_WEBHOOK_ALLOWED, e.g. "my-bucket/datasets/,other-bucket"')
        api_url = env.get("PREFECT_API_URL") or _prefect_setting("PREFECT_API_URL")
        if not api_url:
            raise ValueError("set PREFECT_API_URL: the receiver sends its events to a Prefect server")
        return cls(
            secret=load_secret(),
            allowed=allowed,
            debounce_seconds=float(env.get("LORAFLOW_WEBHOOK_DEBOUNCE", "60")),
            sns_hosts=tuple(h.strip() for h in env.get("LORAFLOW_WEBHOOK_SNS_HOSTS", "sns.*.amazonaws.com").split(",")
                            if h.strip()),
            db_path=Path(env.get("LORAFLOW_WEBHOOK_DB", ".loraflow/webhook.sqlite")),
            api_url=api_url.rstrip("/"),
        )


def parse_allowed(text: str) -> tuple[Allowed, ...]:
    """"bucket/prefix,bucket2" -> (Allowed("bucket", "prefix"), Allowed("bucket2", ""))."""
    entries = []
    for item in text.split(","):
        bucket, _, prefix = item.strip().removeprefix("s3://").partition("/")
        if bucket:
            entries.append(Allowed(bucket, prefix))
    return tuple(entries)


def _prefect_setting(name: str) -> str | None:
    import prefect.settings

    value = getattr(prefect.settings, name).value()
    return str(value) if value else None


def load_secret() -> str:
    """LORAFLOW_WEBHOOK_SECRET, else the Prefect Secret block named by LORAFLOW_WEBHOOK_SECRET_BLOCK."""
    secret = os.environ.get("LORAFLOW_WEBHOOK_SECRET")
    if not secret:
        from prefect.blocks.system import Secret

        name = os.environ.get("LORAFLOW_WEBHOOK_SECRET_BLOCK", SECRET_BLOCK_DEFAULT)
        try:
            secret = str(Secret.load(name).get())
        except Exception as exc:  # no server, no block: one message either way
            raise ValueError(f"set LORAFLOW_WEBHOOK_SECRET or create the Prefect Secret block {name!r} ({exc})") from None
    if len(secret) < 16:
        raise ValueError("the webhook secret must be at least 16 characters")
    return secret


# --- authentication ----------------------------------------------------------------------------------------


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Loraflow-Signature value for a body sent at `timestamp` (unix seconds)."""
    return "sha256=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def authenticate(headers: Any, query: Any, body: bytes, secret: str, now: float) -> None:
    """Raise Reject(401) unless the request carries a valid signature, bearer token, basic password or ?token=."""
    signature = headers.get("x-loraflow-signature")
    if signature is not None:
        timestamp = headers.get("x-loraflow-timestamp", "")
        if not timestamp.isdigit():
            raise Reject(401, "missing or malformed X-Loraflow-Timestamp")
        if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE_SECONDS:
            raise Reject(401, "stale timestamp")
        if not _same(signature, sign(secret, timestamp, body)):
            raise Reject(401, "bad signature")
        return
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(credentials.strip(), secret):
        return
    if scheme.lower() == "basic":
        try:
            password = base64.b64decode(credentials.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            password = ""
        if _same(password, secret):
            return
    if "token" in query and _same(query["token"], secret):
        return
    raise Reject(401, "unauthenticated")


# --- parsing -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    bucket: str
    key: str
    etag: str = ""
    sequencer: str = ""
    version_id: str = ""

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """Debounce group: the object's folder."""
        return f"{self.bucket}/{self.key.rpartition('/')[0]}"

    def idempotency_key(self, received_ns: int) -> str:
        # One object version = one key. A plain {"dataset_uri"} without an ETag has no version: each one counts.
        version = self.etag or self.sequencer or self.version_id or f"received-{received_ns}"
        return f"{self.bucket}/{self.key}@{version}"


@dataclass(frozen=True)
class Notification:
    kind: str  # "uploads" | "test" | "subscribe" | "ignore"
    uploads: tuple[Upload, ...] = ()
    subscribe_url: str = ""
    topic_arn: str = ""


def parse_notification(body: bytes) -> Notification:
    """Any of the accepted shapes -> Notification; Reject(400) for anything else."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Reject(400, "body is not JSON") from None
    if not isinstance(doc, dict):
        raise Reject(400, "body is not a JSON object")
    sns_type = doc.get("Type")
    if sns_type == "SubscriptionConfirmation":
        if not isinstance(doc.get("SubscribeURL"), str):
            raise Reject(400, "SubscriptionConfirmation without SubscribeURL")
        return Notification("subscribe", subscribe_url=doc["SubscribeURL"], topic_arn=str(doc.get("TopicArn", "")))
    if sns_type == "UnsubscribeConfirmation":
        return Notification("ignore")
    if sns_type == "Notification":
        message = doc.get("Message")
        if not isinstance(message, str):
            raise Reject(400, "SNS Notification without a Message string")
        return parse_notification(message.encode())
    if doc.get("Event") == "s3:TestEvent":
        return Notification("test")
    if "Records" in doc:
        return Notification("uploads", tuple(parse_s3_records(doc["Records"])))
    if "dataset_uri" in doc:
        return Notification("uploads", (parse_plain(doc),))
    raise Reject(400, "unknown notification shape: expected S3 Records, an SNS envelope or {\"dataset_uri\": ...}")


def parse_s3_records(records: Any) -> list[Upload]:
    if not isinstance(records, list):
        raise Reject(400, "Records is not a list")
    uploads = []
    for record in records:
        try:
            event_name, s3 = record["eventName"], record["s3"]
            bucket, obj = s3["bucket"]["name"], s3["object"]
            key = unquote_plus(obj["key"])  # S3 and MinIO send keys URL-encoded (space as +)
        except (KeyError, TypeError):
            raise Reject(400, "an S3 record without eventName, s3.bucket.name or s3.object.key") from None
        if not str(event_name).removeprefix("s3:").startswith("ObjectCreated:"):
            continue  # deletes, tagging, ...: nothing to train on
        uploads.append(Upload(bucket, key, str(obj.get("eTag") or "").strip('"'), str(obj.get("sequencer") or ""),
                              str(obj.get("versionId") or "")))
    return uploads


def parse_plain(doc: dict[str, Any]) -> Upload:
    uri = doc["dataset_uri"]
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise Reject(400, "dataset_uri must be an s3:// URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise Reject(400, "dataset_uri must name an object: s3://bucket/key")
    return Upload(bucket, key, str(doc.get("etag") or "").strip('"'))


# --- the store of accepted uploads ----------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    idempotency_key TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    dataset_uri TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    sequencer TEXT NOT NULL,
    prefix TEXT NOT NULL,
    received_at REAL NOT NULL,
    due_at REAL NOT NULL,
    state TEXT NOT NULL,            -- pending | emitted | superseded
    superseded_by TEXT,
    emitted_at REAL
);
CREATE INDEX IF NOT EXISTS uploads_pending ON uploads (state, due_at);
"""


class UploadStore:
    """Accepted uploads in SQLite: written before the 202, marked emitted once the Prefect server has the event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def accept(self, upload: Upload, now: float, debounce: float) -> dict[str, Any]:
        """Record one upload; a second delivery of the same version returns the first one's record."""
        key = upload.idempotency_key(time.time_ns())
        event_id = str(uuid.uuid5(EVENT_NAMESPACE, key))
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
            row = db.execute("SELECT event_id, state FROM uploads WHERE idempotency_key = ?", (key,)).fetchone()
            if row:
                db.execute("COMMIT")
                return {"event_id": row["event_id"], "dataset_uri": upload.uri, "state": row["state"], "duplicate": True}
            # A pending upload under the same prefix: this one replaces it and keeps its window's end.
            pending = db.execute("SELECT idempotency_key, due_at FROM uploads WHERE prefix = ? AND state = 'pending' "
                                 "ORDER BY due_at", (upload.prefix,)).fetchall()
            due_at = pending[0]["due_at"] if pending else now + debounce
            for p in pending:  # the burst so far, and what it had replaced, now points at this upload
                db.execute("UPDATE uploads SET superseded_by = ? WHERE superseded_by = "
                           "(SELECT event_id FROM uploads WHERE idempotency_key = ?)", (event_id, p["idempotency_key"]))
                db.execute("UPDATE uploads SET state = 'superseded', superseded_by = ? WHERE idempotency_key = ?",
                           (event_id, p["idempotency_key"]))
            db.execute("INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, NULL)",
                       (key, event_id, upload.uri, upload.bucket, upload.key, upload.etag, upload.sequencer,
                        upload.prefix, now, due_at))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()
        return {"event_id": event_id, "dataset_uri": upload.uri, "state": "pending", "duplicate": False,
                "emit_after_seconds": round(max(0.0, due_at - now), 3)}

    def due(self, now: float) -> list[sqlite3.Row]:
        with self._connect() as db:
            return db.execute("SELECT * FROM uploads WHERE state = 'pending' AND due_at <= ? ORDER BY due_at",
                              (now,)).fetchall()

    def next_due_at(self) -> float | None:
        with self._connect() as db:
            return db.execute("SELECT MIN(due_at) FROM uploads WHERE state = 'pending'").fetchone()[0]

    def superseded_by(self, event_id: str) -> list[str]:
        with self._connect() as db:
            rows = db.execute("SELECT dataset_uri FROM uploads WHERE superseded_by = ? ORDER BY received_at",
                              (event_id,)).fetchall()
        return [r["dataset_uri"] for r in rows]

    def mark_emitted(self, event_id: str, now: float) -> None:
        with self._connect() as db:
            db.execute("UPDATE uploads SET state = 'emitted', emitted_at = ? WHERE event_id = ? AND state = 'pending'",
                       (now, event_id))

    def rows(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM uploads ORDER BY received_at")]


# --- emitting ----------------------------------------------------------------------------------------------


def build_event(row: Any, superseded: list[str]) -> dict[str, Any]:
    """The Prefect event for one accepted upload; its id is the upload's uuid5, so a re-send is the same event."""
    return {
        "id": row["event_id"],
        "occurred": datetime.fromtimestamp(row["received_at"], timezone.utc).isoformat(),
        "event": EVENT_NAME,
        "resource": {
            "prefect.resource.id": f"{RESOURCE_PREFIX}{row['bucket']}/{row['key']}",
            "prefect.resource.name": row["key"],
        },
        "related": [],
        "payload": {
            "dataset_uri": row["dataset_uri"],
            "etag": row["etag"],
            "sequencer": row["sequencer"],
            "bucket": row["bucket"],
            "key": row["key"],
            "superseded": superseded,  # uploads of the same burst that this one replaced
        },
    }


def prefect_headers() -> dict[str, str]:
    """Auth for the Prefect API, as Prefect's own client sends it."""
    headers = {}
    key = os.environ.get("PREFECT_API_KEY")
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    return headers


class Emitter:
    """Sends due uploads to POST {api}/events and marks them emitted only after the server answered 2xx.

    Runs for the app's lifetime; on start it finds what a previous process accepted but never emitted."""

    def __init__(self, store: UploadStore, api_url: str) -> None:
        self.store, self.api_url = store, api_url
        self.wake = asyncio.Event()
        self.failures = 0

    async def run(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=10, headers=prefect_headers()) as client:
            while True:
                try:
                    await self.emit_due(client)
                    self.failures = 0
                except Exception as exc:  # server down, network: keep the rows, try again later
                    self.failures += 1
                    logger.warning("emitting upload events failed (attempt %d): %s", self.failures, exc)
                await self.sleep()

    async def emit_due(self, client: Any) -> None:
        for row in await asyncio.to_thread(self.store.due, time.time()):
            superseded = await asyncio.to_thread(self.store.superseded_by, row["event_id"])
            response = await client.post(f"{self.api_url}/events", json=[build_event(row, superseded)])
            response.raise_for_status()
            await asyncio.to_thread(self.store.mark_emitted, row["event_id"], time.time())
            logger.info("emitted %s %s for %s", EVENT_NAME, row["event_id"], row["dataset_uri"])

    async def sleep(self) -> None:
        if self.failures:
            delay = min(2.0 ** self.failures, 30.0)
        else:
            next_due = await asyncio.to_thread(self.store.next_due_at)
            delay = 5.0 if next_due is None else min(5.0, max(0.05, next_due - time.time()))
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout=delay)
        except asyncio.TimeoutError:
            pass


# --- the ASGI app ------------------------------------------------------------------------------------------


async def read_body(request: Any) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Reject(413, f"body over {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Reject(413, f"body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def host_allowed(url: str, patterns: tuple[str, ...]) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("https", "http") and any(fnmatch.fnmatch(parsed.netloc.lower(), p.lower())
                                                      for p in patterns)


async def confirm_subscription(notification: Notification, settings: WebhookSettings) -> dict[str, Any]:
    """SNS's handshake: GET the SubscribeURL, but only on a host the settings allow."""
    import httpx

    if not host_allowed(notification.subscribe_url, settings.sns_hosts):
        raise Reject(403, "SubscribeURL host not in LORAFLOW_WEBHOOK_SNS_HOSTS")
    async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
        response = await client.get(notification.subscribe_url)
    if response.status_code >= 300:
        raise Reject(502, f"SubscribeURL answered {response.status_code}")
    logger.info("confirmed SNS subscription to %s", notification.topic_arn)
    return {"confirmed": notification.topic_arn}


def create_app(settings: WebhookSettings) -> Any:
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    store = UploadStore(settings.db_path)
    emitter = Emitter(store, settings.api_url)

    async def dataset_upload(request: Request) -> JSONResponse:
        try:
            body = await read_body(request)
            authenticate(request.headers, request.query_params, body, settings.secret, time.time())
            notification = parse_notification(body)
            if notification.kind == "test":
                return JSONResponse({"ignored": "s3:TestEvent"}, status_code=200)
            if notification.kind == "ignore":
                return JSONResponse({"ignored": "UnsubscribeConfirmation"}, status_code=200)
            if notification.kind == "subscribe":
                return JSONResponse(await confirm_subscription(notification, settings), status_code=200)
            refused = [u.uri for u in notification.uploads
                       if not any(a.covers(u.bucket, u.key) for a in settings.allowed)]
            if refused:
                raise Reject(403, f"not in LORAFLOW_WEBHOOK_ALLOWED: {', '.join(refused)}")
            if not notification.uploads:
                return JSONResponse({"ignored": "no ObjectCreated records"}, status_code=200)
        except Reject as exc:
            logger.warning("refused %s: %d %s", request.client.host if request.client else "?", exc.status, exc.reason)
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        now = time.time()
        accepted = [await asyncio.to_thread(store.accept, u, now, settings.debounce_seconds)
                    for u in notification.uploads]
        emitter.wake.set()
        return JSONResponse({"accepted": accepted, "event_ids": [a["event_id"] for a in accepted]}, status_code=202)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    @asynccontextmanager
    async def lifespan(app: Any):
        task = asyncio.create_task(emitter.run())
        try:
            yield
        finally:
            task.cancel()

    app = Starlette(routes=[Route("/hooks/dataset-upload", dataset_upload, methods=["POST"]),
                            Route("/health", health, methods=["GET"])], lifespan=lifespan)
    app.state.store = store
    return app


def serve(settings: WebhookSettings, host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.info("receiving on http://%s:%d/hooks/dataset-upload; allowed %s; debounce %.0f s; events to %s",
                host, port, ", ".join(f"{a.bucket}/{a.prefix}" for a in settings.allowed),
                settings.debounce_seconds, settings.api_url)
    # The access log would print ?token= query strings: it stays off; the app logs what it refuses.
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_level="info")
