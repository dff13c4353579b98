"""output.save_merged: the base model with the adapter merged in, 16-bit, reloadable without PEFT; and the
GGUF option's message."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from loraflow.config import GGUF_UNAVAILABLE, load_config
from loraflow.errors import ConfigError
from loraflow.models import resolve_model
from loraflow.store import LocalStore
from loraflow import merging as merge_module
from loraflow.backends import attach_lora
from loraflow.backends import load_model
from tests.conftest import TINY_CONFIG

ADAPTER_KEY = "adapters/merge-test"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny adapter whose B matrices are random (PEFT starts them at zero, which would merge to the base)."""
    cfg = load_config(TINY_CONFIG)
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in live.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    store = tmp_path_factory.mktemp("store")
    with tempfile.TemporaryDirectory() as folder:
        live.model.save_pretrained(folder)
        live.tokenizer.save_pretrained(folder)
        LocalStore(store).put_folder(Path(folder), ADAPTER_KEY)
    out = tmp_path_factory.mktemp("out")
    merged_dir = out / "merged"
    LocalStore(store).get_folder(merge_module.merge_adapter(cfg.model, str(store), ADAPTER_KEY), merged_dir)
    return {"cfg": cfg, "live": live, "store": store, "out": out, "merged_dir": Path(merged_dir)}


def logits(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    ids = tokenizer(["分类以下文本的情感。\n很好\n答:", "我不喜欢在雨中踢足球"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**ids).logits


def test_merged_model_is_16bit_safetensors_without_lora(published: dict) -> None:
    from safetensors import safe_open

    merged_dir = published["merged_dir"]
    assert merged_dir == published["out"] / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged_dir.iterdir()}
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as tensors:
        names = list(tensors.keys())
        assert names and not [n for n in names if "lora" in n or "base_layer" in n]
        assert {tensors.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    assert (published["store"] / "merged" / "merge-test-bfloat16" / "manifest.json").is_file()


def test_merged_model_reloads_with_the_logits_of_base_plus_adapter(published: dict) -> None:
    """Plain AutoModelForCausalLM, no PEFT. The only difference allowed is rounding the merged weights to bf16:
    far below what the adapter itself changes (the base alone is the counter-check)."""
    from transformers import AutoModelForCausalLM

    live = published["live"]
    live.tokenizer.pad_token = live.tokenizer.eos_token
    expected = logits(live.model, live.tokenizer)  # base + adapter, fp32, as trained
    merged = AutoModelForCausalLM.from_pretrained(published["merged_dir"], dtype=torch.float32)
    actual = logits(merged, live.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(published["cfg"].model.name), dtype=torch.float32)
    adapter_effect = (logits(base, live.tokenizer) - expected).abs().max().item()
    rounding = (actual - expected).abs().max().item()
    assert adapter_effect > 0.05, adapter_effect  # the adapter changes the logits for real
    assert rounding < adapter_effect / 10, (rounding, adapter_effect)  # measured: 0.06 against 1.67 (logits up to 40)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_a_published_merged_model_is_copied_not_rebuilt(published: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object) -> None:
        raise AssertionError("loaded the base model although the merged model was in the store")

    monkeypatch.setattr(merge_module, "load_base_16bit", no_loading)
    key = merge_module.merge_adapter(published["cfg"].model, str(published["store"]), ADAPTER_KEY)
    merged_dir = LocalStore(published["store"]).get_folder(key, tmp_path / "merged")
    assert (Path(merged_dir) / "model.safetensors").read_bytes() == (published["merged_dir"] / "model.safetensors").read_bytes()


def test_save_gguf_says_why_not_and_what_to_do() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, [{"output": {"save_gguf": True}}])
    message = str(error.value)
    assert "output.save_gguf" in message and GGUF_UNAVAILABLE in message
    assert "convert_hf_to_gguf.py" in message and "output.save_merged" in message
