"""The model card (README.md) that travels with the adapter, built with huggingface_hub's ModelCard from the run
summary alone: Hub metadata (base_model, library, tags, datasets, license, the eval accuracy as model-index
results), then what it was trained from, how, and how well."""

from __future__ import annotations

import json
import re

from loraflow.config import HubSettings
from loraflow.summary import LOSS_CURVE_FILE, RunSummary

HUB_DATASET_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CARD_METRICS = ("train_steps", "train_loss_first", "train_loss_last", "train_tokens_per_second", "eval_accuracy",
                "base_eval_accuracy", "eval_accuracy_ci", "base_eval_accuracy_ci", "num_scored_examples",
                "num_train_examples", "passes_over_data", "num_train_examples_too_long", "num_eval_duplicates_removed")


def card_data(summary: RunSummary, hub: HubSettings):
    """Hub metadata. A dataset is listed only when it is a Hub id (a local path means nothing on the Hub); the eval
    accuracy becomes a model-index result on the held-out split."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset_id = summary.dataset_uri if HUB_DATASET_ID.match(summary.dataset_uri) else None
    results = None
    if summary.eval_accuracy is not None:
        results = [EvalResult(
            task_type="text-generation", task_name="label accuracy on held-out examples",
            dataset_type=dataset_id or "local", dataset_name=summary.eval_dataset_uri or summary.dataset_uri,
            dataset_split="held-out", metric_type="accuracy", metric_value=round(summary.eval_accuracy, 4),
            metric_name=f"accuracy ({summary.eval_scoring} scoring)",
        )]
    return ModelCardData(
        base_model=summary.model, library_name="peft", license=hub.license, tags=["lora", "loraflow", "sft", "trl"],
        datasets=[dataset_id] if dataset_id else None, model_name=hub.repo_id or f"{summary.model} LoRA adapter",
        eval_results=results,
    )


def render_model_card(summary: RunSummary, hub: HubSettings) -> str:
    """Markdown with a YAML header, as huggingface_hub writes it; no secrets (the summary holds none)."""
    from huggingface_hub import ModelCard

    metrics = {key: getattr(summary, key) for key in CARD_METRICS}
    template = summary.prompt_template if len(summary.prompt_template) < 40 else "custom"
    source = (f" (newest file in `{summary.dataset_source}`)"
              if summary.dataset_source and summary.dataset_source != summary.dataset_uri else "")
    etag = f", ETag `{summary.dataset_etag}`" if summary.dataset_etag else ""
    parent = summary.parent_adapter
    parent = (f"`{parent['source']}` = `{parent['adapter_key'] or parent['hub_repo']}` "
              f"(`{parent['digest'] or parent['hub_revision']}`)" if parent else "a fresh LoRA")
    body = f"""
# LoRA adapter for `{summary.model}`

Fine-tuned with [loraflow](https://pypi.org/project/loraflow/) (backend `{summary.backend}`).

| | |
|---|---|
| base model | `{summary.model}` (revision `{summary.model_revision or "default"}`) |
| dataset | `{summary.dataset_uri}`{source} |
| dataset sha256 | `{summary.dataset_sha256}`{etag} |
| examples | {summary.num_train_examples} train (each seen {summary.passes_over_data:g} times) / {summary.num_eval_examples} eval |
| prompt template | `{template}` |
| started from | {parent} |
| model line | `{summary.line}` |

## LoRA
```json
{json.dumps(summary.lora, indent=1)}
```

## Training
```json
{json.dumps(summary.train_settings, indent=1)}
```

## Metrics
```json
{json.dumps(metrics, indent=1)}
```

{render_accuracy(summary)}

{render_promotion(summary)}

![training loss]({LOSS_CURVE_FILE})

## Use
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{summary.model}")
model = PeftModel.from_pretrained(base, "<this repo>")
tokenizer = AutoTokenizer.from_pretrained("<this repo>")
```
"""
    return str(ModelCard(f"---\n{card_data(summary, hub).to_yaml()}\n---\n{body}"))


def render_promotion(summary: RunSummary) -> str:
    """The promote step's decision with both scores and the paired test (loraflow.report)."""
    from loraflow.report import promotion_markdown

    return "\n".join(promotion_markdown(summary.promotion))


def render_accuracy(summary: RunSummary) -> str:
    """Accuracy on the eval split, fine-tuned against the base model, and the per-label table (loraflow.report)."""
    from loraflow.report import notes_markdown, per_label_table
    from loraflow.summary import interval_text

    if summary.eval_accuracy is None:
        return "\n".join(["Eval accuracy was not measured: the eval outputs do not form a closed label set.", "",
                          *notes_markdown(summary)])
    scored = summary.num_scored_examples
    return "\n".join([
        f"Eval accuracy on {scored} held-out examples: **{summary.eval_accuracy:.3f}** fine-tuned, "
        f"{summary.base_eval_accuracy:.3f} base model ({summary.eval_scoring} scoring; the fine-tuned model's greedy "
        f"answers: {summary.eval_accuracy_greedy:.3f}). 95% intervals (Wilson): fine-tuned "
        f"{interval_text(summary.eval_accuracy_ci)}, base model {interval_text(summary.base_eval_accuracy_ci)}.",
        "",
        *per_label_table(summary),
        "",
        *notes_markdown(summary),
    ])
