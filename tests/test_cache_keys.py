"""What the train cache key holds (loraflow.cache_keys.train_key): every setting that changes what is trained
changes it, every setting that does not leaves it alone, and every config field is one or the other.

A key that misses a training setting serves a stale adapter; a key that holds an output setting retrains for
nothing. The end-to-end counterparts (a rerun with another hub.repo_id trains nothing, a dataset re-uploaded
under its old name retrains) are in tests/test_s3_cache.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.cache_keys import train_key
from loraflow.config import FinetuneConfig, load_config, parse_assignment
from tests.conftest import ROOT, TINY_CONFIG

DATA_SHA, EVAL_SHA = "a" * 64, "b" * 64
BACKEND = "transformers"


def config(*assignments: str) -> FinetuneConfig:
    """The tiny config with `--set`-style overrides, through the same API `loraflow run` uses."""
    return load_config(TINY_CONFIG, [parse_assignment(a) for a in assignments])


def key_of(cfg: FinetuneConfig, data: str = DATA_SHA, eval_data: str | None = None, backend: str = BACKEND) -> str:
    return train_key(cfg, data, eval_data, backend)


# Each: a config change (from the tiny config) that trains something else. Some need a base that allows them.
TRAINING_CHANGES = {
    "data.eval_fraction": ["data.eval_fraction=0.2"],
    "data.seed": ["data.seed=1"],
    "prompt.template": ["prompt.template=alpaca_zh"],
    "model.name": ["model.name=loraflow:smollm2-135m-instruct"],
    "model.revision": ["model.revision=v2.0"],
    "model.load_in_4bit": ["model.load_in_4bit=true"],
    "model.max_seq_length": ["model.max_seq_length=256"],
    "model.dtype": ["model.dtype=bfloat16"],
    "lora.r": ["lora.r=8"],
    "lora.alpha": ["lora.alpha=32"],
    "lora.dropout": ["lora.dropout=0.05"],
    "lora.bias": ["lora.bias=all"],
    "lora.target_modules": ["lora.target_modules=[q_proj, v_proj]"],
    "lora.gradient_checkpointing": ["lora.gradient_checkpointing=unsloth"],
    "train.per_device_batch_size": ["train.per_device_batch_size=4"],
    "train.gradient_accumulation_steps": ["train.gradient_accumulation_steps=2"],
    "train.warmup_steps": ["train.warmup_steps=0"],
    "train.max_steps": ["train.max_steps=60"],
    "train.num_epochs": ["train.max_steps=null", "train.num_epochs=2"],  # base: max_steps null, num_epochs 1
    "train.learning_rate": ["train.learning_rate=2e-4"],
    "train.optimizer": ["train.optimizer=adamw_8bit"],
    "train.weight_decay": ["train.weight_decay=0.0"],
    "train.lr_scheduler": ["train.lr_scheduler=cosine"],
    "train.seed": ["train.seed=1"],
    "train.logging_steps": ["train.logging_steps=5"],  # the loss history the cached result carries
    "train.completion_only_loss": ["train.completion_only_loss=false"],
    "train.packing": ["train.packing=false"],
    "train.trainer_args": ["train.trainer_args={max_grad_norm: 0.3}"],  # auto packs on Unsloth: the same config trains differently there
}
BASES = {"train.num_epochs": ["train.max_steps=null", "train.num_epochs=1"]}

# Each: a change that trains exactly the same adapter.
SAME_TRAINING = {
    "data.uri": ["data.uri=s3://elsewhere/the-same-bytes.json"],  # the content hash is what counts
    "train.save_steps": ["train.save_steps=7"],
    "train.save_total_limit": ["train.save_total_limit=5"],
    "infer.prompts": ['infer.prompts=[{"instruction": "分类以下文本的情感。", "input": "这家店的服务太差了"}]'],
    "infer.max_new_tokens": ["infer.max_new_tokens=8"],
    "infer.max_eval_examples": ["infer.max_eval_examples=3"],
    "infer.label_scoring": ["infer.label_scoring=greedy"],
    "output.dir": ["output.dir=outputs/elsewhere"],
    "output.store": ["output.store=s3://bucket/prefix"],
    "output.save_merged": ["output.save_merged=true"],
    "hub.repo_id": ["hub.repo_id=me/another-repo"],
    "hub.private": ["hub.private=false"],
    "hub.min_eval_accuracy": ["hub.min_eval_accuracy=0.8"],
    "hub.require_beat_base": ["hub.require_beat_base=true"],
    "hub.license": ["hub.license=apache-2.0"],
    "data.ignore_fields": ["data.ignore_fields=[source]"],  # a column nothing reads: the texts are the same
    "output.overwrite": ["output.overwrite=true"],
    "train.timeout_seconds": ["train.timeout_seconds=600"],
    "infer.timeout_seconds": ["infer.timeout_seconds=600"],
    "hub.push_candidates": ["hub.push_candidates=false"],
    "promote.enabled": ["promote.enabled=false"],
    "promote.line": ["promote.line=another-line"],
    "promote.alias": ["promote.alias=staging"],
    "promote.min_improvement": ["promote.min_improvement=0.05"],
    "promote.require_significance": ["promote.require_significance=false"],
    "promote.alpha": ["promote.alpha=0.01"],
    "train.num_devices": ["train.num_devices=2"],  # the same examples per step on 1 or N ranks
    "train.ddp_timeout_seconds": ["train.ddp_timeout_seconds=60"],
    "train.report_to": ["train.report_to=[tensorboard]"],  # a tracker watches; it changes nothing trained
}

# Fields that reach the key another way, or have a single allowed value.
ELSEWHERE = {
    "data.eval_uri": "its content hash is train_key's eval_sha256 (test_data_content_changes_the_key)",
    "model.backend": "resolved first (auto -> transformers here); the resolved backend is an argument",
    "output.save_gguf": "only false validates (true says why GGUF is unavailable)",
    "model.init_adapter": "resolved to the parent's store digest or Hub commit: train_key's `parent` (tests/test_promotion.py)",
}


def test_every_config_field_is_classified() -> None:
    """A new config field fails here until someone decides whether it changes what is trained."""
    fields = {f"{section}.{name}" for section, info in FinetuneConfig.model_fields.items()
              for name in info.annotation.model_fields}
    classified = [*TRAINING_CHANGES, *SAME_TRAINING, *ELSEWHERE]
    assert len(classified) == len(set(classified)), "a field is in two lists"
    assert fields == set(classified)


@pytest.mark.parametrize("field", sorted(TRAINING_CHANGES))
def test_a_setting_that_changes_training_changes_the_key(field: str) -> None:
    base = config(*BASES.get(field, []))
    changed = config(*TRAINING_CHANGES[field])
    section, name = field.split(".")
    assert getattr(getattr(changed, section), name) != getattr(getattr(base, section), name)  # the change took
    assert key_of(changed) != key_of(base)


@pytest.mark.parametrize("field", sorted(SAME_TRAINING))
def test_a_setting_that_does_not_change_training_leaves_the_key(field: str) -> None:
    base, changed = config(), config(*SAME_TRAINING[field])
    section, name = field.split(".")
    assert getattr(getattr(changed, section), name) != getattr(getattr(base, section), name)  # the change took
    assert key_of(changed) == key_of(base)


def test_data_content_changes_the_key() -> None:
    cfg = config()
    assert key_of(cfg, data="c" * 64) != key_of(cfg)
    assert key_of(cfg, eval_data=EVAL_SHA) != key_of(cfg)  # a separate eval file, rather than the split
    assert key_of(cfg, eval_data=EVAL_SHA) != key_of(cfg, eval_data="d" * 64)


def test_the_backend_changes_the_key_and_auto_is_what_it_resolves_to() -> None:
    cfg = config()
    assert key_of(cfg, backend="unsloth") != key_of(cfg, backend="transformers")
    assert key_of(config("model.backend=transformers")) == key_of(config("model.backend=auto"))


# --- library versions, by a real installed-package record in a fresh interpreter ------------------------------

KEY_IN_A_FRESH_INTERPRETER = f"""
import json, sys
from importlib import metadata
from loraflow.cache_keys import train_key
from loraflow.config import load_config
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({{"key": train_key(load_config({str(TINY_CONFIG)!r}), {DATA_SHA!r}, None, {BACKEND!r}),
                  "versions": {{name: version(name) for name in sys.argv[1:]}}}}))
