"""The whole eight-task flow on the tiny config under Prefect, as a user runs it (`loraflow run`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {
    "backend", "model", "dataset_uri", "dataset_sha256", "num_train_examples", "num_eval_examples", "train_steps",
    "train_loss_first", "train_loss_last", "train_tokens_per_second", "peak_memory_bytes", "eval_accuracy",
    "adapter_dir", "cached_tasks", "hub_url", "duration_seconds",
}
TASKS = ["fetch-dataset", "format-prompts", "load-4bit-model", "attach-LoRA", "train", "smoke-infer", "save-local", "push-hub"]


@pytest.fixture(scope="module")
def flow_run(tiny_run: dict) -> dict:
    """`loraflow run` on the tiny config with a Hub repo set (tests/conftest.py: tiny_run, shared by the session)."""
    return tiny_run


def test_every_task_ran_and_the_run_completed(flow_run: dict) -> None:
    log = flow_run["result"].stdout + flow_run["result"].stderr
    for name in TASKS:
        assert f"Task run '{name}-" in log, f"task {name} did not run"
    assert "Flow run" in log and "Finished in state Completed()" in log
    assert "我不喜欢在雨中踢足球 ->" in flow_run["result"].stdout  # the demo prompt's answer is printed


def test_summary_has_every_key_and_the_loss_fell(flow_run: dict) -> None:
    summary = flow_run["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["backend"] == "transformers"
    assert summary["train_steps"] == 120
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"]
    assert summary["num_train_examples"] + summary["num_eval_examples"] == 90
    assert summary["eval_accuracy"] is not None
    assert summary["cached_tasks"] == []  # first run in a fresh store
    assert summary["adapter_dir"] == str(flow_run["work"] / "out")


def test_packing_auto_is_off_on_the_cpu(flow_run: dict) -> None:
    """train.packing: auto (the tiny config's) packs only where attention keeps examples apart (Unsloth,
    flash-attention); transformers on a CPU runs sdpa, so the run trained on padded rows and says so."""
    assert flow_run["summary"]["packing"] is False
    log = flow_run["result"].stdout + flow_run["result"].stderr
    plan = next(line for line in log.splitlines() if "effective batch" in line)
    assert "8 examples × 1 micro-batches × 1 rank(s)" in plan and "padded rows of ≤128 tokens" in plan
    assert "packing off" in plan


def test_lora_weights_moved_from_their_initialisation(flow_run: dict) -> None:
    """PEFT starts every lora_B at zero: non-zero B means training changed the adapter. The saved file holds
    only adapter tensors, so the base weights were neither trained nor saved."""
    tensors = load_file(str(flow_run["work"] / "out" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in name for name in tensors)
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_reloaded_adapter_gives_the_same_answers(flow_run: dict) -> None:
    """The artifact reloads with PeftModel.from_pretrained and answers exactly as smoke-infer did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.models import resolve_model

    out = flow_run["work"] / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("loraflow:tiny-llama"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    for item in flow_run["summary"]["smoke_answers"]:
        prompt = f"分类以下文本的情感。\n{item['input']}\n答:"
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answer == item["answer"]


def test_push_hub_reached_the_endpoint_with_the_model_card(flow_run: dict) -> None:
    hub = flow_run["hub"]
    assert flow_run["summary"]["hub_url"].endswith("/loraflow-tests/tiny-adapter")
    assert hub.repos["loraflow-tests/tiny-adapter"]["visibility"] == "private"
    files = hub.files["loraflow-tests/tiny-adapter"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "summary.json", "tokenizer.json"} <= set(files)
    card = files["README.md"].decode()
    assert "base_model: loraflow:tiny-llama" in card
    assert flow_run["summary"]["dataset_sha256"] in card


def test_the_token_is_nowhere_but_the_authorization_header(flow_run: dict) -> None:
    sentinel = "hf_sentinel_token_for_tests"
    result = flow_run["result"]
    assert sentinel not in result.stdout + result.stderr
    for path in (flow_run["work"]).rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path
    for content in flow_run["hub"].files["loraflow-tests/tiny-adapter"].values():
        assert sentinel.encode() not in content
