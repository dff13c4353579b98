"""What a run shows in Prefect: a metrics table artifact, a markdown report with the loss curve and the answers.

Both are made from the run's summary (never from config or secrets) on every run, cached or not, whether the
quality gate passed or not: a run that the gate stops still shows its numbers.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from loraflow.summary import LOSS_CURVE_FILE, RunSummary, interval_text
from loraflow.tracking import publish_tracker_links

METRICS_ARTIFACT_KEY = "finetune-metrics"
REPORT_ARTIFACT_KEY = "finetune-report"
SCORING_WORDS = {  # infer.label_scoring
    "likelihood": "likelihood: the label (then EOS) each model finds most likely after the prompt",
    "greedy": "greedy answers: the first line of each model's answer must be the label",
}


def loss_curve_png(losses: list[tuple[int, float]], title: str) -> bytes:
    """The training loss per logged step, as a PNG."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot global state

    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    axes = figure.subplots()
    axes.plot([step for step, _ in losses], [loss for _, loss in losses], linewidth=1.2)
    axes.set(xlabel="optimizer step", ylabel="training loss", title=title)
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def metrics_table(summary: RunSummary) -> list[dict[str, Any]]:
    """Rows of metric / value, in the order a reader checks them."""
    peak = summary.peak_memory_bytes
    return [
        {"metric": "train steps", "value": summary.train_steps},
        {"metric": "train loss, first step", "value": rounded(summary.train_loss_first)},
        {"metric": "train loss, last step", "value": rounded(summary.train_loss_last)},
        {"metric": "train tokens/s", "value": round(summary.train_tokens_per_second, 1)},
        {"metric": "peak memory (GiB)", "value": round(peak / 2**30, 3) if peak else None},
        {"metric": "train runtime (s)", "value": round(summary.train_runtime_seconds, 1)},
        {"metric": "GPUs (ranks)", "value": summary.world_size},
        {"metric": "gradient checkpointing", "value": summary.gradient_checkpointing or None},
        {"metric": "submitted → first step (s)", "value": summary.phases.get("first_step")},
        {"metric": "train examples", "value": summary.num_train_examples},
        {"metric": "times each train example was seen", "value": summary.passes_over_data},
        {"metric": "eval examples", "value": summary.num_eval_examples},
        {"metric": "eval examples scored", "value": summary.num_scored_examples},
        {"metric": "eval accuracy, fine-tuned", "value": rounded(summary.eval_accuracy)},
        {"metric": "eval accuracy, fine-tuned, 95% interval", "value": interval_cell(summary.eval_accuracy_ci)},
        {"metric": "eval accuracy, base model", "value": rounded(summary.base_eval_accuracy)},
        {"metric": "eval accuracy, base model, 95% interval", "value": interval_cell(summary.base_eval_accuracy_ci)},
        {"metric": "eval accuracy, greedy answers", "value": rounded(summary.eval_accuracy_greedy)},
        {"metric": "quality gate", "value": summary.quality_gate.verdict},
        {"metric": "notes", "value": len(summary.notes)},
    ]


def interval_cell(interval: tuple[float, float] | None) -> str | None:
    """A 95 % interval as 'low–high' (3 decimals); None where accuracy was not measured."""
    return None if interval is None else interval_text(interval)


def cell(value: Any) -> str:
    """A markdown table cell: no pipes or newlines from model output may break the table."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ⏎ ") or "(empty)"


def inline_png(png: bytes) -> str:
    """A PNG as a data URI: the Prefect UI renders it whatever the store (a browser opens no s3:// or file:// link)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def per_label_table(summary: RunSummary) -> list[str]:
    """Markdown rows: precision and recall per label, fine-tuned and base model (the report and the model card)."""
    lines = ["| label | eval examples | precision | recall | base precision | base recall |",
             "|---|---|---|---|---|---|"]
    base = summary.base_eval_per_label or {}
    for label, scores in (summary.eval_per_label or {}).items():
        lines.append(
            f"| {cell(label)} | {scores['support']} | {cell(scores['precision'])} | {cell(scores['recall'])} "
            f"| {cell(base[label]['precision'])} | {cell(base[label]['recall'])} |"
        )
    return lines


def notes_markdown(summary: RunSummary) -> list[str]:
    """The summary's notes as a markdown list under a heading (the report and the model card); none: no lines."""
    if not summary.notes:
        return []
    return ["**Read the numbers with these in mind:**", "", *[f"- {note}" for note in summary.notes], ""]


def report_markdown(summary: RunSummary, loss_curve: bytes) -> str:
    """The run in markdown: loss curve inline, accuracy of both models, the per-label table, every answer."""
    lines = [
        f"# Fine-tune of `{summary.model}`",
        "",
        f"Backend `{summary.backend}`, dataset `{summary.dataset_uri}`, {summary.num_train_examples} train / "
        f"{summary.num_eval_examples} eval examples, {summary.train_steps} steps (each train example seen "
        f"{summary.passes_over_data:g} times): loss {cell(summary.train_loss_first)} → {cell(summary.train_loss_last)}.",
        "",
        *notes_markdown(summary),
        "## Loss curve",
        "",
        f"![training loss]({inline_png(loss_curve)})",
        "",
        f"PNG in the store: [{summary.loss_curve_uri}]({summary.loss_curve_uri}); in the output folder: "
        f"`{Path(summary.adapter_dir or '.') / LOSS_CURVE_FILE}`.",
        "",
        "## Accuracy on the eval split",
        "",
    ]
    if summary.eval_accuracy is None:
        lines.append("Not measured: the eval outputs do not form a closed label set.")
    else:
        lines += [
            "| | fine-tuned | base model |",
            "|---|---|---|",
            f"| accuracy | {cell(summary.eval_accuracy)} | {cell(summary.base_eval_accuracy)} |",
            f"| 95% interval (Wilson) | {interval_text(summary.eval_accuracy_ci)} | "
            f"{interval_text(summary.base_eval_accuracy_ci)} |",
            f"| examples scored | {summary.num_scored_examples} | {summary.num_scored_examples} |",
            "",
            f"Scored by {SCORING_WORDS[summary.eval_scoring]}. The fine-tuned model's greedy answers alone: "
            f"{cell(summary.eval_accuracy_greedy)}.",
            "",
            *per_label_table(summary),
        ]
    lines += ["", f"Quality gate: {summary.quality_gate.verdict}.", "", "## Smoke-infer answers", "",
              "| input | expected | fine-tuned (greedy) | scored as | base model |", "|---|---|---|---|---|"]
    for item in summary.smoke_answers:
        base = item.base_answer if item.base_answer is not None else item.base_label
        lines.append(f"| {cell(item.input or item.instruction)} | {cell(item.expected)} "
                     f"| {cell(item.answer)} | {cell(item.label)} | {cell(base)} |")
    return "\n".join(lines) + "\n"


def publish_run_artifacts(summary: RunSummary, loss_curve: bytes) -> None:
    """The metrics table and the markdown report (the loss curve inline), attached to the current flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(metrics_table(summary), key=METRICS_ARTIFACT_KEY,
                          description=f"loraflow: metrics of the fine-tune of {summary.model}")
    create_markdown_artifact(report_markdown(summary, loss_curve), key=REPORT_ARTIFACT_KEY,
                             description=f"loraflow: loss curve, accuracy and answers of {summary.model}")
    publish_tracker_links(summary.tracker_runs)  # train.report_to: a link to each tracker's run
