"""smoke-infer: greedy answers for the eval prompts and infer.prompts; accuracy on a closed label set.

A run whose answers are empty, or never reach EOS within max_new_tokens, fails here: such an adapter
has not learnt the format, and pushing it would only hide that. When the eval outputs form a closed label
set, the base model answers the same eval prompts too (the adapter switched off, no second load), so the
run can say how much the fine-tuning moved accuracy.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import task

from loraflow.config import InferSettings, ModelConfig
from loraflow.errors import QualityGateError
from loraflow.fingerprint import stable_hash
from loraflow.live_model import LiveModel
from loraflow.logs import run_logger
from loraflow.quality import EvalScores, score_answers
from loraflow.retries import retry_transient
from loraflow.store import open_store
from tasks.format_prompts import EvalExample, Prompts
from tasks.load_model import load_model

GENERATION_BATCH = 8
BASE_ANSWER_SLACK_TOKENS = 8
INFER_RESULT_VERSION = 2  # in the cache key: a result cached in another shape is never read back


@dataclass(frozen=True)
class Answer:
    instruction: str
    input: str
    answer: str
    expected: str | None
    ended_with_eos: bool


@dataclass(frozen=True)
class InferResult:
    answers: list[Answer]  # the scored eval examples first, then infer.prompts
    scores: EvalScores | None = None  # the fine-tuned model on the eval examples, when they form a closed label set
    base_scores: EvalScores | None = None  # the base model (adapter disabled) on the same examples
    base_answers: list[str] = field(default_factory=list)  # the base model's answer to each scored eval example

    @property
    def accuracy(self) -> float | None:
        return self.scores.accuracy if self.scores else None

    @property
    def base_accuracy(self) -> float | None:
        return self.base_scores.accuracy if self.base_scores else None


def generate(live: LiveModel, texts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy decoding, left-padded batches; returns (answer, reached EOS) per text."""
    import torch

    tokenizer, model = live.tokenizer, live.model
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    results = []
    for start in range(0, len(texts), GENERATION_BATCH):
        batch = tokenizer(texts[start : start + GENERATION_BATCH], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            kept = row[: row.index(tokenizer.eos_token_id)] if ended else row
            results.append((tokenizer.decode(kept, skip_special_tokens=True).strip(), ended))
    return results


def smoke_infer(live: LiveModel, prompts: Prompts, infer: InferSettings) -> InferResult:
    """Try the trained model on held-out and configured prompts."""
    if live.backend == "unsloth":
        from loraflow import unsloth_backend

        unsloth_backend.for_inference(live.model)
    live.model.eval()
    eval_examples = prompts.eval_examples[: infer.max_eval_examples]
    examples: list[EvalExample] = eval_examples + prompts.infer_prompts
    generated = generate(live, [e.prompt for e in examples], infer.max_new_tokens)
    answers = [Answer(e.instruction, e.input, text, e.answer, ended) for e, (text, ended) in zip(examples, generated)]
    log = run_logger()
    for a in answers:
        log.info("smoke-infer: %s / %s -> %r%s", a.instruction, a.input, a.answer,
                 "" if a.expected is None else f" (expected {a.expected!r})")
    bad = [a for a in answers if not a.answer or not a.ended_with_eos]
    if bad:
        first = bad[0]
        reason = "an empty answer" if not first.answer else f"no EOS within {infer.max_new_tokens} new tokens"
        raise QualityGateError(
            f"smoke-infer: {len(bad)} of {len(answers)} answers are unusable; e.g. {first.input or first.instruction!r} "
            f"gave {reason} ({first.answer[:80]!r}). Train longer, raise the learning rate, or check the template."
        )
    if not prompts.labels or not eval_examples:
        return InferResult(answers)
    expected = [e.answer for e in eval_examples]
    scores = score_answers([a.answer for a in answers[: len(eval_examples)]], expected, prompts.labels)
    base_tokens = base_answer_tokens(live, prompts.labels, infer)
    base_answers = base_model_answers(live, [e.prompt for e in eval_examples], base_tokens)
    base_scores = score_answers(base_answers, expected, prompts.labels)
    log.info("smoke-infer: accuracy %.3f on %d eval examples, base model %.3f (labels %s)",
             scores.accuracy, len(eval_examples), base_scores.accuracy, prompts.labels)
    return InferResult(answers, scores, base_scores, base_answers)


def base_answer_tokens(live: LiveModel, labels: list[str], infer: InferSettings) -> int:
    """A base model rarely stops at EOS, and only its answer's first line is scored: it gets the longest label's
    tokens plus a few (for whitespace before and the newline after), not max_new_tokens of rambling."""
    longest = max(len(live.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    return min(infer.max_new_tokens, longest + BASE_ANSWER_SLACK_TOKENS)


def base_model_answers(live: LiveModel, texts: list[str], max_new_tokens: int) -> list[str]:
    """The same prompts through the base model: PEFT's disable_adapter() skips the LoRA layers in place."""
    with live.model.disable_adapter():
        return [text for text, _ in generate(live, texts, max_new_tokens)]


def load_published_adapter(model: ModelConfig, store_uri: str, adapter_key: str) -> LiveModel:
    """Base model + the adapter from the store: for a run whose training was served from the cache."""
    from peft import PeftModel

    live = load_model(model)
    with tempfile.TemporaryDirectory(prefix="loraflow-adapter-") as folder:
        open_store(store_uri).get_folder(adapter_key, Path(folder))
        peft_model = PeftModel.from_pretrained(live.model, folder)
    run_logger().info("smoke-infer: loaded the published adapter %s onto %s", adapter_key, model.name)
    return replace(live, model=peft_model)


def smoke_infer_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Answers depend on the adapter's bytes, the prompts and the generation settings; not on the run."""
    prompts: Prompts = parameters["prompts"]
    return f"smoke-infer-v{INFER_RESULT_VERSION}-" + stable_hash(
        open_store(parameters["store_uri"]).digest(parameters["adapter_key"]),
        [(e.prompt, e.answer) for e in prompts.eval_examples + prompts.infer_prompts],
        prompts.labels,
        parameters["infer"],
    )


@task(name="smoke-infer", cache_key_fn=smoke_infer_cache_key, persist_result=True,
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def smoke_infer_task(
    live: LiveModel | None, prompts: Prompts, infer: InferSettings, model: ModelConfig, store_uri: str, adapter_key: str
) -> InferResult:
    """Generate for the eval and demo prompts; fail on empty or endless answers; score fine-tuned vs base.

    `live` is None when training was served from the cache: then the base model and the published
    adapter are loaded here, and only here.
    """
    return smoke_infer(live or load_published_adapter(model, store_uri, adapter_key), prompts, infer)
