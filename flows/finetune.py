"""The fine-tuning flow: the Unsloth notebook's cells as eight Prefect tasks, in the notebook's order.

    fetch-dataset -> format-prompts -> load-4bit-model -> attach-LoRA -> train -> smoke-infer -> save-local -> push-hub

With output.save_merged, merge-model runs between save-local and push-hub (the notebook's merged_16bit save).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from loraflow.builders import choose_backend
from loraflow.cache_keys import adapter_key, checkpoints_prefix, train_key
from loraflow.config import FinetuneConfig, build_config, deep_merge, read_config_file
from loraflow.model_card import render_model_card
from loraflow.quality import check_gate_measurable, gate_failures
from loraflow.report import LOSS_CURVE_FILE, link_to, loss_curve_png, publish_run_artifacts
from loraflow.results import result_storage_for
from loraflow.store import open_store
from loraflow.tracking import check_tracking, runs_for_summary
from tasks.attach_lora import attach_lora_task
from tasks.fetch_dataset import fetch_dataset_task
from tasks.format_prompts import format_prompts_task
from tasks.load_model import load_model_task
from tasks.merge_model import merge_model_task
from tasks.push_hub import push_hub_task
from tasks.save_local import save_local_task, write_summary
from tasks.smoke_infer import InferResult, smoke_infer_task
from tasks.train import train_task


def run_cached(task: Any, cached: list[str], *args: Any) -> Any:
    """Run a cacheable task; note its name when Prefect served it from the cache."""
    state = task(*args, return_state=True)
    if state.name == "Cached":
        cached.append(task.name)
    return state.result()


def resolve_config(config: FinetuneConfig | dict[str, Any] | None, config_file: str | None) -> FinetuneConfig:
    """The flow's door: a whole config, or a YAML file with a partial config merged over it; validated once."""
    if isinstance(config, FinetuneConfig) and not config_file:
        return config
    raw = read_config_file(config_file) if config_file else {}
    partial = config.model_dump(mode="json") if isinstance(config, FinetuneConfig) else (config or {})
    return build_config(deep_merge(raw, partial), source=config_file or "config parameter")


