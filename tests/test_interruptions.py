"""Training survives interruption and secrets never leak, on the real stack (`make stack`'s scripts: Prefect
server, nanio S3, pool `gpu`, a process worker, the webhook receiver):

- a flow run SIGKILLed mid-training (after a checkpoint) and run again resumes from its last checkpoint;
- `prefect flow-run cancel` stops a training run, its processes gone within 30 s, its last checkpoint usable;
- two runs of one config at the same time both finish with a valid adapter;
- the stack runs with sentinel secrets (S3 secret key in the AwsCredentials block, HF token in the Secret block
  `hf-token`, the webhook secret in the receiver's environment; the two concurrent runs get the S3 key and the
  HF token from their environment), and afterwards none of them is in Prefect's logs, runs, parameters, results,
  artifacts or events, in the stack's logs, the bucket, the output folders or the runs' output. That test runs
  last and scans what every run of the module left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import httpx
import pytest
import torch

from loraflow.checkpoints import fetch_latest_checkpoint, stored_checkpoints
from loraflow.store import open_store
from tests.conftest import ROOT, TINY_CONFIG
from tests.hub_standin import HubStandIn
from tests.local_stack import (
    alive, flow_run_processes, read_env_file, stack_env, stack_script, start_deployment_run, wait_for_state,
)

pytestmark = pytest.mark.slow  # the local stack and training runs

BUCKET = "loraflow-interruption-tests"
TINY = "deployments/configs/tiny-cpu.yaml"  # relative to the project: the worker's runs start there
HUB_REPO = "loraflow-tests/resumed"
SENTINELS = {
    "HF token": "hf_SENTINELhubtoken4c1d9e07b2",
    "AWS secret key": "SENTINELawssecretkey7b2f0e91aa53",
    "webhook secret": "SENTINEL-webhook-secret-3f8e1c55d0",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("interruptions-stack")
    # The secrets, where production keeps them: the S3 keys and the webhook secret in the files up.sh reads
    # (the S3 keys then go into the AwsCredentials block), the HF token in a Prefect Secret block (below).
    (state / "s3.env").write_text(f"AWS_ACCESS_KEY_ID=loraflow-sentinel\nAWS_SECRET_ACCESS_KEY={SENTINELS['AWS secret key']}\n")
    (state / "webhook.env").write_text(f"LORAFLOW_WEBHOOK_SECRET={SENTINELS['webhook secret']}\n")
    with HubStandIn() as hub:
        # The worker's runs push to the Hub stand-in (offline mode would block even that; models are local files).
        env = stack_env(state, BUCKET, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
        env.pop("HF_TOKEN", None)
        up = stack_script("up.sh", env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            api = f"http://127.0.0.1:{env['LORAFLOW_PREFECT_PORT']}/api"
            cli_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "prefect-home")}
            saved = subprocess.run(
                [sys.executable, "-c", "import os; from prefect.blocks.system import Secret; "
                 "Secret(value=os.environ['HF_TOKEN_FOR_BLOCK']).save('hf-token', overwrite=True)"],
                env={**cli_env, "HF_TOKEN_FOR_BLOCK": SENTINELS["HF token"]}, capture_output=True, text=True, timeout=120)
            assert saved.returncode == 0, saved.stderr
            endpoint = f"http://127.0.0.1:{env['LORAFLOW_S3_PORT']}"
            s3_keys = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **read_env_file(state / "s3.env")}
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=s3_keys["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=s3_keys["AWS_SECRET_ACCESS_KEY"])
            yield {"state": state, "api": api, "env": cli_env, "s3": s3, "s3_keys": s3_keys, "hub": hub.record,
                   "webhook": f"http://127.0.0.1:{env['LORAFLOW_WEBHOOK_PORT']}", "outputs": []}
        finally:
            down = stack_script("down.sh", env, timeout=120)
            assert down.returncode == 0 and not list((state / "pids").glob("*.pid")), down.stdout + down.stderr


def bucket_keys(stack: dict, prefix: str) -> list[str]:
    pages = stack["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def wait_for_checkpoint(stack: dict, prefix: str, run_id: str, timeout: float = 600) -> int:
    """The step of the first complete checkpoint under `prefix` (its manifest exists) while the run trains."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(key.split("/step-")[1].split("-")[0]) for key in bucket_keys(stack, prefix)
                 if key.endswith("/manifest.json")]
        if steps:
            return max(steps)
        response = httpx.get(f"{stack['api']}/flow_runs/{run_id}", timeout=30).json()
        assert response["state"]["type"] in {"SCHEDULED", "PENDING", "RUNNING"}, response["state"]
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint under {prefix} within {timeout} s")


