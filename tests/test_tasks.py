"""Each task's plain function, without the Prefect engine or the network, on the tiny model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from loraflow.backends import choose_backend
from loraflow.config import FinetuneConfig, load_config
from loraflow.errors import ConfigError, QualityGateError
from loraflow.models import resolve_model
from loraflow.templates import ALPACA_ZH
from loraflow.backends import attach_lora
from loraflow.data import read_dataset
from loraflow.prompts import Prompts, closed_label_set, format_prompts, load_tokenizer, split_rows
from loraflow.backends import load_model
from loraflow.hub import push_hub
from loraflow.outputs import save_local
from loraflow.summary import RunSummary
from loraflow.inference import check_usable, smoke_infer
from loraflow.training import TrainSpec, train_adapter
from tests.conftest import TINY_CONFIG
from tests.hub_standin import HubStandIn


@pytest.fixture(scope="module")
def cfg() -> FinetuneConfig:
    return load_config(TINY_CONFIG)


@pytest.fixture(scope="module")
def tokenizer(cfg: FinetuneConfig) -> Any:
    return load_tokenizer(cfg.model.name, None)


@pytest.fixture(scope="module")
def prompts(cfg: FinetuneConfig, tokenizer: Any) -> Prompts:
    return format_prompts(read_dataset(cfg.data.uri), None, cfg.prompt, cfg.data, cfg.infer, tokenizer)


# --- format-prompts ----------------------------------------------------------------------------------------


def test_every_training_text_ends_with_eos(prompts: Prompts, tokenizer: Any) -> None:
    assert prompts.eos_token == tokenizer.eos_token == "<|im_end|>"
    assert all(text.endswith(tokenizer.eos_token) for text in prompts.train_texts)
    ids = tokenizer(prompts.train_texts[0], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids[-2] != tokenizer.eos_token_id  # exactly one, at the end


def test_alpaca_zh_is_the_notebook_prompt(tokenizer: Any) -> None:
    row = {"instruction": "分类以下文本的情感。", "input": "我不喜欢在雨中踢足球", "output": "消极"}
    from loraflow.templates import render

    text = render("alpaca_zh", row, tokenizer)
    assert text == ALPACA_ZH.format(**row) + tokenizer.eos_token
    assert text.startswith("以下是描述任务的指令，搭配的输入提供了进一步的上下文。请编写一个适当完成请求的响应。\n\n### 指令:\n")
    assert render("alpaca_zh", row, tokenizer, with_output=False).endswith("### 响应:\n")


def test_chat_template_renders_with_the_tokenizer(tokenizer: Any) -> None:
    from loraflow.templates import render

    row = {"instruction": "Say hi", "input": "", "output": "hi"}
    text = render("chat", row, tokenizer)
    assert "<|im_start|>user\nSay hi<|im_end|>" in text and "<|im_start|>assistant\nhi<|im_end|>" in text
    assert text.count(tokenizer.eos_token) == text.count("<|im_start|>")  # no doubled EOS


def test_split_is_seeded_and_disjoint() -> None:
    rows = [{"instruction": str(i), "input": "", "output": "x"} for i in range(50)]
    train, held_out = split_rows(rows, 0.2, seed=1)
    assert len(held_out) == 10 and len(train) == 40
    assert split_rows(rows, 0.2, seed=1) == (train, held_out)
    assert split_rows(rows, 0.2, seed=2) != (train, held_out)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}


def test_label_set_detection() -> None:
    labelled = [{"output": label} for label in ["积极", "消极", "中性"] * 5]
    assert closed_label_set(labelled, labelled[:3]) == ["中性", "消极", "积极"]
    free_text = [{"output": f"answer {i}"} for i in range(15)]
    assert closed_label_set(free_text, free_text[:3]) is None


def test_eval_prompts_stop_where_the_answer_starts(prompts: Prompts) -> None:
    example = prompts.eval_examples[0]
    assert example.prompt.endswith("答:") and example.answer in {"积极", "消极", "中性"}
    assert prompts.infer_prompts[0].input == "我不喜欢在雨中踢足球"


# --- load-4bit-model, attach-LoRA ----------------------------------------------------------------------------


def test_load_on_cpu_is_full_precision_with_one_warning(cfg: FinetuneConfig, caplog: pytest.LogCaptureFixture) -> None:
    four_bit = cfg.model.model_copy(update={"load_in_4bit": True})
    with caplog.at_level("WARNING"):
        live = load_model(four_bit, choose_backend(four_bit.backend))
    assert live.backend.NAME == "transformers" and live.device == "cpu" and live.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in live.model.parameters())
    assert sum("4-bit loading needs CUDA" in r.message for r in caplog.records) == 1


def test_unsloth_backend_without_cuda_is_a_config_error(cfg: FinetuneConfig) -> None:
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        choose_backend("unsloth")


def test_attach_lora_trains_only_the_adapters(cfg: FinetuneConfig) -> None:
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    trainable = [name for name, p in live.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    targeted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}  # ...q_proj.lora_A.default.weight
    assert targeted == set(cfg.lora.target_modules)


# --- train, smoke-infer, save-local (one trained tiny model shared by the tests below) -----------------------


@dataclass
class Trained:
    live: Any
    result: Any
    base_before: dict[str, torch.Tensor]
    lora_before: dict[str, torch.Tensor]
    store: Path


@pytest.fixture(scope="module")
def trained(cfg: FinetuneConfig, prompts: Prompts, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    params = {name: p.detach().clone() for name, p in live.model.named_parameters()}
    base_before = {n: t for n, t in params.items() if "lora_" not in n}
    lora_before = {n: t for n, t in params.items() if "lora_" in n}
    store = tmp_path_factory.mktemp("store")
    spec = TrainSpec(model=cfg.model, lora=cfg.lora, train=cfg.train, backend="transformers", store_uri=str(store),
                     prompts_key="prompts/unused.json", adapter_key="adapters/test", checkpoints_prefix="checkpoints/test")
    result = train_adapter(live, prompts, spec).metrics
    return Trained(live, result, base_before, lora_before, store)


@pytest.mark.slow
def test_training_lowers_the_loss(trained: Trained, cfg: FinetuneConfig) -> None:
    result = trained.result
    assert result.steps == cfg.train.max_steps
    assert len(result.losses) == cfg.train.max_steps
    assert result.loss_last < 0.5 * result.loss_first
    assert result.tokens_per_second > 0 and result.peak_memory_bytes > 0


@pytest.mark.slow
def test_training_changes_lora_weights_and_not_the_base(trained: Trained) -> None:
    now = dict(trained.live.model.named_parameters())
    assert all(torch.equal(now[n], before) for n, before in trained.base_before.items())
    changed = [n for n, before in trained.lora_before.items() if not torch.equal(now[n], before)]
    assert len(changed) == len(trained.lora_before)


@pytest.mark.slow
def test_adapter_is_published_with_a_manifest(trained: Trained) -> None:
    folder = trained.store / "adapters" / "test"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(manifest["files"])


@pytest.mark.slow
def test_smoke_infer_answers_end_with_eos_and_score_accuracy(trained: Trained, prompts: Prompts, cfg: FinetuneConfig) -> None:
    result = smoke_infer(trained.live, prompts, cfg.infer)
    assert len(result.answers) == len(prompts.eval_examples) + len(prompts.infer_prompts)
    assert all(a.ended_with_eos and a.answer for a in result.answers)
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    assert all(a.answer in {"积极", "消极", "中性"} for a in result.answers)


def test_smoke_infer_fails_an_untrained_model(cfg: FinetuneConfig, prompts: Prompts) -> None:
    """An untrained model's answers are refused: smoke-infer returns them with the reason (so the run can save
    them), and check_usable, which the flow calls once everything is saved, fails on it."""
    untrained = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    result = smoke_infer(untrained, prompts, cfg.infer)
    assert result.unusable and "unusable" in result.unusable
    assert result.scores is None and len(result.answers) == len(prompts.eval_examples) + len(prompts.infer_prompts)
    with pytest.raises(QualityGateError, match="unusable"):
        check_usable(result)


@pytest.mark.slow
def test_saved_adapter_reloads_with_identical_logits(trained: Trained, tmp_path: Path, cfg: FinetuneConfig) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = str((tmp_path / "out").resolve())
    save_local(run_summary(), "# card", b"png", str(trained.store), "adapters/test", None, out)
    files = {p.name for p in Path(out).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "summary.json", "README.md"} <= files
    assert json.loads((Path(out) / "summary.json").read_text())["adapter_dir"] == out

    base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.name), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    trained.live.model.eval()
    ids = trained.live.tokenizer(["分类以下文本的情感。\n很好\n答:"], return_tensors="pt")
    with torch.no_grad():
        expected = trained.live.model(**ids).logits
        actual = reloaded(**ids).logits
    assert torch.equal(expected, actual)


def run_summary() -> RunSummary:
    """A summary with every field set (the values do not matter to save-local)."""
    from loraflow.summary import QualityGate

    return RunSummary(
        flow_run_id="test", backend="transformers", model="tiny", model_revision=None, prompt_template="alpaca",
        lora={}, train_settings={}, dataset_uri="d.json", dataset_sha256="0", eval_dataset_uri=None,
        num_train_examples=1, num_eval_examples=0, train_steps=1, resumed_from_step=0, train_loss_first=1.0,
        train_loss_last=0.5, train_losses=[(1, 1.0)], train_runtime_seconds=1.0, train_tokens_per_second=1.0,
        packing=False, peak_memory_bytes=1, eval_accuracy=None, base_eval_accuracy=None, eval_scoring=None,
        eval_accuracy_greedy=None, eval_per_label=None, base_eval_per_label=None,
        quality_gate=QualityGate(min_eval_accuracy=None, require_beat_base=False, failures=[]), labels=None,
        smoke_answers=[], loss_curve_uri="file:///x", adapter_uri="x", summary_uri="x", cached_tasks=[],
    )


# --- push-hub --------------------------------------------------------------------------------------------------


def test_push_hub_uploads_the_folder_with_its_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow.config import HubSettings

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nbase_model: x\n---\n# card")
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the stand-in is on 127.0.0.1
        url = push_hub(str(tmp_path), HubSettings(repo_id="me/adapter"), token="hf_test_token")
        assert url == f"{hub.url}/me/adapter"
        assert hub.record.repos["me/adapter"]["visibility"] == "private"
        assert set(hub.record.files["me/adapter"]) == {"adapter_config.json", "README.md"}
        assert all(h.get("authorization") == "Bearer hf_test_token" or h.get("Authorization") == "Bearer hf_test_token"
                   for _, _, h in hub.record.requests)


def test_push_hub_without_token_or_repo_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from loraflow.config import HubSettings

    with caplog.at_level("INFO"):
        assert push_hub(str(tmp_path), HubSettings(repo_id="me/adapter"), token=None) is None
        assert push_hub(str(tmp_path), HubSettings(repo_id=None), token="t") is None
    assert any("no token" in r.message for r in caplog.records)
