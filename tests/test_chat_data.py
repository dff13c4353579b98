"""Chat datasets: `messages` (role/content) and ShareGPT `conversations` (from/value) records, rendered with the
tokenizer's chat template; with completion_only_loss the loss covers the last assistant turn only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraflow.config import FinetuneConfig, load_config
from loraflow.errors import ConfigError
from loraflow.data import read_dataset
from loraflow.prompts import Prompts, format_prompts, load_tokenizer
from tests.conftest import ROOT, TINY_CONFIG

CHAT_DEMO = ROOT / "data" / "demo" / "sentiment_zh_chat.jsonl"

# One two-turn conversation with a system prompt, and two short ones, in both shapes.
CONVERSATIONS = [
    [("system", "Answer in one word."), ("user", "Capital of France?"), ("assistant", "Paris"),
     ("user", "And of Italy?"), ("assistant", "Rome")],
    [("user", "2+2?"), ("assistant", "4")],
    [("user", "Colour of the sky?"), ("assistant", "Blue")],
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def as_messages(conversation: list[tuple[str, str]]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": text} for role, text in conversation]}


def as_sharegpt(conversation: list[tuple[str, str]]) -> dict[str, Any]:
    return {"conversations": [{"from": SHAREGPT_NAMES[role], "value": text} for role, text in conversation]}


@pytest.fixture(scope="module")
def cfg() -> FinetuneConfig:
    return load_config(TINY_CONFIG, [{"prompt": {"template": "chat"}}])


@pytest.fixture(scope="module")
def tokenizer(cfg: FinetuneConfig) -> Any:
    return load_tokenizer(cfg.model.name, None)


# The two-turn conversation's turns with another last answer: the eval example renders to the same prompt as that
# training conversation, and is no copy of it (eval rows identical to training rows are removed from the eval set).
HELD_OUT = CONVERSATIONS[0][:-1] + [("assistant", "Roma")]


def chat_prompts(tmp_path: Path, cfg: FinetuneConfig, tokenizer: Any, shape: Any) -> Prompts:
    """Train on all three conversations; the eval example asks what the two-turn one asks."""
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.json"
    train.write_text("".join(json.dumps(shape(c)) + "\n" for c in CONVERSATIONS))
    held_out.write_text(json.dumps([shape(HELD_OUT)]))
    return format_prompts(read_dataset(str(train)), read_dataset(str(held_out)), cfg.prompt, cfg.data, cfg.infer, tokenizer)


@pytest.mark.parametrize("shape", [as_messages, as_sharegpt], ids=["messages", "sharegpt"])
def test_chat_records_render_with_the_chat_template(tmp_path: Path, cfg: FinetuneConfig, tokenizer: Any, shape: Any) -> None:
    prompts = chat_prompts(tmp_path, cfg, tokenizer, shape)
    prompt, completion = prompts.train_prompts[0], prompts.train_completions[0]
    # ChatML markers from SmolLM2's template; every turn before the last answer is in the prompt
    assert prompt.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?")
    assert "<|im_start|>assistant\nParis<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert completion == "Rome<|im_end|>"  # the last answer and its end-of-turn (= EOS), nothing after
    # the template's own default system prompt where the record has none
    assert prompts.train_prompts[1].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompts.train_completions[1] == "4<|im_end|>"
    example = prompts.eval_examples[0]
    assert (example.prompt, example.answer, example.input) == (prompt, "Roma", "And of Italy?")


def test_both_shapes_give_the_same_prompts(tmp_path: Path, cfg: FinetuneConfig, tokenizer: Any) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    assert chat_prompts(tmp_path / "a", cfg, tokenizer, as_messages) == chat_prompts(tmp_path / "b", cfg, tokenizer, as_sharegpt)


@pytest.mark.parametrize("completion_only", [True, False], ids=["responses-only", "whole-text"])
def test_loss_covers_only_the_last_answer_when_completion_only(
    tmp_path: Path, cfg: FinetuneConfig, tokenizer: Any, completion_only: bool
) -> None:
    """What the trainer really computes the loss on: the labels its collator builds (-100 = ignored)."""
    from loraflow.backends import load_model
    from loraflow.training import build_trainer

    prompts = chat_prompts(tmp_path, cfg, tokenizer, as_messages)
    train = cfg.train.model_copy(update={"completion_only_loss": completion_only})
    trainer = build_trainer(load_model(cfg.model, "transformers"), prompts, train, cfg.model, tmp_path / "work")
    batch = trainer.data_collator([trainer.train_dataset[0]])  # the two-turn conversation (rows keep their order)
    labels = batch["labels"][0].tolist()
    trained = tokenizer.decode([t for t in labels if t != -100])
    if completion_only:
        assert trained == "Rome<|im_end|>"
    else:
        assert trained == prompts.train_texts[0]  # every token: system, user turns, the earlier answer, markers


def test_demo_chat_dataset_is_valid_and_multi_turn() -> None:
    dataset = read_dataset(str(CHAT_DEMO))
    assert dataset.is_chat and len(dataset.rows) == 90
    assert {row["messages"][-1]["content"] for row in dataset.rows} == {"积极", "中性", "消极"}
    assert any(len(row["messages"]) > 3 for row in dataset.rows)


def test_chat_records_need_the_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    cfg = load_config(TINY_CONFIG)  # a custom instruction template
    with pytest.raises(ConfigError, match=r"prompt\.template.*chat records.*set prompt\.template: chat"):
        format_prompts(read_dataset(str(CHAT_DEMO)), None, cfg.prompt, cfg.data, cfg.infer, tokenizer)


@pytest.mark.slow
def test_flow_trains_on_a_chat_dataset_and_saves_the_merged_model(tmp_path: Path) -> None:
    """`loraflow run` on the shipped chat demo with the tiny model, responses-only loss, output.save_merged."""
    from tests.conftest import run_cli

    out = tmp_path / "out"
    result = run_cli(
        "run", "--config", str(TINY_CONFIG), "--dataset", str(CHAT_DEMO), "--output", str(out),
        "--set", "prompt.template=chat", "--set", "output.save_merged=true", "--set", f"output.store={tmp_path / 'store'}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # SmolLM2's chat template adds its system prompt: 9 training conversations are 145-164 tokens, over the tiny
    # config's 128, and are left out and counted (TRL used to drop them without a word: their prompts fill 128)
    assert summary["num_train_examples"] + summary["num_train_examples_too_long"] + summary["num_eval_examples"] == 90
    assert summary["num_train_examples_too_long"] == 9
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"]
    assert summary["labels"] == ["中性", "消极", "积极"] and summary["eval_accuracy"] is not None
    assert {a["answer"] for a in summary["smoke_answers"]} <= {"中性", "消极", "积极"}
    assert summary["merged_dir"] == str(out / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "merged").iterdir()}
    assert "Task run 'merge-model-" in result.stdout + result.stderr