"""


def key_in_subprocess(site: Path | None = None, *libraries: str) -> dict:
    """train_key in a new interpreter, and the versions it sees of `libraries`; `site` (a folder of *.dist-info
    records) goes first on its path, so importlib.metadata finds those versions first, as after an upgrade."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", KEY_IN_A_FRESH_INTERPRETER, *libraries], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def installed(site: Path, name: str, version: str) -> None:
    record = site / f"{name}-{version}.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_the_key_is_the_same_in_a_fresh_interpreter() -> None:
    """Reruns are new processes: nothing process-specific (object ids, hash seeds) may enter the key."""
    assert key_in_subprocess()["key"] == key_of(config())


# the libraries README's cache-key table names
@pytest.mark.parametrize("library", ["torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth"])
def test_another_library_version_changes_the_key(library: str, tmp_path: Path) -> None:
    """Upgrading a training library (or installing bitsandbytes / Unsloth where they were absent) changes the key."""
    installed(tmp_path, library, "999.0.1")
    seen = key_in_subprocess(tmp_path, library)
    assert seen["versions"][library] == "999.0.1"  # the fresh interpreter sees the other version
    assert seen["key"] != key_of(config())


def test_an_unrelated_package_leaves_the_key(tmp_path: Path) -> None:
    installed(tmp_path, "unrelated_probe", "1.0")
    seen = key_in_subprocess(tmp_path, "unrelated_probe")
    assert seen["versions"]["unrelated_probe"] == "1.0" and seen["key"] == key_of(config())


def test_the_device_kind_changes_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype auto, optimizer auto and load_in_4bit resolve by device (fp32 / adamw_torch / no NF4 on a CPU):
    the same config trains something else on a GPU, so a store shared by both never serves one to the other."""
    import loraflow.cache_keys

    cfg = config()
    on_cpu = key_of(cfg)
    monkeypatch.setattr(loraflow.cache_keys, "cuda_available", lambda: True)
    assert key_of(cfg) != on_cpu


def test_auto_optimizer_keys_name_what_it_trains_with_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """optimizer auto meant adamw_8bit on CUDA before it meant adamw_torch_fused: an adapter trained under the old
    meaning is not served for the new one; an optimizer named outright keeps its key."""
    import loraflow.cache_keys
    import loraflow.config

    monkeypatch.setattr(loraflow.cache_keys, "cuda_available", lambda: True)
    cfg = config("train.optimizer=auto")
    fused_auto = key_of(cfg)
    monkeypatch.setattr(loraflow.cache_keys, "resolved_optimizer", lambda name, on_cuda: "adamw_8bit")
    assert key_of(cfg) != fused_auto  # another resolution of auto, another key
    named = cfg.model_copy(update={"train": cfg.train.model_copy(update={"optimizer": "adamw_8bit"})})
    named_key = key_of(named)
    monkeypatch.setattr(loraflow.cache_keys, "resolved_optimizer", loraflow.config.resolved_optimizer)
    assert key_of(named) == named_key  # a named optimizer's key does not depend on what auto means
