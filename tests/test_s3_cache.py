"""S3 artifact caching against a real S3 server (nanio on 127.0.0.1): reruns skip finished work, artifacts
land whole under content-addressed keys, and a misconfigured store fails with a clear error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.conftest import DEMO_DATA, TINY_CONFIG, run_cli
from tests.hub_standin import HubStandIn
from tests.s3_server import free_port, nanio_server, s3_env

pytestmark = pytest.mark.slow

BUCKET = "loraflow-artifacts"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("nanio") / "data"
    data_dir.mkdir()
    with nanio_server(data_dir) as endpoint:
        env = s3_env(endpoint)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "env": env, "client": client}


def dataset_bytes(rows: list[dict]) -> bytes:
    return json.dumps(rows, ensure_ascii=False).encode()


def upload_dataset(s3: Any, rows: list[dict], key: str) -> str:
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=dataset_bytes(rows))
    return f"s3://{BUCKET}/{key}"


def run_flow(s3: Any, out: Path, dataset: str, *sets: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    args = ["run", "--config", str(TINY_CONFIG), "--dataset", dataset, "--output", str(out),
            "--set", f"output.store=s3://{BUCKET}/runs"]
    for assignment in sets:
        args += ["--set", assignment]
    result = run_cli(*args, env={**s3["env"], **(env or {})})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return json.loads((out / "summary.json").read_text()), log


def keys(s3: Any, prefix: str) -> set[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


@pytest.fixture(scope="module")
def two_runs(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    rows = json.loads(DEMO_DATA.read_text(encoding="utf-8"))
    dataset = upload_dataset(s3, rows, "datasets/sentiment.json")
    work = tmp_path_factory.mktemp("s3-runs")
    first, first_log = run_flow(s3, work / "first", dataset)
    second, second_log = run_flow(s3, work / "second", dataset)
    return {"rows": rows, "dataset": dataset, "work": work, "first": first, "second": second,
            "first_log": first_log, "second_log": second_log}


def test_rerun_is_served_from_the_cache_and_loads_no_model(two_runs: dict) -> None:
    first, second = two_runs["first"], two_runs["second"]
    assert first["cached_tasks"] == []
    assert set(second["cached_tasks"]) >= {"fetch-dataset", "format-prompts", "train", "smoke-infer"}
    assert "Task run 'load-4bit-model" in two_runs["first_log"]
    assert "Task run 'load-4bit-model" not in two_runs["second_log"]
    assert "Task run 'attach-LoRA" not in two_runs["second_log"]
    assert "loaded the published adapter" not in two_runs["second_log"]
    # The cached run reports the same training and the same answers.
    assert second["train_losses"] == first["train_losses"]
    assert second["smoke_answers"] == first["smoke_answers"]
    assert second["adapter_uri"] == first["adapter_uri"]


def test_adapter_and_manifest_are_in_the_bucket(two_runs: dict, s3: Any) -> None:
    adapter_uri = two_runs["first"]["adapter_uri"]
    assert adapter_uri.startswith(f"s3://{BUCKET}/runs/adapters/")
    prefix = adapter_uri.removeprefix(f"s3://{BUCKET}/")
    manifest = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")["Body"].read())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(manifest["files"])
    blobs = keys(s3, "runs/blobs/")
    for meta in manifest["files"].values():  # every file the manifest lists is there, whole
        head = s3["client"].head_object(Bucket=BUCKET, Key=f"runs/blobs/{meta['sha256']}")
        assert f"runs/blobs/{meta['sha256']}" in blobs and head["ContentLength"] == meta["size"]
    assert keys(s3, "runs/results/"), "Prefect's task results were not persisted to the bucket"
    # The adapter saved locally is the one in the bucket.
    local = two_runs["work"] / "second" / "adapter_model.safetensors"
    import hashlib

    assert hashlib.sha256(local.read_bytes()).hexdigest() == manifest["files"]["adapter_model.safetensors"]["sha256"]


def test_changed_prompts_rerun_smoke_infer_only(two_runs: dict, s3: Any) -> None:
    summary, log = run_flow(
        s3, two_runs["work"] / "prompts", two_runs["dataset"],
        'infer.prompts=[{"instruction": "分类以下文本的情感。", "input": "这家店的服务太差了"}]',
    )
    assert "train" in summary["cached_tasks"] and "smoke-infer" not in summary["cached_tasks"]
    # the published adapter was found before any step would train: no train task run at all, smoke-infer reran
    assert "Task run 'train" not in log and "Task run 'smoke-infer" in log
    assert "loaded the published adapter" in log  # smoke-infer loaded base + cached adapter itself
    assert "Task run 'load-4bit-model" not in log  # ... and no training model was prepared
    assert summary["smoke_answers"][-1]["input"] == "这家店的服务太差了"


def test_a_rerun_that_changes_only_the_hub_repo_trains_nothing(two_runs: dict, s3: Any) -> None:
    """hub.* is not part of what the adapter depends on: the same training is served from the store and pushed
    to the newly named repo."""
    with HubStandIn() as hub:
        summary, log = run_flow(
            s3, two_runs["work"] / "renamed", two_runs["dataset"], "hub.repo_id=loraflow-tests/renamed-adapter",
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_sentinel_token_for_tests", "HF_HUB_OFFLINE": "0"},
        )
    assert set(summary["cached_tasks"]) >= {"fetch-dataset", "format-prompts", "train", "smoke-infer"}
    assert "Task run 'load-4bit-model" not in log
    assert summary["adapter_uri"] == two_runs["first"]["adapter_uri"]
    assert summary["hub_url"].endswith("/loraflow-tests/renamed-adapter")
    pushed = hub.record.files["loraflow-tests/renamed-adapter"]["adapter_model.safetensors"]
    local = two_runs["work"] / "first" / "adapter_model.safetensors"
    assert pushed == local.read_bytes()  # what went up is the adapter the first run trained


def test_one_changed_row_retrains(two_runs: dict, s3: Any) -> None:
    """The cache follows the bytes, not the object's name: the rows two_runs trained on, under a name never used
    before, are served from the cache; the same key uploaded again with one row changed retrains (a cache keyed
    on the URI alone would serve the old adapter, one keyed on the name would retrain the first time too)."""
    key, rows = "datasets/reuploaded.json", [dict(row) for row in two_runs["rows"]]
    dataset = upload_dataset(s3, rows, key)
    before, before_log = run_flow(s3, two_runs["work"] / "reupload-before", dataset)
    assert "train" in before["cached_tasks"] and "Task run 'load-4bit-model" not in before_log
    assert before["adapter_uri"] == two_runs["first"]["adapter_uri"]
    etag = s3["client"].head_object(Bucket=BUCKET, Key=key)["ETag"]

    rows[0]["input"] = rows[0]["input"] + "！"
    upload_dataset(s3, rows, key)  # the same key, one row changed
    assert s3["client"].head_object(Bucket=BUCKET, Key=key)["ETag"] != etag
    summary, log = run_flow(s3, two_runs["work"] / "changed", dataset)
    assert summary["cached_tasks"] == []
    assert "Task run 'load-4bit-model" in log and "Task run 'train" in log
    assert summary["dataset_uri"] == before["dataset_uri"] == dataset
    assert summary["dataset_sha256"] == hashlib.sha256(dataset_bytes(rows)).hexdigest()
    assert summary["dataset_sha256"] != two_runs["first"]["dataset_sha256"]
    assert summary["adapter_uri"] != two_runs["first"]["adapter_uri"]


@pytest.mark.parametrize(
    ("problem", "expected"),
    [("wrong-secret", "rejected the credentials"), ("missing-bucket", "does not exist"), ("unreachable", "cannot reach")],
)
def test_misconfigured_store_fails_clearly(problem: str, expected: str, s3: Any, tmp_path: Path) -> None:
    env, bucket = dict(s3["env"]), BUCKET
    if problem == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif problem == "missing-bucket":
        bucket = "no-such-bucket"
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("run", "--config", str(TINY_CONFIG), "--output", str(tmp_path / "out"),
                     "--set", f"output.store=s3://{bucket}/runs", env={**env, "LORAFLOW_CACHE_DIR": str(tmp_path / "c")})
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode in (1, 2)
    # README's exit codes: refused credentials or a missing bucket are input (2); an endpoint down is not (1)
    assert result.returncode == (1 if problem == "unreachable" else 2), result.stderr[-3000:]
    assert last_line.startswith("error: ") and expected in last_line
    assert env["AWS_ENDPOINT_URL"] in last_line and bucket in last_line
    assert "Traceback" not in result.stderr
    assert "not-the-secret" not in result.stderr + result.stdout
    assert not (tmp_path / "c").exists()  # no model was prepared


@pytest.mark.parametrize(
    ("problem", "expected"),
    [("no-credentials", "no AWS credentials"), ("wrong-secret", "refused to read it (SignatureDoesNotMatch)"),
     ("missing-object", "no such object"), ("unreachable", "cannot reach S3 endpoint")],
)
def test_an_unreadable_s3_dataset_fails_in_one_line_before_anything_starts(
    problem: str, expected: str, s3: Any, tmp_path: Path
) -> None:
    dataset = upload_dataset(s3, json.loads(DEMO_DATA.read_text(encoding="utf-8")), "datasets/readable.json")
    env = dict(s3["env"])
    if problem == "no-credentials":  # nothing in the environment, no credentials file, no instance metadata
        env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
                   AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    elif problem == "wrong-secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif problem == "missing-object":
        dataset = dataset.replace("readable.json", "never-uploaded.json")
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("run", "--config", str(TINY_CONFIG), "--dataset", dataset, "--output", str(tmp_path / "out"),
                     "--set", f"output.store={tmp_path / 'store'}", env={**env, "LORAFLOW_CACHE_DIR": str(tmp_path / "c")})
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == (1 if problem == "unreachable" else 2), result.stderr[-3000:]
    assert last_line.startswith(f"error: {dataset}: ") and expected in last_line
    assert "Traceback" not in result.stderr
    assert "not-the-secret" not in result.stderr + result.stdout
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()  # no model prepared, nothing written
