"""The model card (README.md) that travels with the adapter: what it was trained from, how, and how well."""

from __future__ import annotations

import json
from typing import Any

from loraflow.config import FinetuneConfig


def render_model_card(cfg: FinetuneConfig, summary: dict[str, Any]) -> str:
    """Markdown with Hub metadata; built only from the config and the run's summary (no secrets in either)."""
    metrics = {
        key: summary.get(key)
        for key in ("train_steps", "train_loss_first", "train_loss_last", "train_tokens_per_second", "eval_accuracy")
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

## Use
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{cfg.model.name}")
model = PeftModel.from_pretrained(base, "<this repo>")
tokenizer = AutoTokenizer.from_pretrained("<this repo>")
```
"""
