"""The store under faults, on the real local stack (`make stack`'s scripts: Prefect server, nanio S3, pool `gpu`, a
process worker), with real training of the tiny model (60 steps, a checkpoint every 30; fewer and its answers
do not reach EOS yet, so smoke-infer's gate fails the run):

- gc beside a run: a store prefix with cut-short uploads, superseded checkpoints, old summaries and results and an
  unpromoted old candidate, next to what an alias and a recent run need; the `store-gc` deployment marks, a run is
  started, and the sweep (after the grace period) runs while that run writes its checkpoints: exactly the unused
  things go, the run completes, and every manifest left is whole (`verify`). That run, disturbed by no outage, is
  the reference the runs below are compared with.
- one run with the S3 process SIGKILLed three times and restarted after a pause shorter than the retry budget:
  while Prefect persists the first task result, during the first checkpoint's upload, and during the adapter's
  publish. The run completes; its adapter gives the reference run's logits; no manifest points at a missing or
  partial object; a rerun of the config is served from the cache.
- an outage longer than the retry budget (S3 killed during the adapter's publish and left down): the flow run ends
  Failed with one line naming the endpoint, the worker lives on, and the next run resumes from the last complete
  checkpoint. (Its store starts with the checkpoints of the run above, copied: it resumes at step 60 and trains
  nothing, which keeps the module's time down; what is tested is the publish and the recovery.)

The kills are placed by watching nanio's data folder: it creates an object's folder before it writes the object
(to a temporary file it renames when the body is in), so the first sign of a checkpoint or a blob comes before
its upload is done, and a SIGKILL then lands mid-upload: the temporary file stays behind, as a real crash leaves it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3
import httpx
import pytest
import torch

from loraflow.store_gc import GcPolicy, collect_garbage
from loraflow.store_verify import verify_store
from tests.local_stack import read_env_file, stack_env, stack_script, start_deployment_run, wait_for_state
from tests.s3_server import Nanio, backdate

pytestmark = pytest.mark.slow

BUCKET = "loraflow-store-faults"
TINY = "deployments/configs/tiny-cpu.yaml"  # relative to the project: the worker's runs start there
SHORT = {"max_steps": 60, "save_steps": 30}  # checkpoints at steps 30 and 60
RETRY_SECONDS = 20  # LORAFLOW_STORE_RETRY_SECONDS on the stack: what an outage may last before a step fails
PAUSE = 4  # seconds the S3 server stays dead in the short outages (it then takes ~1-2 s to listen again)
GRACE_HOURS = 0.005  # 18 s between gc's mark and its sweep


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("store-faults-stack")
    env = stack_env(state, BUCKET, LORAFLOW_STORE_RETRY_SECONDS=str(RETRY_SECONDS))
    up = stack_script("up.sh", env)
    s3_server = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = f"http://127.0.0.1:{env['LORAFLOW_PREFECT_PORT']}/api"
        keys = read_env_file(state / "s3.env")
        endpoint = f"http://127.0.0.1:{env['LORAFLOW_S3_PORT']}"
        s3_server = Nanio(state / "s3-data", int(env["LORAFLOW_S3_PORT"]), keys["AWS_ACCESS_KEY_ID"],
                          keys["AWS_SECRET_ACCESS_KEY"], log=state / "logs" / "s3.log",
                          pid=int((state / "pids" / "s3.pid").read_text()))
        s3_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", **keys}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        yield {"state": state, "api": api, "env": {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "prefect-home")},
               "s3": s3, "s3_env": s3_env, "server": s3_server, "data": state / "s3-data" / BUCKET}
    finally:
        if s3_server is not None and s3_server.process is not None:  # ours now: down.sh finds it by its pid file
            (state / "pids" / "s3.pid").write_text(str(s3_server.pid))
        down = stack_script("down.sh", env, timeout=120)
        assert down.returncode == 0 and not list((state / "pids").glob("*.pid")), down.stdout + down.stderr


@pytest.fixture
def store_env(stack: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's S3 clients (gc, verify) talk to the stack's bucket, with the stack's retry budget."""
    for name, value in {**stack["s3_env"], "LORAFLOW_STORE_RETRY_SECONDS": str(RETRY_SECONDS)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the first credentials it found, for good


def restart_s3(stack: dict) -> None:
    stack["server"].start()
    (stack["state"] / "pids" / "s3.pid").write_text(str(stack["server"].pid))


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.002) -> Any:
    """Poll `condition` until it returns something truthy (returned); a short interval: an upload is brief."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"not seen within {timeout} s")


def entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def run_until_done(stack: dict, config: dict, timeout: float = 600) -> tuple[str, str]:
    run_id = start_deployment_run(stack["env"], "finetune/manual", TINY, config)
    return run_id, wait_for_state(stack["api"], run_id, set(), timeout=timeout)


def flow_run(stack: dict, run_id: str) -> dict:
    return httpx.get(f"{stack['api']}/flow_runs/{run_id}", timeout=30).json()


def worker_log(stack: dict) -> str:
    return (stack["state"] / "logs" / "worker.log").read_text(errors="replace")


def adapter_logits(out: Path) -> torch.Tensor:
    """The saved adapter on the tiny base model: logits for a fixed prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("loraflow:tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = AutoTokenizer.from_pretrained(out)("分类以下文本的情感。\n我不喜欢在雨中踢足球\n答:", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# --- gc beside a run --------------------------------------------------------------------------------------------


def build_aged_store(stack: dict, tmp: Path) -> dict[str, set[str]]:
    """Under s3://BUCKET/gc: one of everything gc judges, aged on nanio's disk. Returns the doomed and the kept."""
    from loraflow.store import open_store

    store = open_store(f"s3://{BUCKET}/gc")
    tokenizer = b'{"shared": "by every adapter of one base model"}'

    def publish(key: str, days: float, shared_blobs: bool = True, **files: bytes) -> None:
        folder = tmp / key
        folder.mkdir(parents=True)
        for name, content in {"tokenizer.json": tokenizer, **files}.items():
            (folder / name).write_bytes(content)
        store.put_folder(folder, key, shared_blobs=shared_blobs)
        for obj in stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix=f"gc/{key}/")["Contents"]:
            backdate(stack["data"].parent, BUCKET, obj["Key"], days)
        for content in files.values():
            blob = f"gc/blobs/{hashlib.sha256(content).hexdigest()}"
            if shared_blobs:
                backdate(stack["data"].parent, BUCKET, blob, days)

    def put(key: str, body: bytes, days: float) -> None:
        store.put_bytes(body, key)
        backdate(stack["data"].parent, BUCKET, f"gc/{key}", days)

    publish("adapters/prod-key", 200, **{"adapter_model.safetensors": b"production weights" * 99})
    publish("adapters/challenger", 120, **{"adapter_model.safetensors": b"challenger weights" * 99})
    publish("adapters/recent-ref", 120, **{"adapter_model.safetensors": b"weights a recent run names" * 99})
    publish("adapters/old-candidate", 120, **{"adapter_model.safetensors": b"never promoted" * 99})
    publish("merged/old-candidate-bfloat16", 120, **{"model.safetensors": b"merged, never promoted" * 99})
    publish("merged/prod-key-bfloat16", 120, **{"model.safetensors": b"merged production" * 99})
    publish("checkpoints/prod-key/step-3-aaaa", 200, False, **{"optimizer.pt": b"step 3" * 99})
    publish("checkpoints/prod-key/step-6-aaaa", 200, False, **{"optimizer.pt": b"step 6" * 99})
    publish("checkpoints/old-candidate/step-6-bbbb", 120, False, **{"optimizer.pt": b"old step 6" * 99})
    # Uploads cut short two days ago: a checkpoint without its manifest, a blob no manifest lists, and the temporary
    # file nanio leaves when it dies mid-PUT (it shows in listings under its own name).
    put("checkpoints/prod-key/step-9-cccc/files/optimizer.pt", b"cut short" * 99, 2)
    orphan = hashlib.sha256(b"a publish cut short").hexdigest()
    put(f"blobs/{orphan}", b"a publish cut short", 2)
    leftover = stack["data"] / "gc" / "blobs" / ".tmp.0123456789abcdef"
    leftover.write_bytes(b"half a blob")
    backdate(stack["data"].parent, BUCKET, "gc/blobs/.tmp.0123456789abcdef", 2)
    put("summaries/old-run.json", json.dumps({"adapter_uri": f"s3://{BUCKET}/gc/adapters/old-candidate"}).encode(), 40)
    put("summaries/old-run/loss_curve.png", b"png", 40)
    put("summaries/young-run.json", json.dumps({"adapter_uri": f"s3://{BUCKET}/gc/adapters/recent-ref"}).encode(), 1)
    put("results/old-record", b"a Prefect result", 40)
    put("aliases/sentiment.json", json.dumps({"line": "sentiment", "aliases": {
        "production": {"adapter_key": "adapters/prod-key"}, "candidate": {"adapter_key": "adapters/challenger"}},
        "history": [{"alias": "production", "adapter_key": "adapters/old-candidate", "at": 1.0}]}).encode(), 200)

    def sha(content: bytes) -> str:
        return hashlib.sha256(content).hexdigest()

    doomed = {"adapters/old-candidate", "merged/old-candidate-bfloat16", "checkpoints/prod-key/step-3-aaaa",
              "checkpoints/old-candidate/step-6-bbbb", "checkpoints/prod-key/step-9-cccc", f"blobs/{orphan}",
              "blobs/.tmp.0123456789abcdef", f"blobs/{sha(b'never promoted' * 99)}",
              f"blobs/{sha(b'merged, never promoted' * 99)}", "summaries/old-run", "results/old-record"}
    kept = {"adapters/prod-key", "adapters/challenger", "adapters/recent-ref", "merged/prod-key-bfloat16",
            "checkpoints/prod-key/step-6-aaaa"}
    return {"doomed": doomed, "kept": kept}


