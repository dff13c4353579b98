"""How good is the adapter: accuracy and per-label precision/recall on a closed label set, and the gate before push.

Scores are computed from the label each eval example counted as (tasks/smoke_infer.py decides that: the
likeliest label, or the label a greedy answer gives). A greedy answer gives label L when its first line,
stripped, is exactly L: the fine-tuned model stops at EOS after the label; a base model that was never taught
to stop may go on after a newline, and the first-line rule reads both the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loraflow.config import HubSettings
from loraflow.errors import ConfigError, QualityGateError


WILSON_Z = 1.96  # the standard normal quantile of a two-sided 95 % interval
FEW_SCORED = 30  # fewer scored examples than this: the interval is wide, and the CLI, card and report say so


def wilson_interval(successes: int, total: int, z: float = WILSON_Z) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (E. B. Wilson, "Probable inference, the law of succession, and
    statistical inference", JASA 22 (1927) 209-212): with p = successes / total and n = total,

        centre = (p + z² / 2n) / (1 + z² / n)
        half   = z / (1 + z² / n) × sqrt(p (1 - p) / n + z² / 4n²)

    and (centre - half, centre + half), clipped to 0..1 against rounding. Unlike p ± z·sqrt(p(1-p)/n) it stays
    inside 0..1 and is not zero-width at 0 of n or n of n (2 of 2 right: 0.34..1.0). Returns None for total 0.
    Raises ValueError unless 0 <= successes <= total.
    """
    if not 0 <= successes <= total:
        raise ValueError(f"wilson_interval: successes {successes} not within 0..{total}")
    if total == 0:
        return None
    p, n = successes / total, total
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_interval(accuracy: float | None, scored: int) -> tuple[float, float] | None:
    """The 95 % Wilson interval of an accuracy measured on `scored` examples (accuracy = right / scored)."""
    if accuracy is None or scored == 0:
        return None
    return wilson_interval(round(accuracy * scored), scored)


@dataclass(frozen=True)
class LabelScore:
    support: int  # eval examples whose expected answer is this label
    predicted: int  # answers that gave this label
    correct: int  # answers that gave this label where it was expected

    @property
    def precision(self) -> float | None:  # None: the model never gave this label
        return self.correct / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:  # None: no eval example has this label
        return self.correct / self.support if self.support else None


@dataclass(frozen=True)
class EvalScores:
    accuracy: float
    per_label: dict[str, LabelScore]

    def as_dict(self) -> dict[str, dict[str, float | int | None]]:
        return {
            label: {"precision": s.precision, "recall": s.recall, "support": s.support}
            for label, s in self.per_label.items()
        }


def answer_label(answer: str, labels: list[str]) -> str | None:
    """The label an answer gives, by the first-line rule; None when it gives none."""
    first_line = answer.strip().split("\n", 1)[0].strip()
    return first_line if first_line in labels else None


def score_answers(answers: list[str], expected: list[str], labels: list[str]) -> EvalScores:
    """Free-text answers, each read by the first-line rule, then scored."""
    return score_labels([answer_label(a, labels) for a in answers], expected, labels)


def score_labels(given: list[str | None], expected: list[str], labels: list[str]) -> EvalScores:
    """Accuracy = right labels / all; per label, precision = right / gave L, recall = right / expected L."""
    per_label = {
        label: LabelScore(
            support=sum(e == label for e in expected),
            predicted=sum(g == label for g in given),
            correct=sum(g == e == label for g, e in zip(given, expected)),
        )
        for label in labels
    }
    accuracy = sum(g == e for g, e in zip(given, expected)) / len(expected) if expected else 0.0
    return EvalScores(accuracy, per_label)


def check_gate_measurable(hub: HubSettings, labels: list[str] | None, why_not: str | None = None) -> None:
    """Before any model loads: a gate on accuracy needs eval outputs that form a closed label set.

    `why_not` is what keeps them from forming one (loraflow.prompts.why_no_label_set), said in the error.
    Raises ConfigError when a gate is on and there is no label set."""
    if hub.gate_on and labels is None:
        reason = f" ({why_not})" if why_not else ""
        raise ConfigError(
            f"hub.min_eval_accuracy / hub.require_beat_base need eval accuracy, and these eval outputs are not a "
            f"closed label set{reason}; a label set has 2 to 20 distinct training outputs, each at least twice, "
            "and every eval output among them: turn the gate off or use labelled data"
        )


def gate_failures(hub: HubSettings, accuracy: float | None, base_accuracy: float | None) -> list[str]:
    """Each way the adapter falls short of the hub.* gate, with its numbers; empty when it passes or is off."""
    failures = []
    if hub.min_eval_accuracy is not None:
        if accuracy is None:
            failures.append(f"eval accuracy was not measured (hub.min_eval_accuracy {hub.min_eval_accuracy:.4g})")
        elif accuracy < hub.min_eval_accuracy:
            failures.append(f"eval accuracy {accuracy:.4g} < hub.min_eval_accuracy {hub.min_eval_accuracy:.4g}")
    if hub.require_beat_base:
        if accuracy is None or base_accuracy is None:
            failures.append("eval accuracy against the base model was not measured (hub.require_beat_base)")
        elif accuracy <= base_accuracy:
            failures.append(
                f"eval accuracy {accuracy:.4g} does not beat the base model's {base_accuracy:.4g} (hub.require_beat_base)"
            )
    return failures


def check_quality_gate(hub: HubSettings, accuracy: float | None, base_accuracy: float | None, output_dir: str) -> None:
    """Raise QualityGateError, naming the numbers, when the adapter must not be pushed."""
    failures = gate_failures(hub, accuracy, base_accuracy)
    if failures:
        target = hub.repo_id or "the Hub"
        raise QualityGateError(
            f"quality gate failed: {'; '.join(failures)}. Nothing was pushed to {target}; "
            f"the adapter is saved in {output_dir}"
        )


def raise_for_outcome(summary: Any, hub: HubSettings, push: Any) -> None:
    """The end of a run whose output is saved: raise QualityGateError when smoke-infer refused the answers or the
    gate failed, or the push's own error when push-hub failed (after its retries); `push` is its Prefect state,
    None when it did not run."""
    if summary.smoke_failure:
        raise QualityGateError(f"{summary.smoke_failure} Nothing was pushed or promoted; the answers are in "
                               f"{summary.adapter_dir}/summary.json")
    check_quality_gate(hub, summary.eval_accuracy, summary.base_eval_accuracy, summary.adapter_dir)
    if push is not None and not push.is_completed():
        push.result()  # raises what the push raised
