"""Store maintenance without training (seconds): gc's rules, pass by pass, on a local store whose ages are set by
hand; `loraflow store verify` against a real S3 server (nanio) catching bytes changed on its disk; a blob gc
deletes while a publish reuses it is uploaded again; an S3 outage shorter than the retry budget only delays a
store operation, a longer one fails in one line naming the endpoint. The gc test on S3 with a run writing beside
it, and the outages during real runs, are in tests/test_store_faults.py."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from loraflow.errors import StoreUnavailableError
from loraflow.store import LocalStore, open_store
from loraflow.store_gc import GcPolicy, collect_garbage
from loraflow.store_verify import verify_store
from tests.conftest import run_cli
from tests.s3_server import Nanio, s3_env

DAY, HOUR = 86400, 3600


def folder_with(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


def age(path: Path, days: float) -> None:
    """Every file under `path` (or the file) last modified `days` ago."""
    when = time.time() - days * DAY
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


def local_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# --- gc's rules on a local store -------------------------------------------------------------------------------


@pytest.fixture
def aged_store(tmp_path: Path) -> dict[str, Any]:
    """One of everything gc judges, with the age that decides it."""
    store = LocalStore(tmp_path / "store")
    root = store.root
    src = tmp_path / "src"

    def publish(key: str, days: float, **files: bytes) -> None:
        store.put_folder(folder_with(src / key, files or {"adapter_model.safetensors": key.encode() * 100}), key)
        age(root / key, days)

    publish("adapters/prod", 200)  # the production alias points here: kept, however old
    publish("adapters/challenger", 120)  # the candidate alias: kept
    publish("adapters/old", 120)  # unpromoted, nobody points at it: goes
    publish("adapters/run-ref", 120)  # a summary of the last 30 days names it: kept
    publish("adapters/fresh", 1)  # young: kept
    publish("merged/old-bfloat16", 120)  # its adapter goes, so it goes
    publish("merged/prod-bfloat16", 120)
    publish("checkpoints/prod/step-3-aaaa", 200, **{"optimizer.pt": b"o" * 3000})  # superseded by step 6: goes
    publish("checkpoints/prod/step-6-aaaa", 200, **{"optimizer.pt": b"p" * 3000})  # the newest: kept (keep 1)
    publish("checkpoints/old/step-6-bbbb", 120)  # its adapter expires: goes
    publish("checkpoints/gone/step-6-dddd", 100)  # no adapter, untouched for 100 days: abandoned, goes
    publish("checkpoints/wip/step-3-cccc", 0.01)  # a training in progress: kept
    folder_with(root / "checkpoints/prod/.step-9-aaaa-x1y2", {"optimizer.pt": b"cut" * 50})  # a crash mid-copy
    age(root / "checkpoints/prod/.step-9-aaaa-x1y2", 2)
    folder_with(root / "checkpoints/wip/.step-6-cccc-zz", {"optimizer.pt": b"now"})  # being copied right now
    (root / "summaries").mkdir()
    (root / "summaries/.r9.json.123.tmp").write_bytes(b"{")  # put_bytes cut short
    age(root / "summaries/.r9.json.123.tmp", 2)
    store.put_bytes(json.dumps({"adapter_uri": str(root / "adapters/old")}).encode(), "summaries/old-run.json")
    store.put_bytes(b"png", "summaries/old-run/loss_curve.png")
    age(root / "summaries/old-run.json", 40)
    age(root / "summaries/old-run", 40)
    store.put_bytes(json.dumps({"adapter_uri": str(root / "adapters/run-ref")}).encode(), "summaries/young-run.json")
    store.put_bytes(b"result", "results/old-record")
    age(root / "results/old-record", 40)
    store.put_bytes(b"result", "results/young-record")
    store.put_bytes(json.dumps({"line": "sentiment", "aliases": {
        "production": {"adapter_key": "adapters/prod", "at": 1.0},
        "candidate": {"adapter_key": "adapters/challenger"}}, "history": []}).encode(), "aliases/sentiment.json")
    # Compile caches (loraflow/compile_cache.py): each publish is a superset; latest.json names the newest.
    tag = "compile-cache/2.11.0-5.17.0-2026.10.9-2026.10.9-py3.12-sm90"
    publish(f"{tag}/first", 20, **{"kernel.cubin": b"k" * 500})  # superseded: goes
    publish(f"{tag}/union", 20, **{"kernel.cubin": b"k" * 500, "other.cubin": b"o" * 500})  # named: kept
    store.put_bytes(json.dumps({"key": f"{tag}/union", "files": ["kernel.cubin", "other.cubin"]}).encode(),
                    f"{tag}/latest.json")
    age(root / f"{tag}/latest.json", 400)  # a pointer: never touched
    store.put_bytes(b"[]", "datasets/not-ours.json")  # not loraflow's: never touched
    age(root / "datasets/not-ours.json", 400)
    doomed = {"adapters/old", "merged/old-bfloat16", "checkpoints/prod/step-3-aaaa", "checkpoints/old/step-6-bbbb",
              "checkpoints/gone/step-6-dddd", "checkpoints/prod/.step-9-aaaa-x1y2", "summaries/.r9.json.123.tmp",
              "summaries/old-run", "results/old-record", f"{tag}/first"}
    return {"store": store, "root": root, "doomed": doomed, "compile_cache": tag}


POLICY = GcPolicy(grace_hours=1, keep_checkpoints=1, retention_days=30, candidate_retention_days=90)


def test_gc_marks_first_then_deletes_exactly_what_nothing_needs(aged_store: dict) -> None:
    root, doomed = aged_store["root"], aged_store["doomed"]
    before = local_files(root)
    now = time.time()

    dry = collect_garbage(str(root), POLICY, dry_run=True, now=now)
    assert local_files(root) == before  # a dry run writes nothing, not even marks
    assert not dry.deleted and {i.key for i in dry.marked} == doomed
    assert any(line.startswith("  would mark") and "checkpoints/prod/step-3-aaaa" in line for line in dry.lines())

    first = collect_garbage(str(root), POLICY, now=now)  # phase one: mark
    assert not first.deleted and {i.key for i in first.marked} == doomed
    assert local_files(root) == before | {"gc/marks.json"}

    second = collect_garbage(str(root), POLICY, now=now + 2 * HOUR)  # phase two, after the grace period: sweep
    assert {i.key for i in second.deleted} == doomed
    # The copy in flight at the first pass is old enough now, but was never marked: only marked.
    assert {i.key for i in second.marked} == {"checkpoints/wip/.step-6-cccc-zz"}
    left = local_files(root)
    gone = before - left
    assert all(any(f == k or f.startswith(k + "/") or f.startswith(k + ".") for k in doomed) for f in gone)
    for kept in ("adapters/prod", "adapters/challenger", "adapters/run-ref", "adapters/fresh", "merged/prod-bfloat16",
                 "checkpoints/prod/step-6-aaaa", "checkpoints/wip/step-3-cccc"):
        assert f"{kept}/manifest.json" in left, kept
    assert {"summaries/young-run.json", "results/young-record", "aliases/sentiment.json", "datasets/not-ours.json",
            "checkpoints/wip/.step-6-cccc-zz/optimizer.pt"} <= left
    tag = aged_store["compile_cache"]
    assert {f"{tag}/latest.json", f"{tag}/union/manifest.json", f"{tag}/union/kernel.cubin"} <= left
    assert second.deleted_bytes == sum(i.size for i in first.marked)  # what it said it would free, it freed
    assert f"deleted {len(doomed)} items, {second.deleted_bytes} bytes" in second.lines()[-1]
    assert verify_store(str(root)).ok


def test_gc_without_grace_deletes_in_one_pass_and_a_second_pass_finds_nothing(aged_store: dict) -> None:
    policy = GcPolicy(grace_hours=0, keep_checkpoints=1, retention_days=30, candidate_retention_days=90)
    root = aged_store["root"]
    report = collect_garbage(str(root), policy)
    assert {i.key for i in report.deleted} == aged_store["doomed"] | {"checkpoints/wip/.step-6-cccc-zz"}
    again = collect_garbage(str(root), policy)
    assert not again.deleted and not again.marked


def test_an_unreadable_alias_file_stops_gc_with_one_line(aged_store: dict) -> None:
    root = aged_store["root"]
    (root / "aliases/broken.json").write_text('{"line": "x", "aliases": {"production": "adapters/old"}}')
    before = local_files(root)
    result = run_cli("store", "gc", "--store", str(root), "--grace-hours", "0")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: aliases/broken.json: not an alias file") and "nothing deleted" in last
    assert local_files(root) == before


def test_gc_cli_prints_what_it_would_delete_with_the_bytes(aged_store: dict) -> None:
    root = aged_store["root"]
    collect_garbage(str(root), POLICY, now=time.time() - 2 * HOUR)  # marked two hours ago
    result = run_cli("store", "gc", "--store", str(root), "--dry-run", "--grace-hours", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dry run" in lines[0] and "grace 1 h" in lines[0]
    doomed = [line for line in lines if line.startswith("  would delete")]
    assert {next(k for k in aged_store["doomed"] if f" {k}  " in line) for line in doomed} == aged_store["doomed"]
    assert all("B  (" in line for line in doomed)  # each with its size
    assert lines[-1].startswith(f"would delete {len(aged_store['doomed'])} items, ")


# --- S3: verify, a reused blob, outages --------------------------------------------------------------------------


@pytest.fixture
def nanio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    data = tmp_path / "nanio"
    data.mkdir()
    server = Nanio(data)
    server.start()
    for name, value in s3_env(server.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the first credentials it found, for good
    boto3.client("s3").create_bucket(Bucket="maint")
    yield server
    server.stop()


def test_verify_catches_a_blob_whose_bytes_changed_on_disk_and_one_that_is_gone(nanio: Nanio, tmp_path: Path) -> None:
    store = open_store("s3://maint/runs")
    store.put_folder(folder_with(tmp_path / "a", {"adapter_model.safetensors": b"weights" * 1000, "x.json": b"{}"}),
                     "adapters/k1")
    store.put_folder(folder_with(tmp_path / "c", {"optimizer.pt": b"state" * 100}), "checkpoints/k1/step-3-aaaa",
                     shared_blobs=False)
    env = s3_env(nanio.endpoint)
    clean = run_cli("store", "verify", "--store", "s3://maint/runs", env=env)
    assert clean.returncode == 0, clean.stderr
    assert "3 objects" in clean.stdout and "0 missing, 0 corrupt" in clean.stdout

    manifest = json.loads(boto3.client("s3").get_object(Bucket="maint", Key="runs/adapters/k1/manifest.json")["Body"].read())
    weights = nanio.data_dir / "maint/runs/blobs" / manifest["files"]["adapter_model.safetensors"]["sha256"]
    changed = bytearray(weights.read_bytes())
    changed[100] ^= 0xFF  # one bit flipped on the server's disk, same size: S3 itself notices nothing
    weights.write_bytes(bytes(changed))
    (nanio.data_dir / "maint/runs/checkpoints/k1/step-3-aaaa/files/optimizer.pt").unlink()

    result = run_cli("store", "verify", "--store", "s3://maint/runs", env=env)
    assert result.returncode == 1
    corrupt = [line for line in result.stdout.splitlines() if line.startswith("corrupt")]
    missing = [line for line in result.stdout.splitlines() if line.startswith("missing")]
    assert len(corrupt) == 1 and weights.name in corrupt[0] and "adapters/k1: adapter_model.safetensors" in corrupt[0]
    assert len(missing) == 1 and "checkpoints/k1/step-3-aaaa/files/optimizer.pt" in missing[0]
    assert result.stderr.strip().splitlines()[-1] == \
        "error: 2 objects listed by manifests in s3://maint/runs are missing or corrupt"


def test_a_blob_gc_deletes_while_a_publish_reuses_it_is_uploaded_again(nanio: Nanio, tmp_path: Path) -> None:
    store = open_store("s3://maint/runs")
    files = {"adapter_model.safetensors": b"shared weights" * 500, "tokenizer.json": b"{}"}
    store.put_folder(folder_with(tmp_path / "a", files), "adapters/old")
    store.delete("adapters/old")  # its blobs are orphans now: what gc deletes
    blob_keys = [k["Key"] for k in store.client.list_objects_v2(Bucket="maint", Prefix="runs/blobs/")["Contents"]]
    real_put = store.client.put_object

    def gc_sweeps_just_before_the_manifest(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith("adapters/new/manifest.json"):
            for key in blob_keys:  # the publish found these blobs and skipped their upload; now they are gone
                store.client.delete_object(Bucket="maint", Key=key)
        return real_put(**kwargs)

    store.client.put_object = gc_sweeps_just_before_the_manifest
    store.put_folder(folder_with(tmp_path / "b", files), "adapters/new")
    report = verify_store("s3://maint/runs")
    assert report.ok and report.objects == 2, report.lines()


def test_an_s3_outage_shorter_than_the_retry_budget_only_delays_a_publish(
    nanio: Nanio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLOW_STORE_RETRY_SECONDS", "30")
    store = open_store("s3://maint/runs")
    nanio.kill()
    restart = threading.Timer(3.0, nanio.start)
    restart.start()
    started = time.monotonic()
    store.put_folder(folder_with(tmp_path / "a", {"adapter_model.safetensors": b"w" * 5000}), "adapters/k")
    waited = time.monotonic() - started
    restart.join()
    assert waited >= 3.0
    assert verify_store("s3://maint/runs").ok


def test_an_s3_outage_longer_than_the_retry_budget_fails_in_one_line_naming_the_endpoint(
    nanio: Nanio, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAFLOW_STORE_RETRY_SECONDS", "2")
    store = open_store("s3://maint/runs")
    nanio.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        store.put_folder(folder_with(tmp_path / "a", {"adapter_model.safetensors": b"w"}), "adapters/k")
    message = str(caught.value)
    assert "\n" not in message and nanio.endpoint in message and "'maint'" in message
    assert "after 2 s of retries" in message
    print(f"gave up after {time.monotonic() - started:.1f} s: {message}")
    nanio.start()  # nothing was published: no manifest points at what the outage cut short
    assert not store.has("adapters/k") and verify_store("s3://maint/runs").ok
