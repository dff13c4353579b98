"""Inference after training (smoke-infer): greedy answers for the eval prompts and infer.prompts; accuracy on a closed label set.

A run whose answers are empty, or never reach EOS within max_new_tokens, is refused: such an adapter has not learnt
the format, and pushing or promoting it would only hide that. smoke-infer returns those answers with the reason
(`InferResult.unusable`) instead of raising, so the run still saves its output folder, summary and artifacts; the
flow then ends Failed naming the reason (`check_usable`). When the eval outputs form a closed label
set, the fine-tuned model and the base model (the adapter switched off, no second load) are scored on the
same eval prompts by the same rule, so the run can say how much the fine-tuning moved accuracy:
- `infer.label_scoring: likelihood` (default): the label whose tokens, then EOS, are most likely after the
  prompt (lm-eval-harness's multiple-choice accuracy). A base model that was never taught the answer format
  still gets a fair score instead of 0.
- `greedy`: the first line of the greedy answer must be the label.
The fine-tuned model's greedy answers are scored as well (`eval_accuracy_greedy`): what it says unprompted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraflow.backends import LiveModel, keep_trained, open_trained
from loraflow.config import InferSettings, ModelConfig
from loraflow.errors import QualityGateError
from loraflow.logs import run_logger
from loraflow.prompts import EvalExample, Prompts
from loraflow.quality import EvalScores, answer_label, score_labels

GENERATION_BATCH = 16  # prompts per generate() call: on a CPU, 16 took 15 % less time than 8 (SmolLM2, 64 prompts)
BASE_ANSWER_SLACK_TOKENS = 8


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
    scored_labels: list[str | None] = field(default_factory=list)  # the label each scored example counted as
    base_scored_labels: list[str | None] = field(default_factory=list)  # the same for the base model
    base_answers: list[str] = field(default_factory=list)  # the base model's greedy answers (greedy scoring only)
    greedy_scores: EvalScores | None = None  # the fine-tuned model's greedy answers, first line = label
    unusable: str | None = None  # why the answers are refused (empty, or no EOS within max_new_tokens); None = usable

    @property
    def accuracy(self) -> float | None:
        return self.scores.accuracy if self.scores else None

    @property
    def base_accuracy(self) -> float | None:
        return self.base_scores.accuracy if self.base_scores else None

    @property
    def greedy_accuracy(self) -> float | None:
        return self.greedy_scores.accuracy if self.greedy_scores else None


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


def scored_examples(prompts: Prompts, infer: InferSettings) -> list[EvalExample]:
    """The eval examples smoke-infer scores (the first infer.max_eval_examples): the champion is scored on these too."""
    return prompts.eval_examples[: infer.max_eval_examples]


def smoke_infer(live: LiveModel, prompts: Prompts, infer: InferSettings) -> InferResult:
    """Try the trained model on held-out and configured prompts: greedy answers, and accuracy of both models.

    Unusable answers (an empty one, or one without EOS within infer.max_new_tokens) come back with the reason in
    `unusable` and no scores; `check_usable` turns that into the run's failure once its output is saved."""
    live.backend.prepare_for_inference(live)
    eval_examples = scored_examples(prompts, infer)
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
        unusable = (
            f"smoke-infer: {len(bad)} of {len(answers)} answers are unusable; e.g. {first.input or first.instruction!r} "
            f"gave {reason} ({first.answer[:80]!r}). Train longer, raise the learning rate, or check the template."
        )
        log.warning("%s", unusable)
        return InferResult(answers, unusable=unusable)
    if not prompts.labels or not eval_examples:
        return InferResult(answers)
    result = score_eval_examples(live, eval_examples, answers, prompts.labels, infer)
    log.info("smoke-infer: accuracy %.3f on %d eval examples, base model %.3f (%s scoring; greedy answers %.3f; "
             "labels %s)", result.accuracy, len(eval_examples), result.base_accuracy, infer.label_scoring,
             result.greedy_accuracy, prompts.labels)
    return result


def check_usable(result: InferResult) -> None:
    """Raise QualityGateError with the reason when smoke-infer refused the answers (InferResult.unusable)."""
    if result.unusable:
        raise QualityGateError(result.unusable)