def start_gc_deployment(stack: dict, store: str) -> str:
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", "store-gc/store-gc",
         "--param", f"store={store}", "--param", f"grace_hours={GRACE_HOURS}"],
        env=stack["env"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stdout + printed.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", printed.stdout).group(1)


@pytest.fixture(scope="module")
def gc_beside_a_run(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("gc")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**stack["s3_env"], "LORAFLOW_STORE_RETRY_SECONDS": str(RETRY_SECONDS)}.items():
            patch.setenv(name, value)
        patch.setattr(boto3, "DEFAULT_SESSION", None)
        expected = build_aged_store(stack, work / "src")
        # An upload in flight while the first pass looks (a file a second, no manifest yet): too young to be a
        # candidate. It stops before the sweep, so by then it is a cut-short upload, seen for the first time.
        uploading = threading.Event()
        uploading.set()

        def upload_in_flight() -> None:
            part = 0
            while uploading.is_set():
                stack["s3"].put_object(Bucket=BUCKET, Key=f"gc/checkpoints/wip/step-3-dddd/files/part-{part}", Body=b"x")
                part += 1
                time.sleep(1)

        writer = threading.Thread(target=upload_in_flight, daemon=True)
        writer.start()
        started = time.monotonic()

        mark = start_gc_deployment(stack, f"s3://{BUCKET}/gc")  # phase one, as the weekly deployment runs it
        mark_state = wait_for_state(stack["api"], mark, set(), timeout=300)
        uploading.clear()
        writer.join()
        assert mark_state == "COMPLETED", worker_log(stack)[-5000:]
        marks = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key="gc/gc/marks.json")["Body"].read())["marks"]
        marked_at = min(m["marked_at"] for m in marks.values())

        out = work / "out"
        run_id = start_deployment_run(stack["env"], "finetune/manual", TINY,
                                      {"output": {"dir": str(out), "store": f"s3://{BUCKET}/gc"}, "train": SHORT})
        # The sweep, once the grace period has passed, while the run writes: its first checkpoint is complete.
        wait_for(lambda: list((stack["data"] / "gc" / "checkpoints").glob("*/step-30-*/manifest.json")),
                 timeout=600, interval=0.2)
        time.sleep(max(0.0, marked_at + GRACE_HOURS * 3600 - time.time()))
        policy = GcPolicy(grace_hours=GRACE_HOURS)
        sweep = collect_garbage(f"s3://{BUCKET}/gc", policy)
        run_state_at_sweep = flow_run(stack, run_id)["state"]["type"]
        state = wait_for_state(stack["api"], run_id, set(), timeout=600)
        assert state == "COMPLETED", worker_log(stack)[-5000:]
        after = verify_store(f"s3://{BUCKET}/gc")
        again = collect_garbage(f"s3://{BUCKET}/gc", policy, dry_run=True)
    print(f"gc beside a run: {time.monotonic() - started:.1f} s")
    return {**expected, "marks": marks, "sweep": sweep, "run_state_at_sweep": run_state_at_sweep, "verify": after,
            "again": again, "out": out, "summary": json.loads((out / "summary.json").read_text()), "run_id": run_id}


