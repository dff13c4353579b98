"""The run summary: one typed record of a run, built from the step results.

summary.json, the summary in the store, the Prefect artifacts (loraflow/report.py), the model card
(loraflow/model_card.py) and the CLI's output all render from it. It holds no secrets: it is made from the
config (which has none) and the step results.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel

from loraflow.batching import memorisation_note, passes_over_data
from loraflow.config import FinetuneConfig
from loraflow.data import Dataset
from loraflow.inference import InferResult
from loraflow.prompts import Prompts
from loraflow.quality import FEW_SCORED, accuracy_interval, gate_failures
from loraflow.timeline import mark, phases
from loraflow.tracking import runs_for_summary
from loraflow.promotion import Promotion
from loraflow.training import AdapterRef

LOSS_CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.json"


class QualityGate(BaseModel):
    min_eval_accuracy: float | None
    require_beat_base: bool
    failures: list[str]  # each way the adapter falls short, with its numbers; empty = passed (or off)

    @property
    def on(self) -> bool:
        return self.min_eval_accuracy is not None or self.require_beat_base

    @property
    def verdict(self) -> str:
        """"off", "passed" or "failed: <reasons>"."""
        if not self.on:
            return "off"
        return "failed: " + "; ".join(self.failures) if self.failures else "passed"


class SmokeAnswer(BaseModel):
    """One answer of smoke-infer: the greedy text, and for a scored eval example the label each model counted as."""

    instruction: str
    input: str
    answer: str
    expected: str | None
    label: str | None = None
    base_label: str | None = None
    base_answer: str | None = None  # the base model's greedy answer (greedy scoring only)


class RunSummary(BaseModel):
    """What a run did and measured. Accuracies are fractions of the scored eval examples (0..1); each comes with
    its 95 % Wilson interval (low, high), None where not measured."""

    flow_run_id: str
    run_url: str | None = None  # the flow run in the Prefect UI
    line: str | None = None  # the model line whose aliases the run reads and moves (promote.line)
    backend: str
    model: str
    model_revision: str | None
    prompt_template: str
    lora: dict[str, Any]  # the lora section as configured
    train_settings: dict[str, Any]  # the train section as configured
    dataset_uri: str  # the exact object read (the newest file, when data.uri names a folder)
    dataset_source: str | None = None  # data.uri as configured
    dataset_sha256: str  # of the bytes read
    dataset_etag: str | None = None  # the S3 object's ETag, from the same GET
    eval_dataset_uri: str | None
    parent_adapter: dict[str, Any] | None = None  # model.init_adapter resolved: store key + digest, or Hub commit
    num_train_examples: int  # the examples trained on (too-long ones left out)
    num_eval_examples: int  # held-out examples: eval rows, copies of training rows removed
    train_steps: int
    resumed_from_step: int
    train_loss_first: float | None
    train_loss_last: float | None
    train_losses: list[tuple[int, float]]  # (optimizer step, loss) per logged step
    train_runtime_seconds: float
    train_tokens_per_second: float  # real (non-pad) tokens / s over train()
    packing: bool
    peak_memory_bytes: int  # on a GPU: the peak allocation of rank 0's GPU
    world_size: int = 1  # ranks (GPUs) that trained the adapter
    gradient_checkpointing: str = ""  # on or off, and the numbers that decided it (loraflow/memory.py)
    phases: dict[str, float] = {}  # seconds from submission to the end of each phase (loraflow/timeline.py)
    train_layout: str = ""  # how each optimizer step was split: examples × micro-batches × ranks
    eval_accuracy: float | None
    base_eval_accuracy: float | None
    eval_scoring: str | None  # infer.label_scoring, when accuracy was measured
    eval_accuracy_greedy: float | None
    eval_per_label: dict[str, dict[str, float | int | None]] | None  # label -> precision, recall, support
    base_eval_per_label: dict[str, dict[str, float | int | None]] | None
    quality_gate: QualityGate
    smoke_failure: str | None = None  # smoke-infer refused the answers (empty, or no EOS): the run fails, saved
    promotion: Promotion | None = None  # the promote step's decision, scores and paired test
    labels: list[str] | None
    smoke_answers: list[SmokeAnswer]
    loss_curve_uri: str
    adapter_uri: str
    tracker_runs: list[dict[str, str | None]] = []  # train.report_to: each tracker's run id and URL (redacted)
    summary_uri: str
    adapter_dir: str | None = None  # the output folder, once save-local has written it
    merged_dir: str | None = None
    cached_tasks: list[str]
    hub_url: str | None = None
    hub_revision: str | None = None  # the branch pushed to: main (promoted) or candidates/<flow run id>
    hub_tag: str | None = None  # run-<flow run id>, on main
    duration_seconds: float | None = None
    num_scored_examples: int = 0  # eval examples scored for accuracy (at most infer.max_eval_examples); 0: none
    eval_accuracy_ci: tuple[float, float] | None = None
    base_eval_accuracy_ci: tuple[float, float] | None = None
    eval_accuracy_greedy_ci: tuple[float, float] | None = None
    num_eval_duplicates_removed: int = 0  # eval rows identical to a training row, not scored
    num_train_examples_too_long: int = 0  # longer than model.max_seq_length: left out of training
    passes_over_data: float = 0.0  # times each training example was seen: steps × batch × accumulation / examples
    notes: list[str] = []  # what the numbers do not say on their own, one sentence each

    @property
    def accuracy_line(self) -> str | None:
        """Accuracy of both models with their intervals and the scored count, in one line (CLI, card); None when
        not measured."""
        if self.eval_accuracy is None:
            return None
        scored = (f"{self.num_scored_examples} of {self.num_eval_examples} held-out examples (infer.max_eval_examples)"
                  if self.num_scored_examples < self.num_eval_examples else f"{self.num_scored_examples} held-out examples")
        return (f"{self.eval_accuracy:.3f} (95% CI {interval_text(self.eval_accuracy_ci)}) on {scored} "
                f"(base model: {self.base_eval_accuracy:.3f}, 95% CI "
                f"{interval_text(self.base_eval_accuracy_ci)}; {self.eval_scoring} scoring; greedy answers: "
                f"{self.eval_accuracy_greedy:.3f})")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n"


def interval_text(interval: tuple[float, float] | None) -> str:
    return "–" if interval is None else f"{interval[0]:.3f}–{interval[1]:.3f}"


def run_notes(cfg: FinetuneConfig, prompts: Prompts, steps: int, scored: int, accuracy: float | None) -> list[str]:
    """What a reader must know beside the numbers: the data's notes (rows left out or removed, no label set), each
    example seen so often that it is memorised, and an accuracy on too few examples to mean much."""
    notes = list(prompts.notes)
    memorised = memorisation_note(cfg.train, len(prompts.train_prompts), steps)
    if memorised:
        notes.append(memorised)
    if accuracy is not None and scored < FEW_SCORED:
        low, high = accuracy_interval(accuracy, scored)
        notes.append(
            f"accuracy on {scored} scored examples is a rough guide: the fine-tuned model's {accuracy:.3f} could be "
            f"anything from {low:.3f} to {high:.3f} (95% interval); score at least {FEW_SCORED} (more eval rows, "
            "data.eval_uri, or infer.max_eval_examples) before comparing models"
        )
    return notes


def smoke_answer_rows(inferred: InferResult) -> list[SmokeAnswer]:
    """One row per answer; infer.prompts come after the eval examples and are not scored."""
    def per_answer(values: list) -> list:
        return values + [None] * (len(inferred.answers) - len(values))

    return [
        SmokeAnswer(instruction=a.instruction, input=a.input, answer=a.answer, expected=a.expected, label=label,
                    base_label=base_label, base_answer=base_answer)
        for a, label, base_label, base_answer in zip(
            inferred.answers, per_answer(inferred.scored_labels), per_answer(inferred.base_scored_labels),
            per_answer(inferred.base_answers))
    ]


def link_to(uri: str) -> str:
    """A store URI as a link: s3:// stays as it is, a local path becomes file://."""
    from pathlib import Path

    return uri if "://" in uri else Path(uri).resolve().as_uri()