@flow(name="finetune")
def finetune(config: FinetuneConfig | dict[str, Any] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Fine-tune a model with LoRA and publish the adapter.

    `config` is a whole FinetuneConfig, or a partial one merged over `config_file` (a YAML file from
    deployments/configs/), so a run can override any key without editing files.
    """
    started = time.time()
    cfg = resolve_config(config, config_file)
    check_tracking(cfg.train)  # trainer_args against SFTConfig, trackers installed: before anything loads
    backend = choose_backend(cfg.model.backend)
    if backend == "unsloth":
        import loraflow.unsloth_backend  # noqa: F401  (Unsloth must load before transformers, TRL and PEFT)

    storage = result_storage_for(cfg.output.store)
    cached: list[str] = []

    fetch = fetch_dataset_task.with_options(result_storage=storage)
    train_data = run_cached(fetch, cached, cfg.data.uri)
    eval_data = run_cached(fetch, cached, cfg.data.eval_uri) if cfg.data.eval_uri else None
    prompts = run_cached(
        format_prompts_task.with_options(result_storage=storage), cached,
        train_data, eval_data, cfg.prompt, cfg.data, cfg.infer, cfg.model.name, cfg.model.revision,
    )
    check_gate_measurable(cfg.hub, prompts.labels)  # a gate on accuracy needs labels: say so before any model loads

    # The adapter's key says everything it depends on. Already published: load no model, train nothing.
    train_cache_key = train_key(cfg, train_data.sha256, eval_data.sha256 if eval_data else None, backend)
    key = adapter_key(train_cache_key)
    published = open_store(cfg.output.store).has(key)
    model = None
    if not published:
        base = load_model_task(cfg.model)
        model = attach_lora_task(base, cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    trained = run_cached(
        train_task.with_options(result_storage=storage, refresh_cache=not published), cached,
        model, prompts, cfg.train, cfg.model, cfg.output.store, key, checkpoints_prefix(train_cache_key),
    )
    if published and "train" not in cached:  # Prefect's record was gone, the adapter was not: still no training
        cached.append("train")
    inferred = run_cached(
        smoke_infer_task.with_options(result_storage=storage), cached,
        model, prompts, cfg.infer, cfg.model, cfg.output.store, key,
    )

    run_id = flow_run.get_id() or "local"
    loss_curve = loss_curve_png(trained.losses, f"{cfg.model.name}: training loss")
    loss_curve_uri = open_store(cfg.output.store).put_bytes(loss_curve, f"summaries/{run_id}/{LOSS_CURVE_FILE}")
    summary: dict[str, Any] = {
        "flow_run_id": run_id,
        "backend": backend,
        "model": cfg.model.name,
        "dataset_uri": cfg.data.uri,
        "dataset_sha256": train_data.sha256,
        "eval_dataset_uri": cfg.data.eval_uri,
        "num_train_examples": len(prompts.train_texts),
        "num_eval_examples": len(prompts.eval_examples),
        "train_steps": trained.steps,
        "resumed_from_step": trained.resumed_from_step,
        "train_loss_first": trained.loss_first,
        "train_loss_last": trained.loss_last,
        "train_losses": trained.losses,
        "train_runtime_seconds": trained.runtime_seconds,
        "train_tokens_per_second": trained.tokens_per_second,
        "packing": trained.packing,
        "peak_memory_bytes": trained.peak_memory_bytes,
        "eval_accuracy": inferred.accuracy,
        "base_eval_accuracy": inferred.base_accuracy,
        "eval_scoring": cfg.infer.label_scoring if inferred.scores else None,
        "eval_accuracy_greedy": inferred.greedy_accuracy,
        "eval_per_label": inferred.scores.as_dict() if inferred.scores else None,
        "base_eval_per_label": inferred.base_scores.as_dict() if inferred.base_scores else None,
        "quality_gate": {
            "min_eval_accuracy": cfg.hub.min_eval_accuracy,
            "require_beat_base": cfg.hub.require_beat_base,
            "failures": gate_failures(cfg.hub, inferred.accuracy, inferred.base_accuracy),
        },
        "labels": prompts.labels,
        "smoke_answers": smoke_answer_rows(inferred),
        "loss_curve_uri": link_to(loss_curve_uri),
        "adapter_uri": trained.adapter_uri,
        "tracker_runs": runs_for_summary(trained.tracker_runs, cfg.output.dir),
        "adapter_dir": None,
        "merged_dir": None,
        "cached_tasks": cached,
        "hub_url": None,
        "duration_seconds": None,
    }
    output_dir = save_local_task(cfg.output.store, key, cfg.output.dir, summary, render_model_card(cfg, summary))
    (Path(output_dir) / LOSS_CURVE_FILE).write_bytes(loss_curve)
    if cfg.output.save_merged:
        summary["merged_dir"] = merge_model_task(cfg.model, cfg.output.store, key, output_dir)
    publish_run_artifacts(summary, output_dir, loss_curve)  # before the push: a run the gate stops still shows its numbers
    hub_url = push_hub_task(output_dir, cfg.hub, inferred.accuracy, inferred.base_accuracy)

    summary.update(adapter_dir=output_dir, hub_url=hub_url, duration_seconds=round(time.time() - started, 2))
    write_summary(Path(output_dir), summary)
    summary["summary_uri"] = publish_summary(cfg.output.store, summary)
    return summary


def smoke_answer_rows(inferred: InferResult) -> list[dict[str, Any]]:
    """One row per answer: the greedy text, and for scored eval examples the label each model counted as."""
    def per_answer(values: list) -> list:  # infer.prompts come after the eval examples and are not scored
        return values + [None] * (len(inferred.answers) - len(values))

    return [
        {"instruction": a.instruction, "input": a.input, "answer": a.answer, "expected": a.expected,
         "label": label, "base_label": base_label, "base_answer": base_answer}
        for a, label, base_label, base_answer in zip(
            inferred.answers, per_answer(inferred.scored_labels), per_answer(inferred.base_scored_labels),
            per_answer(inferred.base_answers))
    ]


def publish_summary(store_uri: str, summary: dict[str, Any]) -> str:
    """The run's summary also goes to the store, one object per flow run, beside the adapters."""
    body = json.dumps(summary, indent=1, ensure_ascii=False).encode()
    return open_store(store_uri).put_bytes(body, f"summaries/{summary['flow_run_id']}.json")
