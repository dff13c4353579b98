"""Checkpoints in the store: listed only when complete, pruned without touching uploads in progress or shared
blobs, and a resumed training continues the loss curve of an uninterrupted one exactly (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import loraflow.training as train_module
from loraflow.checkpoints import (
    fetch_latest_checkpoint, final_checkpoint_may_be_model_only, prune_checkpoints, stored_checkpoints,
)
from loraflow.config import TrainSettings, load_config, parse_assignment
from loraflow.store import LocalStore, open_store
from loraflow.backends import attach_lora
from loraflow.data import read_dataset
from loraflow.prompts import format_prompts, load_tokenizer
from loraflow.backends import load_model
from tests.conftest import TINY_CONFIG
from tests.s3_server import nanio_server, use_s3_here

PREFIX = "checkpoints/key"


def folder_with(path: Path, **files: bytes) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


def test_local_store_lists_complete_folders_only_and_deletes_them_whole(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = folder_with(tmp_path / "src", **{"optimizer.pt": b"state", "trainer_state.json": b"{}"})
    store.put_folder(source, f"{PREFIX}/step-10-aaaa")
    store.put_folder(source, f"{PREFIX}/step-20-bbbb")
    (store.root / PREFIX / ".step-30-cccc-upload").mkdir()  # a staging folder: an upload in progress
    (store.root / PREFIX / "step-30-cccc").mkdir()  # files but no manifest yet: not complete
    assert sorted(store.list_complete(PREFIX)) == [f"{PREFIX}/step-10-aaaa", f"{PREFIX}/step-20-bbbb"]

    store.delete(f"{PREFIX}/step-10-aaaa")
    store.delete(f"{PREFIX}/step-10-aaaa")  # deleting twice (two runs pruning at once) is fine
    assert store.list_complete(PREFIX) == [f"{PREFIX}/step-20-bbbb"]
    assert not [p for p in (store.root / PREFIX).iterdir() if "step-10" in p.name]
    assert store.list_complete("checkpoints/never-written") == []


def test_prune_keeps_the_newest_complete_checkpoints_of_every_attempt(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = folder_with(tmp_path / "src", **{"adapter_model.safetensors": b"weights"})
    for name in ("step-10-aaaa", "step-20-bbbb", "step-30-aaaa", "step-5-cccc"):
        store.put_folder(source, f"{PREFIX}/{name}")
    (store.root / PREFIX / "step-40-dddd").mkdir()  # another attempt's upload, not complete yet
    deleted = prune_checkpoints(store, PREFIX, keep=2)
    assert sorted(deleted) == [f"{PREFIX}/step-10-aaaa", f"{PREFIX}/step-5-cccc"]
    assert [c.step for c in stored_checkpoints(store, PREFIX)] == [30, 20]
    assert (store.root / PREFIX / "step-40-dddd").is_dir()  # pruning never touches what is not complete


def test_fetch_skips_a_checkpoint_deleted_while_it_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    for step in (10, 20):
        store.put_folder(folder_with(tmp_path / f"src{step}", **{"step.txt": str(step).encode()}), f"{PREFIX}/step-{step}-aaaa")
    real_get = store.get_folder

    def pruned_under_us(key: str, destination: Path) -> Path:
        if key.endswith("step-20-aaaa"):
            raise FileNotFoundError(key)
        return real_get(key, destination)

    monkeypatch.setattr(store, "get_folder", pruned_under_us)
    folder, step = fetch_latest_checkpoint(store, PREFIX, tmp_path / "resume")
    assert step == 10 and (folder / "step.txt").read_text() == "10"
    assert fetch_latest_checkpoint(store, "checkpoints/none", tmp_path / "resume2") is None


@pytest.mark.slow
def test_s3_checkpoints_keep_their_own_files_and_deleting_them_spares_shared_blobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "nanio"
    data.mkdir()
    with nanio_server(data) as endpoint:
        client = use_s3_here(endpoint, monkeypatch)
        client.create_bucket(Bucket="ckpt")
        store = open_store("s3://ckpt/runs")
        source = folder_with(tmp_path / "src", **{"adapter_model.safetensors": b"same bytes", "optimizer.pt": b"opt"})
        store.put_folder(source, "adapters/key")  # shared blobs, content-addressed
        store.put_folder(source, f"{PREFIX}/step-10-aaaa", shared_blobs=False)
        store.put_folder(source, f"{PREFIX}/step-20-aaaa", shared_blobs=False)
        manifest = json.loads(client.get_object(Bucket="ckpt", Key=f"runs/{PREFIX}/step-10-aaaa/manifest.json")["Body"].read())
        assert manifest["files"]["optimizer.pt"]["object"] == f"{PREFIX}/step-10-aaaa/files/optimizer.pt"
        assert sorted(store.list_complete(PREFIX)) == [f"{PREFIX}/step-10-aaaa", f"{PREFIX}/step-20-aaaa"]

        store.delete(f"{PREFIX}/step-10-aaaa")
        left = {o["Key"] for o in client.list_objects_v2(Bucket="ckpt", Prefix="runs/")["Contents"]}
        assert not [k for k in left if "step-10" in k]  # manifest and its own files are gone
        assert store.list_complete(PREFIX) == [f"{PREFIX}/step-20-aaaa"]
        restored = store.get_folder("adapters/key", tmp_path / "adapter")  # the shared blobs are untouched
        assert (restored / "adapter_model.safetensors").read_bytes() == b"same bytes"
        folder, step = fetch_latest_checkpoint(store, PREFIX, tmp_path / "resume")
        assert step == 20 and (folder / "optimizer.pt").read_bytes() == b"opt"


# --- resume: a crash after a checkpoint, then a second attempt ----------------------------------------------


class SimulatedCrash(Exception):
    pass


def crash_at(step: int) -> Any:
    """checkpoint_sync_callback as in production, plus a crash when the trainer reaches `step`."""
    real = train_module.checkpoint_sync_callback

    def build(*args: Any) -> Any:
        callback = real(*args)

        def on_step_end(trainer_args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                raise SimulatedCrash(f"killed at step {step}")

        callback.on_step_end = on_step_end
        return callback

    return build


@pytest.mark.slow
def test_a_resumed_training_continues_the_loss_curve_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(TINY_CONFIG, [parse_assignment("train.max_steps=8"), parse_assignment("train.save_steps=3")])
    prompts = format_prompts(read_dataset(cfg.data.uri), None, cfg.prompt, cfg.data, cfg.infer,
                             load_tokenizer(cfg.model.name, None))

    def train(store: Path) -> Any:
        live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
        spec = train_module.TrainSpec(model=cfg.model, lora=cfg.lora, train=cfg.train, backend="transformers",
                                      store_uri=str(store), prompts_key="prompts/unused.json", adapter_key="adapters/k",
                                      checkpoints_prefix=PREFIX)
        return train_module.train_adapter(live, prompts, spec).metrics

    uninterrupted = train(tmp_path / "one")
    assert uninterrupted.resumed_from_step == 0
    # train()'s time: set-up inside step 1, the final checkpoint after the last step, both within the whole
    assert 0 < uninterrupted.setup_seconds < uninterrupted.first_step_seconds
    assert 0 < uninterrupted.finish_seconds < uninterrupted.runtime_seconds - sum(uninterrupted.step_seconds[1:])

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "checkpoint_sync_callback", crash_at(5))
        with pytest.raises(SimulatedCrash):
            train(tmp_path / "two")
    assert [c.step for c in stored_checkpoints(LocalStore(tmp_path / "two"), PREFIX)] == [3]

    resumed = train(tmp_path / "two")
    assert resumed.resumed_from_step == 3
    assert len(resumed.step_seconds) == 5  # this attempt ran steps 4..8 only: at most one interval was redone
    assert [step for step, _ in resumed.losses] == list(range(1, 9))
    assert resumed.losses == uninterrupted.losses  # weights, optimizer, scheduler, RNG and data order restored
    weights = [load_file(str(tmp_path / run / "adapters/k/adapter_model.safetensors")) for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # save_total_limit (2) holds in the store: the crash's checkpoint at 3 was pruned after 6 and 8 were complete.
    assert [c.step for c in stored_checkpoints(LocalStore(tmp_path / "two"), PREFIX)] == [8, 6]


@pytest.mark.slow
def test_a_training_whose_last_checkpoint_is_stored_is_restored_not_trained_one_step_further(tmp_path: Path) -> None:
    """The adapter's publish failed after the last checkpoint (an S3 outage): the next attempt takes that checkpoint
    as the finished training. Resumed by transformers it would take a step 5 of a 4-step training."""
    cfg = load_config(TINY_CONFIG, [parse_assignment("train.max_steps=4"), parse_assignment("train.save_steps=2")])
    prompts = format_prompts(read_dataset(cfg.data.uri), None, cfg.prompt, cfg.data, cfg.infer,
                             load_tokenizer(cfg.model.name, None))

    def train(adapter_key: str) -> Any:
        live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
        spec = train_module.TrainSpec(model=cfg.model, lora=cfg.lora, train=cfg.train, backend="transformers",
                                      store_uri=str(tmp_path), prompts_key="prompts/unused.json",
                                      adapter_key=adapter_key, checkpoints_prefix=PREFIX)
        return train_module.train_adapter(live, prompts, spec).metrics

    first = train("adapters/first")
    # The last checkpoint holds what a restore reads, not the optimizer a resume would; the one before holds both.
    store = LocalStore(tmp_path)
    final, earlier = stored_checkpoints(store, PREFIX)
    assert (final.step, earlier.step) == (4, 2)
    names = {c.step: {p.name for p in store.get_folder(c.key, tmp_path / f"got-{c.step}").iterdir()}
             for c in (final, earlier)}
    assert {"adapter_model.safetensors", "trainer_state.json"} <= names[4]
    assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth"} & names[4]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names[2]

    again = train("adapters/again")  # same checkpoints prefix: finds step 4 complete
    assert again.resumed_from_step == 4 and again.steps == 4 and not again.step_seconds
    assert again.losses == first.losses
    weights = [load_file(str(tmp_path / key / "adapter_model.safetensors")) for key in ("adapters/first", "adapters/again")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_sharded_training_keeps_the_trainers_own_final_checkpoint() -> None:
    """FSDP and DeepSpeed check save_only_model when the trainer is built: their last checkpoint stays whole."""
    assert final_checkpoint_may_be_model_only(TrainSettings())
    assert final_checkpoint_may_be_model_only(TrainSettings(trainer_args={"max_grad_norm": 0.3}))
    assert not final_checkpoint_may_be_model_only(TrainSettings(trainer_args={"fsdp": "full_shard"}))
    assert not final_checkpoint_may_be_model_only(TrainSettings(trainer_args={"deepspeed": "ds.json"}))