def run_logs(stack: dict, run_id: str) -> str:
    logs = httpx.post(f"{stack['api']}/logs/filter", timeout=60, json={
        "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}).json()
    return "\n".join(entry["message"] for entry in logs)


def use_stack_s3_here(stack: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's S3 clients (loraflow's store) talk to the stack's bucket, until the test ends."""
    for name, value in stack["s3_keys"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the first credentials it found, for good


def assert_adapter_reloads(out: Path, summary: dict) -> None:
    """The output folder's adapter loads onto the base model and answers the demo prompt as smoke-infer did."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.models import resolve_model

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.abs().sum() > 0 for name, t in tensors.items() if "lora_B" in name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("loraflow:tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    demo = summary["smoke_answers"][-1]
    ids = tokenizer(f"分类以下文本的情感。\n{demo['input']}\n答:", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == demo["answer"]


# --- SIGKILL mid-training, then the same config again ----------------------------------------------------------


@pytest.fixture(scope="module")
def killed_then_rerun(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("resume") / "out"
    stack["outputs"].append(out.parent)
    config = {"output": {"dir": str(out), "store": f"s3://{BUCKET}/resume"}, "hub": {"repo_id": HUB_REPO}}
    first = start_deployment_run(stack["env"], "finetune/manual", TINY, config)
    checkpoint_step = wait_for_checkpoint(stack, "resume/checkpoints/", first)
    processes = flow_run_processes(first)
    assert processes, "the flow run's process was not found"
    for process in processes:  # what the OOM killer or a dying box does: no handler, no clean-up runs
        process.send_signal(signal.SIGKILL)
    first_state = wait_for_state(stack["api"], first, set(), timeout=120)

    second = start_deployment_run(stack["env"], "finetune/manual", TINY, config)
    second_state = wait_for_state(stack["api"], second, set(), timeout=900)
    worker_log = (stack["state"] / "logs" / "worker.log").read_text(errors="replace")
    assert second_state == "COMPLETED", worker_log[-5000:]
    return {"first": first, "first_state": first_state, "second": second, "checkpoint_step": checkpoint_step,
            "out": out, "summary": json.loads((out / "summary.json").read_text())}


def test_a_killed_run_resumes_from_its_last_checkpoint_when_run_again(stack: dict, killed_then_rerun: dict) -> None:
    run = killed_then_rerun
    summary = run["summary"]
    assert run["first_state"] == "CRASHED"
    # It resumed from the checkpoint seen before the kill (or a later one): at most one save interval redone.
    assert summary["resumed_from_step"] >= run["checkpoint_step"] > 0
    assert summary["train_steps"] == 120 and "train" not in summary["cached_tasks"]
    assert f"resuming from the stored checkpoint at step {summary['resumed_from_step']}" in run_logs(stack, run["second"])
    # One loss curve, steps 1..120; the steps after the checkpoint continue from trained weights: a fresh start
    # would begin again near the first step's loss.
    losses = summary["train_losses"]
    assert [step for step, _ in losses] == list(range(1, 121))
    assert losses[summary["resumed_from_step"]][1] < 0.5 * losses[0][1]
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"]
    # The adapter is complete in the bucket and in the output folder, and it reloads.
    manifest_key = summary["adapter_uri"].removeprefix(f"s3://{BUCKET}/") + "/manifest.json"
    manifest = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(manifest["files"])
    assert_adapter_reloads(run["out"], summary)


# --- cancellation ----------------------------------------------------------------------------------------------


def test_a_cancelled_run_is_gone_within_30_s_and_leaves_a_usable_checkpoint(
    stack: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"output": {"dir": str(tmp_path / "out"), "store": f"s3://{BUCKET}/cancel"},
              "train": {"max_steps": 100000, "save_steps": 20}}  # would train for hours
    run_id = start_deployment_run(stack["env"], "finetune/manual", TINY, config)
    wait_for_checkpoint(stack, "cancel/checkpoints/", run_id)
    processes = flow_run_processes(run_id)
    assert processes and all(alive(p) for p in processes)

    cancelled_at = time.monotonic()
    cancel = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "cancel", run_id],
                            env=stack["env"], capture_output=True, text=True, timeout=60)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    while any(alive(p) for p in processes) and time.monotonic() - cancelled_at < 30:
        time.sleep(0.5)
    left = [f"{p.pid} {p.cmdline()}" for p in processes if alive(p)]
    assert not left, f"still running 30 s after the cancel: {left}"
    print(f"cancel -> processes gone in {time.monotonic() - cancelled_at:.1f} s")
    assert wait_for_state(stack["api"], run_id, set(), timeout=60) == "CANCELLED"

    # The newest complete checkpoint downloads whole (sha256-checked) and has all a resume needs.
    use_stack_s3_here(stack, monkeypatch)
    store = open_store(f"s3://{BUCKET}/cancel")
    [train_key] = {key.split("/")[2] for key in bucket_keys(stack, "cancel/checkpoints/")}
    fetched = fetch_latest_checkpoint(store, f"checkpoints/{train_key}", tmp_path / "resume")
    assert fetched is not None
    folder, step = fetched
    assert step >= 20 and step % 20 == 0
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step


# --- two runs of one config at once ----------------------------------------------------------------------------


def test_two_concurrent_runs_of_one_config_both_finish_with_a_valid_adapter(
    stack: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both against the stack's server and bucket, as two `loraflow run`s (the deployments allow one run at a
    time); checkpoints every 20 steps and only the newest kept, so each run prunes what the other wrote.
    These take their secrets from the environment (the worker's runs from blocks); the secret scan below reads
    their output too."""
    stack["outputs"].append(tmp_path)
    env = {**stack["env"], **stack["s3_keys"], "HF_TOKEN": SENTINELS["HF token"]}
    outs = [tmp_path / "a", tmp_path / "b"]
    processes = [subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "--config", str(TINY_CONFIG), "--output", str(out),
         "--set", f"output.store=s3://{BUCKET}/concurrent", "--set", "train.max_steps=60", "--set", "train.save_steps=20",
         "--set", "train.save_total_limit=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    logs = [process.communicate(timeout=900)[0] for process in processes]
    for out, log in zip(outs, logs):
        out.with_suffix(".log").write_text(log)
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]

    summaries = [json.loads((out / "summary.json").read_text()) for out in outs]
    assert all("train" not in s["cached_tasks"] for s in summaries)  # both trained, neither served from cache
    assert all("train: checkpoint at step" in log for log in logs)
    assert summaries[0]["adapter_uri"] == summaries[1]["adapter_uri"]
    for out, summary in zip(outs, summaries):
        assert_adapter_reloads(out, summary)

    use_stack_s3_here(stack, monkeypatch)
    store = open_store(f"s3://{BUCKET}/concurrent")
    adapter_key = summaries[0]["adapter_uri"].removeprefix(f"s3://{BUCKET}/concurrent/")
    store.get_folder(adapter_key, tmp_path / "published")  # every file there, whole (sha256-checked)
    prefix = "checkpoints/" + adapter_key.removeprefix("adapters/")
    left = stored_checkpoints(store, prefix)
    assert left and left[0].step == 60
    for checkpoint in left:  # whatever each run pruned of the other's, what is listed is complete
        store.get_folder(checkpoint.key, tmp_path / "checkpoints" / checkpoint.key.rsplit("/", 1)[1])


# --- secrets ---------------------------------------------------------------------------------------------------


def prefect_records(api: str) -> dict[str, str]:
    """Everything Prefect's API keeps about runs: flow runs (with their parameters), task runs (with their
    states), logs, artifacts, deployments and events, as JSON text."""
    records = {}
    for kind in ("flow_runs", "task_runs", "logs", "artifacts", "deployments"):
        items: list = []
        while True:
            page = httpx.post(f"{api}/{kind}/filter", json={"limit": 200, "offset": len(items)}, timeout=60).json()
            items += page
            if len(page) < 200:
                break
        records[kind] = json.dumps(items, ensure_ascii=False)
    events, response = [], httpx.post(f"{api}/events/filter", json={"limit": 50}, timeout=60).json()  # its page size
    while True:
        events += response["events"]
        if not response.get("next_page"):
            break
        response = httpx.get(response["next_page"], timeout=60).json()
    records["events"] = json.dumps(events, ensure_ascii=False)
    return records


def test_no_secret_reaches_logs_results_artifacts_outputs_or_parameters(stack: dict, killed_then_rerun: dict) -> None:
    # The secrets were in use: the token authenticated the Hub push, the S3 key every upload, and the webhook
    # accepts its secret (in the query string, which an access log would print) and refuses another.
    pushes = [h for method, path, h in stack["hub"].requests if method == "POST" and "/commit/" in path]
    assert pushes and all({k.lower(): v for k, v in h.items()}["authorization"] == f"Bearer {SENTINELS['HF token']}"
                          for h in pushes)
    hook = f"{stack['webhook']}/hooks/dataset-upload"
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET}).encode()
    assert httpx.post(hook, params={"token": SENTINELS["webhook secret"]}, content=test_event, timeout=30).status_code == 200
    assert httpx.post(hook, params={"token": "not-the-secret-at-all"}, content=test_event, timeout=30).status_code == 401

    scanned: dict[str, bytes] = {f"prefect api {kind}": text.encode() for kind, text in prefect_records(stack["api"]).items()}
    assert "resuming from the stored checkpoint" in scanned["prefect api logs"].decode()
    for path in (stack["state"] / "logs").iterdir():  # the worker's output (every run's stdout), server, S3, webhook
        scanned[str(path)] = path.read_bytes()
    keys = bucket_keys(stack, "")
    assert [k for k in keys if "/results/" in k] and [k for k in keys if "/checkpoints/" in k and "training_args" in k]
    for key in keys:  # Prefect's persisted results, adapters, checkpoints, summaries
        scanned[f"s3://{BUCKET}/{key}"] = stack["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    for folder in stack["outputs"]:  # adapter, model card, summary.json
        for path in Path(folder).rglob("*"):
            if path.is_file():
                scanned[str(path)] = path.read_bytes()
    assert any(name.endswith("out/README.md") for name in scanned) and any(name.endswith("summary.json") for name in scanned)
    for repo_files in stack["hub"].files.values():
        scanned.update({f"hub:{name}": content for name, content in repo_files.items()})

    leaks = [f"{what} in {where}" for where, content in scanned.items() for what, secret in SENTINELS.items()
             if secret.encode() in content]
    assert not leaks, leaks
    print(f"scanned {len(scanned)} logs, records, objects and files: no secret")