def infer_adapter(model: ModelConfig, backend: str, store_uri: str, adapter_key: str, prompts: Prompts,
                  infer: InferSettings) -> InferResult:
    """smoke-infer on the adapter `adapter_key`: the model that trained it in this process, else the base model with
    the adapter from the store. The live model is kept for the next step of this process (promote scores the
    champion on the same base weights, loading the champion as a second adapter)."""
    live = open_trained(model, backend, store_uri, adapter_key)
    result = smoke_infer(live, prompts, infer)
    keep_trained(adapter_key, live)
    return result


def example_labels(live: LiveModel, examples: list[EvalExample], labels: list[str], infer: InferSettings) -> list[str | None]:
    """The label each example counts as for the model as it is now, by infer.label_scoring (the rule smoke-infer
    scores the fine-tuned model by): the likeliest label, or the first line of the greedy answer (None: no label)."""
    texts = [e.prompt for e in examples]
    if infer.label_scoring == "greedy":
        return [answer_label(text, labels) for text, _ in generate(live, texts, infer.max_new_tokens)]
    return likeliest_labels(live, texts, labels)


def score_eval_examples(
    live: LiveModel, examples: list[EvalExample], answers: list[Answer], labels: list[str], infer: InferSettings
) -> InferResult:
    """Both models on the eval examples, by infer.label_scoring; the fine-tuned model's greedy answers too.

    `answers` are all of them, the eval examples' first (then infer.prompts', which are not scored)."""
    expected = [e.answer for e in examples]
    greedy_labels = [answer_label(a.answer, labels) for a in answers[: len(examples)]]
    greedy_scores = score_labels(greedy_labels, expected, labels)
    texts = [e.prompt for e in examples]
    if infer.label_scoring == "greedy":
        base_answers = base_model_answers(live, texts, base_answer_tokens(live, labels, infer))
        base_labels = [answer_label(a, labels) for a in base_answers]
        return InferResult(answers, greedy_scores, score_labels(base_labels, expected, labels), greedy_labels,
                           base_labels, base_answers, greedy_scores)
    chosen = likeliest_labels(live, texts, labels)
    with live.model.disable_adapter():  # PEFT skips the LoRA layers in place
        base_chosen = likeliest_labels(live, texts, labels)
    return InferResult(answers, score_labels(chosen, expected, labels), score_labels(base_chosen, expected, labels),
                       chosen, base_chosen, [], greedy_scores)


def likeliest_labels(live: LiveModel, texts: list[str], labels: list[str]) -> list[str]:
    """Per prompt, the label with the highest log p(label tokens, EOS | prompt)."""
    scores = label_log_likelihoods(live, texts, labels)
    return [max(zip(row, labels))[1] for row in scores]


def label_log_likelihoods(live: LiveModel, texts: list[str], labels: list[str]) -> list[list[float]]:
    """log p(label + EOS | prompt) for every prompt and label, summed over the label's tokens and the EOS.

    The prompt and the label are tokenized apart, as generation sees them (it starts from the prompt's tokens).
    With transformers, each prompt runs once and every label continues from its cached keys and values: on a CPU,
    where the prompt is nearly all of the cost, n labels cost about one pass instead of n. Unsloth's fast
    inference path owns its cache, so there each (prompt, label) pair is one row of its own.
    """
    tokenizer = live.tokenizer
    completions = [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return live.backend.label_log_likelihoods(live, prompts, completions)


def base_answer_tokens(live: LiveModel, labels: list[str], infer: InferSettings) -> int:
    """A base model rarely stops at EOS, and only its answer's first line is scored: it gets the longest label's
    tokens plus a few (for whitespace before and the newline after), not max_new_tokens of rambling."""
    longest = max(len(live.tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    return min(infer.max_new_tokens, longest + BASE_ANSWER_SLACK_TOKENS)


def base_model_answers(live: LiveModel, texts: list[str], max_new_tokens: int) -> list[str]:
    """The same prompts through the base model: PEFT's disable_adapter() skips the LoRA layers in place."""
    with live.model.disable_adapter():
        return [text for text, _ in generate(live, texts, max_new_tokens)]
