"""The webhook receiver for real: `make stack`'s script (Prefect server, worker, deployments with the on-upload
trigger), moto's ThreadedMotoServer as the S3 bucket whose uploads notify an SNS topic with an HTTP subscription,
and `loraflow webhook serve` as a uvicorn process on a free port. An upload trains one Completed run on that file;
duplicates, bursts, restarts and bad requests start exactly as many runs as they should.

The flow runs read the uploaded file from moto: the stack's AwsCredentials block `loraflow-s3` (what the worker's
runs use for s3://) is pointed at moto here, and on-upload's config_file at a copy of the tiny config."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from loraflow.webhook import sign
from tests.conftest import DEMO_DATA, ROOT, TINY_CONFIG
from tests.local_stack import set_deployment_parameters, stack_env, stack_script
from tests.s3_server import free_port

pytestmark = pytest.mark.slow  # moto, the receiver, the Prefect server and worker, training

SECRET = "e2e-webhook-secret-0123456789abcdef"
UPLOADS = "loraflow-uploads"
HOOK = "/hooks/dataset-upload"
DEBOUNCE = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("webhook-stack")
    env = stack_env(state, "loraflow-webhook-tests", LORAFLOW_WEBHOOK_PORT=str(free_port()))
    up = stack_script("up.sh", env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{env['LORAFLOW_PREFECT_PORT']}/api"
        # make stack's own receiver is up too, with a secret of its own only it was given.
        assert httpx.get(f"http://127.0.0.1:{env['LORAFLOW_WEBHOOK_PORT']}/health", timeout=10).status_code == 200
        assert "LORAFLOW_WEBHOOK_SECRET=" in (state / "webhook.env").read_text()
        yield {"state": state, "api": api, "env": {**env, "PREFECT_API_URL": api,
                                                   "PREFECT_HOME": str(state / "prefect-home")}}
    finally:
        stack_script("down.sh", env, timeout=120)


@pytest.fixture(scope="module")
def moto(stack: dict) -> Iterator[dict[str, Any]]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    # The worker's flow runs read s3:// through the `loraflow-s3` block: here, that is moto.
    saved = subprocess.run([sys.executable, "-c", (
        "from prefect_aws import AwsCredentials; from prefect_aws.client_parameters import AwsClientParameters; "
        "AwsCredentials(aws_access_key_id='testing', aws_secret_access_key='testing', region_name='us-east-1', "
        f"aws_client_parameters=AwsClientParameters(endpoint_url='{endpoint}')).save('loraflow-s3', overwrite=True)")],
        env=stack["env"], capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr
    s3 = boto3.client("s3", endpoint_url=endpoint, **keys)
    s3.create_bucket(Bucket=UPLOADS)
    try:
        yield {"endpoint": endpoint, "port": port, "s3": s3, "sns": boto3.client("sns", endpoint_url=endpoint, **keys)}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def on_upload(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The on-upload deployment, its config_file set to the tiny config (outputs in a temporary folder)."""
    out = tmp_path_factory.mktemp("on-upload")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["output"] = {"dir": str(out / "adapter"), "store": str(out / "store")}
    config_file = out / "tiny-cpu.yaml"
    config_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    deployment_id = set_deployment_parameters(stack["api"], "finetune/on-upload",
                                              {"config_file": str(config_file), "config": {}})
    return {"id": deployment_id, "out": out}


class Receiver:
    """`loraflow webhook serve` in its own process."""

    def __init__(self, stack: dict, moto: dict, db: Path, api_url: str | None = None) -> None:
        self.port, self.db = free_port(), db
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**stack["env"], "LORAFLOW_WEBHOOK_SECRET": SECRET, "LORAFLOW_WEBHOOK_ALLOWED": f"{UPLOADS}/datasets/",
               "LORAFLOW_WEBHOOK_DEBOUNCE": str(DEBOUNCE), "LORAFLOW_WEBHOOK_DB": str(db),
               "LORAFLOW_WEBHOOK_SNS_HOSTS": f"127.0.0.1:{moto['port']}",
               "PREFECT_API_URL": api_url or stack["api"]}
        self.log = open(db.with_suffix(f".{self.port}.log"), "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "cli", "webhook", "serve", "--host",
                                         "127.0.0.1", "--port", str(self.port)], env=env, cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, Path(self.log.name).read_text()
            time.sleep(0.3)

    def post(self, body: bytes, headers: dict[str, str] | None = None, query: str = "") -> httpx.Response:
        return httpx.post(f"{self.url}{HOOK}{query}", content=body, headers=headers or {}, timeout=30)

    def post_signed(self, doc: Any) -> httpx.Response:
        body = json.dumps(doc).encode()
        timestamp = str(int(time.time()))
        return self.post(body, {"X-Loraflow-Timestamp": timestamp, "X-Loraflow-Signature": sign(SECRET, timestamp, body)})

    def rows(self) -> list[dict]:
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM uploads")]

    def stop(self, kill: bool = False) -> None:
        self.process.kill() if kill else self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def receiver(stack: dict, moto: dict, on_upload: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    running = Receiver(stack, moto, tmp_path_factory.mktemp("receiver") / "webhook.sqlite")
    yield running
    running.stop()


def s3_event(key: str, etag: str) -> dict:
    return {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": UPLOADS},
                                                                  "object": {"key": key, "eTag": etag}}}]}


