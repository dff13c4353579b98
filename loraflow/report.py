"""What a run shows in Prefect: a metrics table artifact, a markdown report with the loss curve and the answers,
and the model line over time (its aliases and the accuracy of the champion and of every challenger, by date).

The run's two are made from its summary (never from config or secrets) on every run, cached or not, whether
smoke-infer's answers were usable and the quality gate passed or not: a refused run still shows its numbers. The
line's are made from the alias history in the store (loraflow/aliases.py).
"""

from __future__ import annotations

import base64
import io
import re
import time
from pathlib import Path
from typing import Any

from loraflow.aliases import LineAliases, read_aliases
from loraflow.promotion import CANDIDATE_ALIAS, Promotion
from loraflow.store import open_store
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


def significant(value: float | None, digits: int = 4) -> float | None:
    """A p-value to `digits` significant figures (rounding 1.8e-12 to 4 places would show 0)."""
    return None if value is None else float(f"{value:.{digits}g}")


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
        {"metric": "smoke-infer", "value": summary.smoke_failure or "answers usable"},
        *promotion_rows(summary.promotion),
    ]


def promotion_rows(promotion: Promotion | None) -> list[dict[str, Any]]:
    """The promote step's decision and numbers as metric rows."""
    if promotion is None:
        return []
    test = promotion.test
    return [
        {"metric": "promotion", "value": f"{promotion.decision}: {promotion.reason}"},
        {"metric": "champion", "value": promotion.champion_key},
        {"metric": "eval accuracy, challenger (promotion)", "value": rounded(promotion.challenger_accuracy)},
        {"metric": "eval accuracy, champion (same examples)", "value": rounded(promotion.champion_accuracy)},
        {"metric": "paired test", "value": test.name if test else None},
        {"metric": "paired test p-value", "value": significant(test.p_value) if test else None},
        {"metric": "discordant pairs (challenger-only right / champion-only right)",
         "value": f"{test.challenger_only} / {test.champion_only} of {test.n}" if test else None},
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
    lines += ["", f"Quality gate: {summary.quality_gate.verdict}.", ""]
    if summary.smoke_failure:
        lines += [f"**Refused: {summary.smoke_failure}** Nothing was pushed or promoted.", ""]
    lines += promotion_markdown(summary.promotion)
    lines += ["## Smoke-infer answers", "",
              "| input | expected | fine-tuned (greedy) | scored as | base model |", "|---|---|---|---|---|"]
    for item in summary.smoke_answers:
        base = item.base_answer if item.base_answer is not None else item.base_label
        lines.append(f"| {cell(item.input or item.instruction)} | {cell(item.expected)} "
                     f"| {cell(item.answer)} | {cell(item.label)} | {cell(base)} |")
    return "\n".join(lines) + "\n"


def promotion_markdown(promotion: Promotion | None) -> list[str]:
    """The promote step in markdown: decision, both scores on the same examples, the paired test, the eval set."""
    if promotion is None:
        return []
    lines = ["## Promotion", "", f"**{promotion.decision}** (line `{promotion.line}`, alias `{promotion.alias}`): "
             f"{cell(promotion.reason)}", ""]
    if promotion.champion_accuracy is not None:
        test = promotion.test
        lines += [
            "| | adapter | eval accuracy |", "|---|---|---|",
            f"| challenger (this run) | `{promotion.challenger_key}` | {cell(promotion.challenger_accuracy)} |",
            f"| champion (`{promotion.alias}`) | `{promotion.champion_key}` | {cell(promotion.champion_accuracy)} |",
            "",
            f"On the same {promotion.eval_examples} examples ({promotion.eval_source}). {test.name}: the challenger "
            f"alone right on {test.challenger_only}, the champion alone on {test.champion_only}, both on "
            f"{test.both_right}, neither on {test.both_wrong}; p = {test.p_value:.4g} (alpha {test.alpha:g}). "
            f"Needed: more than the champion, by at least {promotion.min_improvement:g}"
            f"{', and p < alpha' if promotion.require_significance else ''}.",
            "",
            f"The champion was scored by {promotion.champion_scored_by} in {promotion.champion_seconds:.1f} s.",
        ]
        if promotion.comparison_note:
            lines += ["", f"Note: {promotion.comparison_note}."]
    elif promotion.champion_key is None and promotion.decision != "off":
        lines.append(f"No `{promotion.alias}` adapter yet on this line: the quality gate decides alone.")
    if promotion.aliases_moved:
        lines += ["", f"Aliases moved to this adapter: {', '.join(promotion.aliases_moved)}."]
    return lines + [""]


def slug(name: str) -> str:
    """An artifact key part: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "line"


def when(epoch: float) -> str:
    """Epoch seconds as `YYYY-MM-DD HH:MM` in UTC."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(epoch))


def line_points(record: LineAliases, alias: str) -> list[dict[str, Any]]:
    """One point per scored challenger (the `candidate` history), oldest first: its accuracy, the champion's on the
    same examples (None when there was none), the decision; and the champion after the run (the challenger when
    promoted, else the champion as measured)."""
    points, champion = [], None
    for entry in record.history:
        if entry.alias == alias and entry.decision == "manual":
            champion = entry.scores.get("challenger_accuracy", champion)
        if entry.alias != CANDIDATE_ALIAS:
            continue
        challenger = entry.scores.get("challenger_accuracy")
        measured = entry.scores.get("champion_accuracy")
        champion = challenger if entry.decision == "promoted" else (measured if measured is not None else champion)
        points.append({"at": entry.at, "run": entry.flow_run_id, "adapter": entry.adapter_key,
                       "challenger": challenger, "champion_before": measured, "champion_after": champion,
                       "decision": entry.decision, "p_value": entry.scores.get("p_value")})
    return points


def line_history_png(record: LineAliases, alias: str) -> bytes:
    """Accuracy by run: every challenger (green promoted, red refused) and the champion (a step line)."""
    from matplotlib.figure import Figure

    points = line_points(record, alias)
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    axes = figure.subplots()
    xs = list(range(len(points)))
    champion = [p["champion_after"] for p in points]
    if points:  # the champion after each run, held until the next (and a little past the last)
        axes.step(xs + [xs[-1] + 0.5], champion + champion[-1:], where="post", color="tab:blue", linewidth=1.5,
                  label=f"champion ({alias}) after the run")
    for decision, color in (("promoted", "tab:green"), ("refused", "tab:red")):
        chosen = [(x, p["challenger"]) for x, p in zip(xs, points) if p["decision"] == decision and p["challenger"] is not None]
        if chosen:
            axes.scatter(*zip(*chosen), color=color, zorder=3, label=f"challenger, {decision}")
    for x, p in zip(xs, points):
        if p["challenger"] is not None:
            axes.annotate(f"{p['challenger']:.3f}", (x, p["challenger"]), textcoords="offset points", xytext=(6, -12),
                          fontsize=8)
    axes.set_xticks(xs, [when(p["at"])[5:] for p in points], rotation=30, ha="right", fontsize=8)
    axes.set(ylabel="eval accuracy", title=f"{record.line}: accuracy by run (UTC)", ylim=(0, 1.05))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def line_table(record: LineAliases, alias: str) -> list[dict[str, Any]]:
    """Rows of the line's history by run: date, run, challenger and champion accuracy, p-value, decision."""
    return [{"date (UTC)": when(p["at"]), "flow run": p["run"], "adapter": p["adapter"],
             "challenger accuracy": rounded(p["challenger"]), "champion accuracy": rounded(p["champion_before"]),
             "p-value": significant(p["p_value"]), "decision": p["decision"]} for p in line_points(record, alias)]


def line_markdown(record: LineAliases, alias: str) -> str:
    """The line: where each alias points, the picture, and every move of every alias."""
    lines = [f"# Model line `{record.line}`", "", "| alias | adapter | since (UTC) | by |", "|---|---|---|---|"]
    for name, target in sorted(record.aliases.items()):
        lines.append(f"| {name} | `{target.adapter_key}` | {when(target.at)} | {cell(target.by)} |")
    if any(entry.alias == CANDIDATE_ALIAS for entry in record.history):
        lines += ["", f"![accuracy by run]({inline_png(line_history_png(record, alias))})"]
    lines += ["", "## History", "", "| date (UTC) | alias | adapter | decision | challenger | champion | p | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for entry in reversed(record.history):
        scores = entry.scores
        lines.append(f"| {when(entry.at)} | {entry.alias} | `{entry.adapter_key}` | {cell(entry.decision)} "
                     f"| {cell(rounded(scores.get('challenger_accuracy')))} | {cell(rounded(scores.get('champion_accuracy')))} "
                     f"| {cell(significant(scores.get('p_value')))} | {cell(entry.reason)} |")
    return "\n".join(lines) + "\n"


def publish_line_artifacts(store_uri: str, line: str, alias: str) -> None:
    """The line's table (accuracy by run) and its markdown (aliases, picture, history) as Prefect artifacts keyed
    `line-<line>-history` and `line-<line>`: each run adds a version; nothing when the line has no history yet."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    record = read_aliases(open_store(store_uri), line)
    if not record.history:
        return
    key = f"line-{slug(line)}"
    create_table_artifact(line_table(record, alias), key=f"{key}-history",
                          description=f"loraflow: accuracy of the champion and every challenger of {line}, by run")
    create_markdown_artifact(line_markdown(record, alias), key=key,
                             description=f"loraflow: aliases of {line}, accuracy by run, history of every move")


def publish_run_artifacts(summary: RunSummary, loss_curve: bytes) -> None:
    """The metrics table and the markdown report (the loss curve inline), attached to the current flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(metrics_table(summary), key=METRICS_ARTIFACT_KEY,
                          description=f"loraflow: metrics of the fine-tune of {summary.model}")
    create_markdown_artifact(report_markdown(summary, loss_curve), key=REPORT_ARTIFACT_KEY,
                             description=f"loraflow: loss curve, accuracy and answers of {summary.model}")
    publish_tracker_links(summary.tracker_runs)  # train.report_to: a link to each tracker's run