def test_gc_deletes_exactly_the_unused_while_a_run_writes_and_the_run_completes(stack: dict, gc_beside_a_run: dict) -> None:
    gc = gc_beside_a_run
    assert set(gc["marks"]) == gc["doomed"]  # the deployment's pass marked, and deleted nothing
    assert gc["run_state_at_sweep"] == "RUNNING"
    assert {item.key for item in gc["sweep"].deleted} == gc["doomed"]
    assert gc["sweep"].deleted_bytes > 0 and f"{gc['sweep'].deleted_bytes} bytes" in gc["sweep"].lines()[-1]
    # Written after the mark (the run's checkpoints, a copy in progress): at most marked, never deleted.
    assert not [i.key for i in gc["sweep"].marked if i.key in gc["doomed"]]
    keys = {o["Key"] for page in stack["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="gc/")
            for o in page.get("Contents", [])}
    for doomed in gc["doomed"]:
        assert not [k for k in keys if k == f"gc/{doomed}" or k.startswith(f"gc/{doomed}/") or k == f"gc/{doomed}.json"]
    for kept in gc["kept"]:
        assert f"gc/{kept}/manifest.json" in keys, kept
    assert {"gc/summaries/young-run.json", "gc/aliases/sentiment.json"} <= keys
    # What an alias or a recent run needs is whole, and so is everything the run wrote beside the sweep.
    assert gc["verify"].ok and gc["verify"].manifests >= len(gc["kept"]) + 2, gc["verify"].lines()
    assert gc["summary"]["train_steps"] == 60 and gc["summary"]["adapter_uri"].startswith(f"s3://{BUCKET}/gc/adapters/")
    assert f"gc/summaries/{gc['run_id']}.json" in keys
    # Looking again once the run is done: of what the run wrote nothing is due (its superseded checkpoint is only
    # marked); due at most is the upload that stopped before the sweep, marked by it.
    assert {i.key for i in gc["again"].deleted} <= {"checkpoints/wip/step-3-dddd"}


# --- three short outages in one run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outages(stack: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run; the S3 server SIGKILLed as the first task result is persisted, as the first checkpoint uploads and
    as the adapter publishes; each time started again PAUSE seconds later on the same port and data."""
    out = tmp_path_factory.mktemp("outages") / "out"
    config = {"output": {"dir": str(out), "store": f"s3://{BUCKET}/faults"}, "train": SHORT}
    root = stack["data"] / "faults"
    seen: dict[str, Any] = {}
    failures: list[BaseException] = []

    def kill_when(point: str, first_sign: Callable[[], Any], state: Callable[[], dict], interval: float = 0.002) -> None:
        sign = wait_for(first_sign, timeout=300, interval=interval)
        stack["server"].kill()
        seen[point] = {"sign": str(sign), "killed_at": time.time(), **state()}
        time.sleep(PAUSE)
        restart_s3(stack)

    def saboteur() -> None:
        try:
            # nanio makes the object's folder, then writes a temporary file, then renames it: the folder's
            # appearing is the earliest sign of the first result's PUT (a small one, so look often).
            kill_when("result", lambda: (root / "results").is_dir(), lambda: {
                "temporary": [p.name for p in entries(root / "results") if p.name.startswith(".tmp.")],
                "written": [p.name for p in entries(root / "results") if not p.name.startswith(".tmp.")]},
                interval=0.0002)
            kill_when("checkpoint", lambda: list(root.glob("checkpoints/*/step-*")), lambda: {
                "manifests": [str(p) for p in root.glob("checkpoints/*/step-*/manifest.json")],
                "files": [p.name for p in root.glob("checkpoints/*/step-*/files/*")]})
            kill_when("adapter", lambda: entries(root / "blobs"), lambda: {
                "manifests": [str(p) for p in root.glob("adapters/*/manifest.json")],
                "blobs": [p.name for p in entries(root / "blobs")]})
        except BaseException as exc:  # reported by the fixture, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=saboteur, daemon=True)
    started = time.monotonic()
    thread.start()
    run_id, state = run_until_done(stack, config)
    thread.join(timeout=60)
    assert not failures, failures
    assert state == "COMPLETED", worker_log(stack)[-6000:]
    print(f"three outages: run {time.monotonic() - started:.1f} s; {json.dumps(seen, indent=1)}")
    print("\n".join(line[:300] for line in run_log_lines(stack, run_id) if any(w in line.lower() for w in ("store", "result", "transaction", "retr"))))
    return {"run_id": run_id, "config": config, "out": out, "seen": seen,
            "summary": json.loads((out / "summary.json").read_text())}


def run_log_lines(stack: dict, run_id: str) -> list[str]:
    logs = httpx.post(f"{stack['api']}/logs/filter", timeout=60, json={
        "logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}).json()
    return [entry["message"] for entry in logs]


def test_an_outage_while_a_task_result_is_persisted_loses_nothing(stack: dict, outages: dict, store_env: None) -> None:
    from prefect.results import ResultRecord

    seen = outages["seen"]["result"]
    assert not seen["written"], seen  # killed while the first result was on its way: none was complete
    # Every result in the bucket is a whole record (the one cut short, if the kill landed mid-PUT, stayed nanio's
    # temporary file, never an object under its own name).
    results = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix="faults/results/")["Contents"]]
    assert results
    for key in results:
        if not key.rsplit("/", 1)[-1].startswith(".tmp."):
            ResultRecord.deserialize(stack["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert outages["summary"]["train_steps"] == 60 and "train" not in outages["summary"]["cached_tasks"]


def test_an_outage_during_a_checkpoint_upload_loses_nothing(stack: dict, outages: dict, store_env: None) -> None:
    seen = outages["seen"]["checkpoint"]
    assert not seen["manifests"], seen  # killed mid-upload: the checkpoint's manifest was not there yet
    lines = run_log_lines(stack, outages["run_id"])
    assert any("store: cannot reach the S3 endpoint" in line and "trying again" in line for line in lines)
    assert any("train: checkpoint at step 30" in line for line in lines)  # the upload finished after the restart
    assert verify_store(f"s3://{BUCKET}/faults").ok


def test_an_outage_during_the_adapter_publish_loses_nothing_and_gives_the_undisturbed_logits(
    stack: dict, outages: dict, gc_beside_a_run: dict, store_env: None
) -> None:
    seen = outages["seen"]["adapter"]
    assert not seen["manifests"], seen  # killed mid-publish: no adapter manifest yet
    report = verify_store(f"s3://{BUCKET}/faults")
    assert report.ok, report.lines()
    manifest_key = outages["summary"]["adapter_uri"].removeprefix(f"s3://{BUCKET}/") + "/manifest.json"
    manifest = json.loads(stack["s3"].get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(manifest["files"])
    # The same training as the run gc ran beside, which no outage touched: the same adapter, the same logits.
    assert outages["summary"]["train_losses"] == gc_beside_a_run["summary"]["train_losses"]
    assert torch.equal(adapter_logits(outages["out"]), adapter_logits(gc_beside_a_run["out"]))


def test_a_rerun_after_the_outages_is_served_from_the_cache(stack: dict, outages: dict, tmp_path: Path) -> None:
    config = {**outages["config"], "output": {**outages["config"]["output"], "dir": str(tmp_path / "out")}}
    run_id, state = run_until_done(stack, config)
    assert state == "COMPLETED", worker_log(stack)[-5000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "train" in summary["cached_tasks"] and summary["adapter_uri"] == outages["summary"]["adapter_uri"]
    assert not [line for line in run_log_lines(stack, run_id) if "Task run 'load-4bit-model" in line]


# --- an outage longer than the retry budget --------------------------------------------------------------------


def test_an_outage_longer_than_the_retry_budget_fails_the_step_and_the_next_run_resumes(
    stack: dict, outages: dict, tmp_path: Path, store_env: None
) -> None:
    # This store starts with the complete checkpoints of the run above (same config, same train key).
    pages = stack["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="faults/checkpoints/")
    for key in [o["Key"] for page in pages for o in page.get("Contents", []) if "/.tmp." not in o["Key"]]:
        stack["s3"].copy_object(Bucket=BUCKET, Key="outage/" + key.removeprefix("faults/"),
                                CopySource={"Bucket": BUCKET, "Key": key})
    root = stack["data"] / "outage"
    config = {"output": {"dir": str(tmp_path / "out"), "store": f"s3://{BUCKET}/outage"}, "train": SHORT}
    run_id = start_deployment_run(stack["env"], "finetune/manual", TINY, config)
    wait_for(lambda: entries(root / "blobs"), timeout=600)  # the adapter's publish began
    stack["server"].kill()
    killed_at = time.monotonic()
    state = wait_for_state(stack["api"], run_id, set(), timeout=300)
    failed_after = time.monotonic() - killed_at
    worker_pid = int((stack["state"] / "pids" / "worker.pid").read_text())
    restart_s3(stack)
    message = flow_run(stack, run_id)["state"]["message"]
    print(f"failed {failed_after:.1f} s after the kill: {message}")
    assert state == "FAILED", worker_log(stack)[-5000:]  # the step failed and said so; the process did not die
    assert stack["s3_env"]["AWS_ENDPOINT_URL"] in message and "cannot reach" in message and "\n" not in message
    assert RETRY_SECONDS <= failed_after < RETRY_SECONDS + 60
    subprocess.run(["kill", "-0", str(worker_pid)], check=True)  # the worker lives on
    assert not list(root.glob("adapters/*/manifest.json"))  # nothing was published half
    assert verify_store(f"s3://{BUCKET}/outage").ok

    config["output"]["dir"] = str(tmp_path / "again")
    _, state = run_until_done(stack, config)
    assert state == "COMPLETED", worker_log(stack)[-5000:]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 60 and summary["train_steps"] == 60
    assert summary["train_losses"] == outages["summary"]["train_losses"]
    assert torch.equal(adapter_logits(tmp_path / "again"), adapter_logits(outages["out"]))
    assert verify_store(f"s3://{BUCKET}/outage").ok