def runs_for(stack: dict, on_upload: dict, uri: str) -> list[dict]:
    runs = httpx.post(f"{stack['api']}/flow_runs/filter", timeout=30,
                      json={"deployments": {"id": {"any_": [on_upload["id"]]}}}).json()
    return [r for r in runs if ((r["parameters"].get("config") or {}).get("data") or {}).get("uri") == uri]


def events_for(stack: dict, bucket_key: str) -> list[dict]:
    found = httpx.post(f"{stack['api']}/events/filter", timeout=30, json={"filter": {
        "event": {"name": ["loraflow.dataset.uploaded"]},
        "resource": {"id": [f"loraflow.dataset.{bucket_key}"]}}}).json()
    return found["events"]


def settled_runs(stack: dict, on_upload: dict, uri: str, expect: int, wait: float = 30) -> list[dict]:
    """The runs for `uri` once `expect` of them exist (or `wait` passed), after a few more seconds for extras."""
    deadline = time.monotonic() + wait
    while len(runs_for(stack, on_upload, uri)) < expect and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(5)
    return runs_for(stack, on_upload, uri)


def cancel(stack: dict, runs: list[dict]) -> None:
    """Runs on missing objects only had to exist: cancel them so the worker keeps its slot for the real one."""
    for run in runs:
        httpx.post(f"{stack['api']}/flow_runs/{run['id']}/set_state", timeout=30,
                   json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True})


def test_bad_requests_get_their_status_and_start_nothing(stack: dict, on_upload: dict, receiver: Receiver) -> None:
    key = "datasets/rejected.json"
    body = json.dumps(s3_event(key, "r1")).encode()
    now = str(int(time.time()))
    stale = str(int(time.time()) - 400)
    statuses = {
        "unsigned": receiver.post(body).status_code,
        "forged": receiver.post(body, {"X-Loraflow-Timestamp": now,
                                       "X-Loraflow-Signature": sign("not-the-secret-0123456789", now, body)}).status_code,
        "stale": receiver.post(body, {"X-Loraflow-Timestamp": stale,
                                      "X-Loraflow-Signature": sign(SECRET, stale, body)}).status_code,
        "wrong token": receiver.post(body, query="?token=guess").status_code,
        "oversize": receiver.post_signed({**s3_event(key, "r2"), "pad": "x" * (1024 * 1024)}).status_code,
        "malformed": receiver.post(b'{"Records": [', {"Authorization": f"Bearer {SECRET}"}).status_code,
        "unknown shape": receiver.post_signed({"object": key}).status_code,
        "other bucket": receiver.post_signed({"dataset_uri": "s3://someone-elses/datasets/x.json"}).status_code,
        "other prefix": receiver.post_signed(s3_event("private/x.json", "r3")).status_code,
    }
    assert statuses == {"unsigned": 401, "forged": 401, "stale": 401, "wrong token": 401, "oversize": 413,
                        "malformed": 400, "unknown shape": 400, "other bucket": 403, "other prefix": 403}
    time.sleep(DEBOUNCE + 3)
    assert receiver.rows() == []
    assert runs_for(stack, on_upload, f"s3://{UPLOADS}/{key}") == []
    assert events_for(stack, f"{UPLOADS}/{key}") == []


def test_twenty_concurrent_duplicates_start_one_run(stack: dict, on_upload: dict, receiver: Receiver) -> None:
    key = "datasets/dup/twenty.json"
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: receiver.post_signed(s3_event(key, "dup-etag")), range(20)))
    assert [a.status_code for a in answers] == [202] * 20
    assert len({a.json()["event_ids"][0] for a in answers}) == 1
    assert sum(not a.json()["accepted"][0]["duplicate"] for a in answers) == 1
    runs = settled_runs(stack, on_upload, f"s3://{UPLOADS}/{key}", expect=1)
    assert len(runs) == 1
    # A re-delivery after the event went out is still the same upload.
    assert receiver.post_signed(s3_event(key, "dup-etag")).json()["accepted"][0]["duplicate"] is True
    assert len(settled_runs(stack, on_upload, f"s3://{UPLOADS}/{key}", expect=1, wait=0)) == 1
    assert len(events_for(stack, f"{UPLOADS}/{key}")) == 1
    cancel(stack, runs)


def test_a_burst_under_one_prefix_starts_one_run_on_the_newest(stack: dict, on_upload: dict, receiver: Receiver) -> None:
    uris = [f"s3://{UPLOADS}/datasets/burst/part-{i}.json" for i in range(3)]
    for i, uri in enumerate(uris):
        assert receiver.post_signed({"dataset_uri": uri, "etag": f"burst-{i}"}).status_code == 202
    runs = settled_runs(stack, on_upload, uris[-1], expect=1)
    assert len(runs) == 1
    assert [len(runs_for(stack, on_upload, uri)) for uri in uris[:-1]] == [0, 0]
    cancel(stack, runs)


