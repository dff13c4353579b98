"""The packing guard: packed examples share one row, so only attention that keeps them apart (Unsloth's kernels,
flash-attention) may pack. `train.packing: true` without it is a config error; `auto` packs only with it.
(summary.json's `packing: false` for a CPU run: tests/test_flow.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow import backend_transformers
from loraflow.batching import packing_enabled
from loraflow.config import TrainSettings, load_config
from loraflow.errors import ConfigError
from tests.conftest import TINY_CONFIG, run_cli


def test_auto_packs_only_where_attention_keeps_examples_apart() -> None:
    auto = TrainSettings(packing="auto")
    assert backend_transformers.SUPPORTS_PACKING is False  # it loads with sdpa attention (this machine: the CPU)
    assert packing_enabled(auto, backend_transformers.SUPPORTS_PACKING) is False
    assert packing_enabled(auto, True) is True  # Unsloth's SUPPORTS_PACKING (tests/test_gpu.py packs with it)
    assert load_config(TINY_CONFIG).train.packing == "auto"  # what the CPU tests run with


@pytest.mark.parametrize("value", ["true", True])  # YAML's `true` and the spelled-out string
def test_packing_true_without_such_attention_is_a_config_error(value: object) -> None:
    forced = TrainSettings(packing=value)
    with pytest.raises(ConfigError, match=r"train\.packing: true needs backend unsloth or flash-attention"):
        packing_enabled(forced, backend_transformers.SUPPORTS_PACKING)
    assert packing_enabled(forced, True) is True
    assert packing_enabled(TrainSettings(packing=False), True) is False


@pytest.mark.slow
def test_loraflow_run_with_packing_true_on_the_cpu_exits_2_before_any_model_loads(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(TINY_CONFIG), "--set", "train.packing=true", "--output",
                     str(tmp_path / "out"), "--set", f"output.store={tmp_path / 'store'}")
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.packing: true needs backend unsloth or flash-attention" in errors[0]
    assert "Task run 'load-4bit-model" not in log and "Task run 'attach-LoRA" not in log  # found before a model loads
    assert not (tmp_path / "store" / "adapters").exists() and not (tmp_path / "out").exists()
