"""Prompts and the eval split: every row rendered with the template (EOS appended), a seeded eval set split off.

Every row becomes a prompt (where generation starts) and a completion (the answer and EOS). With
train.completion_only_loss the loss is on the completions only: for a conversation, its last assistant
turn (see loraflow/templates.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from loraflow.config import DataConfig, InferSettings, PromptConfig
from loraflow.errors import ConfigError
from loraflow.logs import run_logger
from loraflow.models import resolve_model
from loraflow.templates import answer_of, render
from loraflow.data import Dataset
from loraflow.store import Store

MAX_LABELS = 20  # more distinct answers than this is free text, not a label set


@dataclass(frozen=True)
class EvalExample:
    """One prompt smoke-infer generates for, with the answer it expects (None for infer.prompts)."""

    prompt: str  # the template up to the response, where generation starts
    answer: str | None  # the expected output (None for infer.prompts); a conversation's last assistant turn
    instruction: str  # "" for a conversation
    input: str  # a conversation's last user turn


@dataclass(frozen=True)
class Prompts:
    """The prompt set of a run: training texts split into prompt and completion, eval and smoke-test prompts."""

    train_prompts: list[str]  # the template up to the response
    train_completions: list[str]  # the response and EOS; prompt + completion is the training text
    eval_examples: list[EvalExample]
    infer_prompts: list[EvalExample]  # from infer.prompts, rendered the same way
    labels: list[str] | None  # the closed label set, when the outputs form one
    eos_token: str

    @property
    def train_texts(self) -> list[str]:
        return [p + c for p, c in zip(self.train_prompts, self.train_completions)]

    def to_json(self) -> bytes:
        """UTF-8 JSON of every field: what a training process started elsewhere reads (see store_prompts)."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Prompts":
        fields = json.loads(raw)
        for name in ("eval_examples", "infer_prompts"):
            fields[name] = [EvalExample(**example) for example in fields[name]]
        return cls(**fields)


def split_rows(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then the first round(n × fraction) rows (at least 1 when fraction > 0) are held out."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    held_out = 0 if fraction == 0 else max(1, round(len(shuffled) * fraction))
    held_out = min(held_out, len(shuffled) - 1)  # keep at least one row to train on
    return shuffled[held_out:], shuffled[:held_out]


def closed_label_set(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> list[str] | None:
    """The labels, when the training answers take at most MAX_LABELS distinct values, each at least twice,
    and every eval answer is one of them; else None (free text: no accuracy)."""
    counts = Counter(answer_of(row).strip() for row in train_rows)
    labels = set(counts)
    if not eval_rows or len(labels) > MAX_LABELS or min(counts.values(), default=0) < 2:
        return None
    if any(answer_of(row).strip() not in labels for row in eval_rows):
        return None
    return sorted(labels)


def check_template_fits(template: str, datasets: list[Dataset]) -> None:
    """Conversations render only through the tokenizer's chat template: a configured one must say so."""
    chat = [dataset.uri for dataset in datasets if dataset.is_chat]
    if chat and template != "chat":
        shown = template if template in ("alpaca", "alpaca_zh") else "a custom template"
        raise ConfigError(
            f"prompt.template: {chat[0]} holds chat records (messages), which render with the model's chat "
            f"template, but prompt.template is {shown}; set prompt.template: chat"
        )


def split_text(template: str, row: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    """(prompt, completion) of one row: the whole text must begin with the prompt that generation starts from."""
    prompt = render(template, row, tokenizer, with_output=False)
    text = render(template, row, tokenizer)
    if not text.startswith(prompt):  # a chat template that renders a turn differently once it is answered
        raise ConfigError(
            "prompt.template: the rendered training text does not begin with the rendered prompt, so the answer "
            f"cannot be split off (prompt ends {prompt[-60:]!r}, text there reads {text[max(0, len(prompt) - 60) : len(prompt)]!r})"
        )
    return prompt, text[len(prompt) :]


def example_of(template: str, row: dict[str, Any], tokenizer: Any, answer: str | None) -> EvalExample:
    prompt = render(template, row, tokenizer, with_output=False)
    if "messages" in row:
        return EvalExample(prompt, answer, "", row["messages"][-2]["content"])
    return EvalExample(prompt, answer, row["instruction"], row.get("input", ""))


def load_tokenizer(model_name: str, revision: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model_name), revision=revision)


def format_prompts(
    train: Dataset,
    eval_dataset: Dataset | None,
    prompt: PromptConfig,
    data: DataConfig,
    infer: InferSettings,
    tokenizer: Any,
) -> Prompts:
    """Rows -> training texts, eval prompts with expected answers, and the smoke-test prompts."""
    check_template_fits(prompt.template, [train] + ([eval_dataset] if eval_dataset else []))
    if eval_dataset is not None:
        train_rows, eval_rows = train.rows, eval_dataset.rows
    else:
        train_rows, eval_rows = split_rows(train.rows, data.eval_fraction, data.seed)
    texts = [split_text(prompt.template, row, tokenizer) for row in train_rows]
    prompts = Prompts(
        train_prompts=[head for head, _ in texts],
        train_completions=[tail for _, tail in texts],
        eval_examples=[example_of(prompt.template, row, tokenizer, answer_of(row).strip()) for row in eval_rows],
        infer_prompts=[
            example_of(prompt.template, {"instruction": p.instruction, "input": p.input}, tokenizer, None)
            for p in infer.prompts
        ],
        labels=closed_label_set(train_rows, eval_rows),
        eos_token=tokenizer.eos_token,
    )
    run_logger().info(
        "format-prompts: %d train texts, %d eval examples, %d smoke prompts, labels=%s",
        len(prompts.train_prompts), len(prompts.eval_examples), len(prompts.infer_prompts), prompts.labels,
    )
    return prompts


def prompts_key(prompts: Prompts) -> str:
    """The prompt set's key in the store: `prompts/<sha256 of its JSON>.json`, the same for the same prompts."""
    return f"prompts/{hashlib.sha256(prompts.to_json()).hexdigest()}.json"


def store_prompts(store: Store, prompts: Prompts) -> str:
    """Put the prompt set in the store under prompts_key (writing it again is harmless); returns the key."""
    key = prompts_key(prompts)
    store.put_bytes(prompts.to_json(), key)
    return key


def load_prompts(store: Store, key: str) -> Prompts:
    """The prompt set store_prompts wrote under `key`. Raises FileNotFoundError when it is not there."""
    return Prompts.from_json(store.read_bytes(key))
