"""What a run shows: progress while it trains, then a metrics table, a report with the loss curve, and accuracy
against the base model, read back through Prefect's client from one real run of the tiny config."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

import loraflow.progress
from loraflow.report import LOSS_CURVE_FILE, METRICS_ARTIFACT_KEY, REPORT_ARTIFACT_KEY
from loraflow.progress import PROGRESS_ARTIFACT_KEY, UPDATE_EVERY_PERCENT, train_progress_callback
from tests.prefect_reads import PrefectReader

REPO = "loraflow-tests/tiny-adapter"  # tiny_run's
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tiny_run: dict) -> dict:
    """The session's tiny run (tests/conftest.py: the gate on at 0.3, which it passes, and a push), with the
    artifacts Prefect holds for it."""
    with PrefectReader() as prefect:
        artifacts = prefect.artifacts(tiny_run["summary"]["flow_run_id"])
    return {**tiny_run, "artifacts": artifacts}


@pytest.mark.slow
def test_metrics_table_artifact_holds_the_runs_numbers(run: dict) -> None:
    table = run["artifacts"][METRICS_ARTIFACT_KEY]
    assert table.type == "table"
    rows = {row["metric"]: row["value"] for row in json.loads(table.data)}
    summary = run["summary"]
    assert rows["train steps"] == summary["train_steps"] == 120
    assert rows["train loss, first step"] == round(summary["train_loss_first"], 4)
    assert rows["train loss, last step"] == round(summary["train_loss_last"], 4)
    assert rows["train tokens/s"] == round(summary["train_tokens_per_second"], 1) and rows["train tokens/s"] > 0
    assert rows["peak memory (GiB)"] == round(summary["peak_memory_bytes"] / 2**30, 3)
    assert rows["train runtime (s)"] == round(summary["train_runtime_seconds"], 1)
    assert rows["eval accuracy, fine-tuned"] == round(summary["eval_accuracy"], 4)
    assert rows["eval accuracy, base model"] == round(summary["base_eval_accuracy"], 4)
    assert rows["quality gate"] == "passed"


@pytest.mark.slow
def test_report_links_the_loss_curve_and_lists_every_answer(run: dict) -> None:
    report = run["artifacts"][REPORT_ARTIFACT_KEY]
    assert report.type == "markdown"
    summary = run["summary"]
    curve_uri = summary["loss_curve_uri"]
    png = (run["work"] / "out" / LOSS_CURVE_FILE).read_bytes()
    # shown inline (the UI renders a data URI from any store), and linked where it is stored
    inline = re.search(r"!\[training loss\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report.data)
    assert inline and base64.b64decode(inline.group(1)) == png
    assert f"[{curve_uri}]({curve_uri})" in report.data
    stored = Path(urlparse(curve_uri).path)
    assert stored.is_relative_to(run["work"] / "store")  # in the store, next to the run's summary
    assert stored.read_bytes() == png
    assert f"| accuracy | {summary['eval_accuracy']:.3f} | {summary['base_eval_accuracy']:.3f} |" in report.data
    for item in summary["smoke_answers"]:
        assert f"| {item['input']} |" in report.data and f"| {item['answer']} |" in report.data


@pytest.mark.slow
def test_loss_curve_is_a_png_plot(run: dict) -> None:
    from matplotlib.image import imread

    data = (run["work"] / "out" / LOSS_CURVE_FILE).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    pixels = imread(io.BytesIO(data))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # not a blank image


@pytest.mark.slow
def test_progress_artifact_reached_100_percent_during_train(run: dict) -> None:
    progress = run["artifacts"][PROGRESS_ARTIFACT_KEY]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.task_run_id is not None  # made by the train task, while it trained


@pytest.mark.slow
def test_terminal_shows_a_progress_bar_with_loss_and_tokens_per_second(run: dict) -> None:
    stderr = run["result"].stderr
    assert "train: 100%" in stderr and "120/120" in stderr
    assert re.search(r"120/120 \[.*loss=\d+\.\d{4}, tok/s=\d+\]", stderr)
    assert "{'loss'" not in run["result"].stdout + stderr  # the bar replaces transformers' dict per step


@pytest.mark.slow
def test_accuracy_and_per_label_scores_follow_from_the_answers(run: dict) -> None:
    """Recompute accuracy, precision and recall from the labels in summary.json, for both models and greedy."""
    summary = run["summary"]
    assert summary["eval_scoring"] == "likelihood"
    scored = [a for a in summary["smoke_answers"] if a["expected"] is not None]
    assert len(scored) == summary["num_eval_examples"]
    for item in scored:  # likelihood scoring always picks one of the labels
        assert item["label"] in summary["labels"] and item["base_label"] in summary["labels"]
    for model, given, accuracy_key, per_label_key in (
        ("fine-tuned", [a["label"] for a in scored], "eval_accuracy", "eval_per_label"),
        ("base", [a["base_label"] for a in scored], "base_eval_accuracy", "base_eval_per_label"),
        ("greedy", [a["answer"].strip().split("\n")[0].strip() for a in scored], "eval_accuracy_greedy", None),
    ):
        expected = [a["expected"] for a in scored]
        assert summary[accuracy_key] == pytest.approx(sum(g == e for g, e in zip(given, expected)) / len(scored)), model
        per_label = summary[per_label_key] if per_label_key else {}
        for label, scores in per_label.items():
            said = sum(g == label for g in given)
            right = sum(g == e == label for g, e in zip(given, expected))
            assert scores["support"] == expected.count(label)
            assert scores["precision"] == (pytest.approx(right / said) if said else None), (model, label)
            assert scores["recall"] == (pytest.approx(right / expected.count(label)) if expected.count(label) else None)
    assert summary["eval_accuracy"] >= 0.3  # what let the gate pass


@pytest.mark.slow
def test_passing_gate_pushes_the_card_with_both_accuracies_and_the_curve(run: dict) -> None:
    summary = run["summary"]
    assert summary["quality_gate"] == {"min_eval_accuracy": 0.3, "require_beat_base": False, "failures": []}
    assert summary["hub_url"].endswith(REPO)
    files = run["hub"].files[REPO]
    assert files[LOSS_CURVE_FILE] == (run["work"] / "out" / LOSS_CURVE_FILE).read_bytes()
    card = files["README.md"].decode()
    assert f"**{summary['eval_accuracy']:.3f}** fine-tuned, {summary['base_eval_accuracy']:.3f} base model" in card
    assert f'"base_eval_accuracy": {summary["base_eval_accuracy"]}' in card
    assert f"![training loss]({LOSS_CURVE_FILE})" in card


# --- the progress callback on its own -------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps", [7, 20, 60, 120, 1000])
def test_progress_is_reported_at_least_every_5_percent_and_ends_at_100(
    max_steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[float] = []

    class RecordedArtifact:
        def __init__(self, description: str):
            self.percent = 0.0
            reported.append(0.0)

        def update(self, percent: float) -> None:
            self.percent = percent
            reported.append(percent)

    monkeypatch.setattr(loraflow.progress, "in_prefect_run", lambda: True)
    monkeypatch.setattr(loraflow.progress, "ProgressArtifact", RecordedArtifact)
    terminal = io.StringIO()
    tokens = [0]
    callback = train_progress_callback(lambda: tokens[0], file=terminal)
    state = SimpleNamespace(max_steps=max_steps, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, max_steps + 1):
        tokens[0] += 100
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 1.0 / step})
    callback.on_train_end(None, state, None)

    gaps = [b - a for a, b in zip(reported, reported[1:])]
    assert reported[-1] == 100.0
    assert max(gaps) <= max(UPDATE_EVERY_PERCENT, 100.0 / max_steps) + 1e-9
    assert len(reported) <= min(max_steps, 100 / UPDATE_EVERY_PERCENT * 2) + 1  # not an API call per step
    assert f"{max_steps}/{max_steps}" in terminal.getvalue()
    assert re.search(rf"loss={1.0 / max_steps:.4f}, tok/s=\d+", terminal.getvalue())
