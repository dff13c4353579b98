"""A TrainSpec is everything a training needs: run in a fresh process (`python -m loraflow.training spec.json`) it
trains exactly what the train step trains in-process from the same spec, and publishes the adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from loraflow.backends import attach_lora, load_model
from loraflow.config import load_config, parse_assignment
from loraflow.data import read_dataset
from loraflow.prompts import format_prompts, load_tokenizer, store_prompts
from loraflow.store import LocalStore
from loraflow.training import TrainSpec, plan_training, train_adapter
from tests.conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow


def test_a_spec_run_in_a_fresh_process_trains_what_the_train_step_trains(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG, [parse_assignment("train.max_steps=12"),
                                    parse_assignment(f"output.store={tmp_path / 'store'}")])
    dataset = read_dataset(cfg.data.uri)
    prompts = format_prompts(dataset, None, cfg.prompt, cfg.data, cfg.infer, load_tokenizer(cfg.model.name, None))
    spec = plan_training(cfg, "transformers", dataset, None, prompts)
    assert TrainSpec.model_validate_json(spec.model_dump_json()) == spec  # plain data, round-trips through JSON

    store = LocalStore(cfg.output.store)
    assert store_prompts(store, prompts) == spec.prompts_key
    elsewhere = spec.model_copy(update={"adapter_key": "adapters/fresh-process", "checkpoints_prefix": None})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(elsewhere.model_dump_json())
    process = subprocess.run([sys.executable, "-m", "loraflow.training", str(spec_file)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    fresh = json.loads(process.stdout.strip().splitlines()[-1])

    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    here = train_adapter(live, prompts, spec)

    assert [tuple(pair) for pair in fresh["metrics"]["losses"]] == here.metrics.losses
    assert here.metrics.loss_last < here.metrics.loss_first
    assert fresh["key"] == "adapters/fresh-process" and store.has(fresh["key"])
    fresh_weights = load_file(str(Path(fresh["uri"]) / "adapter_model.safetensors"))
    here_weights = load_file(str(Path(here.uri) / "adapter_model.safetensors"))
    assert fresh_weights.keys() == here_weights.keys()
    assert all((fresh_weights[name] == here_weights[name]).all() for name in here_weights)