def flow_run_url() -> str | None:
    """The current flow run in the Prefect UI (PREFECT_UI_URL, else derived from the API URL), the link the server's
    automations render too (`.../runs/flow-run/<id>`); None outside a run or when no UI URL is known."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    run_id = flow_run.get_id()
    return url_for("flow-run", obj_id=run_id) if run_id else None


def build_summary(
    cfg: FinetuneConfig, backend: str, run_id: str, dataset: Dataset, prompts: Prompts, adapter: AdapterRef,
    inferred: InferResult, cached_tasks: list[str], store_uris: dict[str, str],
) -> RunSummary:
    """The summary of a run before its output is written; `store_uris` gives the loss curve's and the summary's
    places in the store (loraflow.outputs.run_record_uris). The promotion is added once promote has decided."""
    metrics = adapter.metrics
    scored = len(inferred.scored_labels) if inferred.scores else 0
    return RunSummary(
        flow_run_id=run_id,
        run_url=flow_run_url(),
        line=cfg.line,
        backend=backend,
        model=cfg.model.name,
        model_revision=cfg.model.revision,
        prompt_template=cfg.prompt.template,
        lora=cfg.lora.model_dump(mode="json"),
        train_settings=cfg.train.model_dump(mode="json"),
        dataset_uri=dataset.uri,
        dataset_source=cfg.data.uri,
        dataset_sha256=dataset.sha256,
        dataset_etag=dataset.etag,
        eval_dataset_uri=cfg.data.eval_uri,
        parent_adapter=adapter.parent.model_dump(mode="json") if adapter.parent else None,
        num_train_examples=len(prompts.train_prompts),
        num_eval_examples=len(prompts.eval_examples),
        train_steps=metrics.steps,
        resumed_from_step=metrics.resumed_from_step,
        train_loss_first=metrics.loss_first,
        train_loss_last=metrics.loss_last,
        train_losses=metrics.losses,
        train_runtime_seconds=metrics.runtime_seconds,
        train_tokens_per_second=metrics.tokens_per_second,
        packing=metrics.packing,
        peak_memory_bytes=metrics.peak_memory_bytes,
        world_size=metrics.world_size,
        gradient_checkpointing=metrics.gradient_checkpointing,
        phases=run_phases(run_id, adapter),
        train_layout=metrics.layout,
        eval_accuracy=inferred.accuracy,
        base_eval_accuracy=inferred.base_accuracy,
        eval_scoring=cfg.infer.label_scoring if inferred.scores else None,
        eval_accuracy_greedy=inferred.greedy_accuracy,
        eval_per_label=inferred.scores.as_dict() if inferred.scores else None,
        base_eval_per_label=inferred.base_scores.as_dict() if inferred.base_scores else None,
        quality_gate=QualityGate(
            min_eval_accuracy=cfg.hub.min_eval_accuracy,
            require_beat_base=cfg.hub.require_beat_base,
            failures=[] if inferred.unusable else gate_failures(cfg.hub, inferred.accuracy, inferred.base_accuracy),
        ),
        smoke_failure=inferred.unusable,
        labels=prompts.labels,
        smoke_answers=smoke_answer_rows(inferred),
        loss_curve_uri=link_to(store_uris["loss_curve"]),
        adapter_uri=adapter.uri,
        tracker_runs=runs_for_summary(metrics.tracker_runs, cfg.output.dir),
        summary_uri=store_uris["summary"],
        cached_tasks=cached_tasks + (["train"] if adapter.reused else []),
        num_scored_examples=scored,
        eval_accuracy_ci=accuracy_interval(inferred.accuracy, scored),
        base_eval_accuracy_ci=accuracy_interval(inferred.base_accuracy, scored),
        eval_accuracy_greedy_ci=accuracy_interval(inferred.greedy_accuracy, scored),
        num_eval_duplicates_removed=prompts.num_eval_copies,
        num_train_examples_too_long=prompts.num_too_long,
        passes_over_data=round(passes_over_data(cfg.train, len(prompts.train_prompts), metrics.steps), 2),
        notes=run_notes(cfg, prompts, metrics.steps, scored, inferred.accuracy),
    )


def run_phases(run_id: str, adapter: AdapterRef) -> dict[str, float]:
    """The run's phase timings; the first training step and the end of training when this run trained."""
    metrics = adapter.metrics
    if not adapter.reused and metrics.started_at:
        mark("first_step", metrics.started_at + metrics.first_step_seconds)
        mark("trained", metrics.started_at + metrics.runtime_seconds)
    mark("scored")
    return phases(run_id)


def finish(summary: RunSummary, started: float, **changes: Any) -> RunSummary:
    """The summary with the last facts of the run (hub_url, the output folder, ...) and its duration in seconds."""
    return summary.model_copy(update={**changes, "duration_seconds": round(time.time() - started, 2)})