def test_a_restart_loses_no_accepted_upload(stack: dict, moto: dict, on_upload: dict,
                                            tmp_path: Path) -> None:
    uri = f"s3://{UPLOADS}/datasets/restart/late.json"
    db = tmp_path / "webhook.sqlite"
    # The first process cannot reach Prefect: it accepts (and persists), then dies before it could emit.
    first = Receiver(stack, moto, db, api_url=f"http://127.0.0.1:{free_port()}/api")
    answer = first.post_signed({"dataset_uri": uri, "etag": "late-1"})
    assert answer.status_code == 202
    time.sleep(DEBOUNCE + 1)
    first.stop(kill=True)
    assert [(r["dataset_uri"], r["state"]) for r in first.rows()] == [(uri, "pending")]
    assert runs_for(stack, on_upload, uri) == []

    second = Receiver(stack, moto, db)
    try:
        runs = settled_runs(stack, on_upload, uri, expect=1)
        assert len(runs) == 1
        assert [r["state"] for r in second.rows()] == ["emitted"]
        cancel(stack, runs)
    finally:
        second.stop()


def test_sns_subscription_confirmation_follows_only_allowed_hosts(moto: dict, receiver: Receiver) -> None:
    topic = moto["sns"].create_topic(Name="confirm-me")["TopicArn"]
    envelope = {"Type": "SubscriptionConfirmation", "TopicArn": topic, "Token": "t0k3n",
                "SubscribeURL": f"{moto['endpoint']}/?Action=ConfirmSubscription&TopicArn={topic}&Token=t0k3n"}
    answer = receiver.post(json.dumps(envelope).encode(), query=f"?token={SECRET}")
    assert answer.status_code == 200 and answer.json() == {"confirmed": topic}
    envelope["SubscribeURL"] = "https://sns.attacker.example/?Action=ConfirmSubscription"
    assert receiver.post(json.dumps(envelope).encode(), query=f"?token={SECRET}").status_code == 403
    assert receiver.post(json.dumps(envelope).encode()).status_code == 401


def test_an_s3_upload_trains_exactly_one_completed_run_on_that_file(stack: dict, moto: dict, on_upload: dict,
                                                                      receiver: Receiver) -> None:
    s3, sns = moto["s3"], moto["sns"]
    topic = sns.create_topic(Name="dataset-uploads")["TopicArn"]
    # SNS cannot sign: it authenticates with the secret in the subscription URL's query string.
    sns.subscribe(TopicArn=topic, Protocol="http", Endpoint=f"{receiver.url}{HOOK}?token={SECRET}")
    s3.put_bucket_notification_configuration(Bucket=UPLOADS, NotificationConfiguration={"TopicConfigurations": [{
        "TopicArn": topic, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "datasets/"}]}}}]})  # sends an s3:TestEvent

    rows = json.loads(DEMO_DATA.read_text())
    rows.append({"instruction": rows[0]["instruction"], "input": f"上传 {time.time_ns()}", "output": rows[0]["output"]})
    data = json.dumps(rows, ensure_ascii=False).encode()
    key = "datasets/new upload (v2).json"  # arrives URL-encoded: datasets/new+upload+%28v2%29.json
    uri = f"s3://{UPLOADS}/{key}"
    started = time.monotonic()
    s3.put_object(Bucket=UPLOADS, Key=key, Body=data)

    assert [(r["dataset_uri"], r["etag"]) for r in receiver.rows() if r["key"] == key] == \
        [(uri, hashlib.md5(data).hexdigest())]
    runs = settled_runs(stack, on_upload, uri, expect=1)
    assert len(runs) == 1
    run_id = runs[0]["id"]
    state = runs[0]["state"]["type"]
    while state not in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} and time.monotonic() - started < 600:
        time.sleep(2)
        state = httpx.get(f"{stack['api']}/flow_runs/{run_id}", timeout=30).json()["state"]["type"]
    print(f"upload -> on-upload run {state} in {time.monotonic() - started:.1f} s")
    worker_log = (stack["state"] / "logs" / "worker.log").read_text(errors="replace")
    assert state == "COMPLETED", worker_log[-5000:]

    summary = json.loads((on_upload["out"] / "adapter" / "summary.json").read_text())
    assert summary["dataset_uri"] == uri
    assert summary["dataset_sha256"] == hashlib.sha256(data).hexdigest()
    assert summary["num_train_examples"] + summary["num_eval_examples"] == len(rows)
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert len(runs_for(stack, on_upload, uri)) == 1
    assert len(events_for(stack, f"{UPLOADS}/{key}")) == 1
    # moto's s3:TestEvent reached the receiver and started nothing.
    assert {r["key"] for r in receiver.rows()} >= {key} and all(r["bucket"] == UPLOADS for r in receiver.rows())
