"""The webhook receiver without servers: notification shapes, authentication, the store's de-duplication and
debounce, and the status codes through the ASGI app (its emitter points at a closed port, so nothing leaves)."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from loraflow.webhook import (
    Allowed,
    Reject,
    Upload,
    UploadStore,
    WebhookSettings,
    authenticate,
    build_event,
    create_app,
    parse_allowed,
    parse_notification,
    sign,
)
from tests.s3_server import free_port

SECRET = "unit-test-secret-0123456789abcdef"


def s3_event(bucket: str, key: str, etag: str = "e1", event: str = "ObjectCreated:Put") -> dict:
    return {"Records": [{"eventName": event, "s3": {"bucket": {"name": bucket},
                                                   "object": {"key": key, "eTag": etag, "sequencer": "0A1"}}}]}


def signed(body: bytes, secret: str = SECRET, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {"X-Loraflow-Timestamp": timestamp, "X-Loraflow-Signature": sign(secret, timestamp, body)}


def test_s3_records_decode_keys_and_skip_other_events() -> None:
    doc = s3_event("b", "datasets/my+file%28v2%29.json")
    doc["Records"].append(s3_event("b", "datasets/gone.json", event="ObjectRemoved:Delete")["Records"][0])
    notification = parse_notification(json.dumps(doc).encode())
    assert notification.uploads == (Upload("b", "datasets/my file(v2).json", "e1", "0A1"),)


def test_sns_envelope_test_event_and_plain_body() -> None:
    inner = json.dumps(s3_event("b", "k.json"))
    sns = {"Type": "Notification", "Message": inner, "TopicArn": "arn:aws:sns:us-east-1:1:t"}
    assert parse_notification(json.dumps(sns).encode()).uploads[0].uri == "s3://b/k.json"
    test_event = {"Type": "Notification", "Message": json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})}
    assert parse_notification(json.dumps(test_event).encode()).kind == "test"
    plain = parse_notification(b'{"dataset_uri": "s3://b/d/x.jsonl", "etag": "\\"abc\\""}')
    assert plain.uploads == (Upload("b", "d/x.jsonl", "abc"),)
    confirm = {"Type": "SubscriptionConfirmation", "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?x", "TopicArn": "t"}
    assert parse_notification(json.dumps(confirm).encode()).kind == "subscribe"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"hello": 1}', b'{"dataset_uri": "/tmp/x.json"}',
                                  b'{"Records": [{"eventName": "ObjectCreated:Put"}]}',
                                  b'{"Type": "Notification", "Message": "nope"}'])
def test_malformed_or_unknown_bodies_are_400(body: bytes) -> None:
    with pytest.raises(Reject) as caught:
        parse_notification(body)
    assert caught.value.status == 400


def test_authentication_methods() -> None:
    body, now = b'{"a": 1}', time.time()
    authenticate({k.lower(): v for k, v in signed(body).items()}, {}, body, SECRET, now)
    authenticate({"authorization": f"Bearer {SECRET}"}, {}, body, SECRET, now)
    authenticate({}, {"token": SECRET}, body, SECRET, now)
    import base64

    authenticate({"authorization": "Basic " + base64.b64encode(f"sns:{SECRET}".encode()).decode()}, {}, body, SECRET, now)
    refused = [
        {k.lower(): v for k, v in signed(body, secret="another-secret-0123456789").items()},  # forged
        {k.lower(): v for k, v in signed(body, at=now - 301).items()},  # stale
        {k.lower(): v for k, v in signed(b'{"a": 2}').items()},  # signature of another body
        {"authorization": "Bearer wrong"},
        {},
    ]
    for headers in refused:
        with pytest.raises(Reject) as caught:
            authenticate(headers, {}, body, SECRET, now)
        assert caught.value.status == 401


def test_allowed_list() -> None:
    allowed = parse_allowed("s3://data/datasets/, other")
    assert allowed == (Allowed("data", "datasets/"), Allowed("other", ""))
    assert allowed[0].covers("data", "datasets/x.json") and not allowed[0].covers("data", "private/x.json")
    assert allowed[1].covers("other", "anything")


def test_store_accepts_a_version_once_even_from_twenty_threads(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "w.sqlite")
    upload = Upload("b", "datasets/a.json", "etag1")
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(store.accept(upload, time.time(), 0))) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r["event_id"] for r in results}) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    assert len(store.rows()) == 1
    # A new version of the same key is a new upload.
    assert not store.accept(Upload("b", "datasets/a.json", "etag2"), time.time(), 0)["duplicate"]


def test_store_debounces_a_burst_under_one_prefix(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "w.sqlite")
    now = 1000.0
    first = store.accept(Upload("b", "d/1.json", "e1"), now, 60)
    store.accept(Upload("b", "d/2.json", "e2"), now + 10, 60)
    last = store.accept(Upload("b", "d/3.json", "e3"), now + 20, 60)
    other = store.accept(Upload("b", "elsewhere/1.json", "e4"), now + 20, 60)
    assert first["emit_after_seconds"] == 60 and last["emit_after_seconds"] == 40  # the window opened at the first
    assert store.due(now + 59) == []
    due = store.due(now + 61)
    assert [row["dataset_uri"] for row in due] == ["s3://b/d/3.json"]
    assert store.superseded_by(last["event_id"]) == ["s3://b/d/1.json", "s3://b/d/2.json"]
    event = build_event(due[0], store.superseded_by(last["event_id"]))
    assert event["resource"]["prefect.resource.id"] == "loraflow.dataset.b/d/3.json"
    assert event["payload"]["dataset_uri"] == "s3://b/d/3.json" and event["payload"]["etag"] == "e3"
    store.mark_emitted(last["event_id"], now + 61)
    assert [row["dataset_uri"] for row in store.due(now + 100)] == ["s3://b/elsewhere/1.json"]
    assert other["event_id"] != last["event_id"]


@pytest.fixture
def client(tmp_path: Path):
    from starlette.testclient import TestClient

    settings = WebhookSettings(secret=SECRET, allowed=(Allowed("data", "datasets/"),), debounce_seconds=0,
                               db_path=tmp_path / "w.sqlite", api_url=f"http://127.0.0.1:{free_port()}/api")
    app = create_app(settings)
    with TestClient(app) as test_client:
        yield test_client, app.state.store


def test_status_codes(client) -> None:
    http, store = client
    url = "/hooks/dataset-upload"
    good = json.dumps(s3_event("data", "datasets/a.json")).encode()
    assert http.post(url, content=good).status_code == 401  # unsigned
    assert http.post(url, content=good, headers=signed(good, secret="forged-secret-0123456789")).status_code == 401
    assert http.post(url, content=good, headers=signed(good, at=time.time() - 600)).status_code == 401
    big = b'{"dataset_uri": "s3://data/datasets/a.json", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    assert http.post(url, content=big, headers=signed(big)).status_code == 413
    bad = b'{"dataset_uri": '
    assert http.post(url, content=bad, headers=signed(bad)).status_code == 400
    elsewhere = json.dumps(s3_event("data", "private/a.json")).encode()
    assert http.post(url, content=elsewhere, headers=signed(elsewhere)).status_code == 403
    other_bucket = json.dumps(s3_event("other", "datasets/a.json")).encode()
    assert http.post(url, content=other_bucket, headers={"Authorization": f"Bearer {SECRET}"}).status_code == 403
    assert store.rows() == []

    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}).encode()
    assert http.post(url, content=test_event, headers=signed(test_event)).status_code == 200
    confirm = json.dumps({"Type": "SubscriptionConfirmation", "TopicArn": "t",
                          "SubscribeURL": "https://attacker.example/confirm"}).encode()
    assert http.post(f"{url}?token={SECRET}", content=confirm).status_code == 403  # a host not allowed: not fetched
    assert store.rows() == []

    accepted = http.post(url, content=good, headers=signed(good))
    assert accepted.status_code == 202, accepted.text
    again = http.post(url, content=good, headers={"Authorization": f"Bearer {SECRET}"})
    assert again.status_code == 202 and again.json()["event_ids"] == accepted.json()["event_ids"]
    assert again.json()["accepted"][0]["duplicate"] is True
    assert [row["dataset_uri"] for row in store.rows()] == ["s3://data/datasets/a.json"]


# --- signatures made the way README tells an uploader to, not with the receiver's own sign() ----------------------

URL = "/hooks/dataset-upload"


def documented_signature(secret: str, timestamp: str, body: bytes) -> str:
    """README: `X-Loraflow-Signature: sha256=<hex of HMAC-SHA256(secret, timestamp + "." + raw body)>`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def test_a_body_signed_by_the_documented_formula_is_accepted_and_one_changed_byte_is_not(client) -> None:
    http, store = client
    body = json.dumps({"dataset_uri": "s3://data/datasets/情感 v2.json", "etag": "e9"}, ensure_ascii=False).encode()
    timestamp = str(int(time.time()))
    headers = {"X-Loraflow-Timestamp": timestamp, "X-Loraflow-Signature": documented_signature(SECRET, timestamp, body)}
    assert http.post(URL, content=body.replace(b"v2", b"v3"), headers=headers).status_code == 401
    assert store.rows() == []
    accepted = http.post(URL, content=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert [row["dataset_uri"] for row in store.rows()] == ["s3://data/datasets/情感 v2.json"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="README's recipe uses openssl")
def test_readmes_openssl_recipe_signs_what_the_receiver_accepts(client) -> None:
    http, store = client
    body = '{"dataset_uri": "s3://data/datasets/reviews.jsonl"}'
    timestamp = str(int(time.time()))
    recipe = "printf '%s.%s' \"$ts\" \"$body\" | openssl dgst -sha256 -hmac \"$LORAFLOW_WEBHOOK_SECRET\" -r | cut -d' ' -f1"
    made = subprocess.run(["bash", "-c", recipe], capture_output=True, text=True, check=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", "ts": timestamp, "body": body, "LORAFLOW_WEBHOOK_SECRET": SECRET})
    signature = made.stdout.strip()
    assert len(signature) == 64  # a bare hex digest
    response = http.post(URL, content=body.encode(),
                         headers={"X-Loraflow-Timestamp": timestamp, "X-Loraflow-Signature": f"sha256={signature}"})
    assert response.status_code == 202, response.text
    assert [row["dataset_uri"] for row in store.rows()] == ["s3://data/datasets/reviews.jsonl"]


@pytest.mark.parametrize(("offset", "status"), [(301, 401), (-301, 401), (290, 202), (-290, 202)])
def test_a_timestamp_more_than_300_s_off_is_refused_either_way(client, offset: int, status: int) -> None:
    """Within 300 s of the receiver's clock, ahead or behind; a correct signature does not save a stale or a
    future timestamp (a captured request replayed later, or one pre-signed to be replayed)."""
    http, store = client
    body = json.dumps({"dataset_uri": "s3://data/datasets/a.json", "etag": f"t{offset}"}).encode()
    timestamp = str(int(time.time()) + offset)
    response = http.post(URL, content=body, headers={"X-Loraflow-Timestamp": timestamp,
                                                     "X-Loraflow-Signature": documented_signature(SECRET, timestamp, body)})
    assert response.status_code == status, response.text
    assert len(store.rows()) == (1 if status == 202 else 0)
