"""The model card (README.md) that travels with the adapter: what it was trained from, how, and how well."""

from __future__ import annotations

import json
from typing import Any

from loraflow.config import FinetuneConfig


def render_model_card(cfg: FinetuneConfig, summary: dict[str, Any]) -> str:
    """Markdown with Hub metadata; built only from the config and the run's summary (no secrets in either)."""
    metrics = {
        key: summary.get(key)
        for key in ("train_steps", "train_loss_first", "train_loss_last", "train_tokens_per_second",
                    "eval_accuracy", "base_eval_accuracy")
    }
    return f"""---
base_model: {cfg.model.name}
library_name: peft
tags: [lora, loraflow, sft, trl]
---

# LoRA adapter for `{cfg.model.name}`

Fine-tuned with [loraflow](https://pypi.org/project/loraflow/) (backend `{summary.get("backend")}`).

| | |
|---|---|
| base model | `{cfg.model.name}` (revision `{cfg.model.revision or "default"}`) |
| dataset | `{summary.get("dataset_uri")}` |
| dataset sha256 | `{summary.get("dataset_sha256")}` |
| examples | {summary.get("num_train_examples")} train / {summary.get("num_eval_examples")} eval |
| prompt template | `{cfg.prompt.template if len(cfg.prompt.template) < 40 else "custom"}` |

## LoRA
```json
{json.dumps(cfg.lora.model_dump(mode="json"), indent=1)}
```

## Training
```json
{json.dumps(cfg.train.model_dump(mode="json"), indent=1)}
```

## Metrics
```json
{json.dumps(metrics, indent=1)}
```

{render_accuracy(summary)}

![training loss](loss_curve.png)

## Use
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{cfg.model.name}")
model = PeftModel.from_pretrained(base, "<this repo>")
tokenizer = AutoTokenizer.from_pretrained("<this repo>")
```
"""


def render_accuracy(summary: dict[str, Any]) -> str:
    """Accuracy on the eval split, fine-tuned against the base model, and precision/recall per label."""
    if summary.get("eval_accuracy") is None:
        return "Eval accuracy was not measured: the eval outputs do not form a closed label set."

    def number(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    rows = [
        f"| {label} | {scores['support']} | {number(scores['precision'])} | {number(scores['recall'])} "
        f"| {number(summary['base_eval_per_label'][label]['precision'])} "
        f"| {number(summary['base_eval_per_label'][label]['recall'])} |"
        for label, scores in summary["eval_per_label"].items()
    ]
    return "\n".join([
        f"Eval accuracy on {sum(s['support'] for s in summary['eval_per_label'].values())} held-out examples: "
        f"**{number(summary['eval_accuracy'])}** fine-tuned, {number(summary['base_eval_accuracy'])} base model "
        f"({summary['eval_scoring']} scoring; the fine-tuned model's greedy answers: "
        f"{number(summary['eval_accuracy_greedy'])}).",
        "",
        "| label | eval examples | precision | recall | base precision | base recall |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
