"""The fine-tuning flow: the Unsloth notebook's cells as Prefect tasks, in the notebook's order, then promotion.

    find-dataset -> fetch-dataset -> format-prompts -> load-4bit-model -> attach-LoRA -> train -> smoke-infer
      -> promote -> push-hub -> save-local

An adapter already published for the same inputs is reused (no model loads, nothing trains). promote scores the
line's production adapter on the same eval examples and moves the aliases only on evidence; push-hub goes to main
when promoted, else to a candidates/ branch. With output.save_merged, merge-model runs after promote. The output
folder is written last, whole, whether smoke-infer's answers were usable and the quality gate passed or not; such a
run (or one whose push failed) then ends Failed with the reason.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from loraflow.architecture import check_target_modules
from loraflow.backends import choose_backend
from loraflow.batching import check_packing
from loraflow.cache_keys import cache_hits
from loraflow.config import FinetuneConfig, build_config, deep_merge, read_config_file
from loraflow.model_card import render_model_card
from loraflow.outputs import check_output_dir, run_record_uris
from loraflow.quality import check_gate_measurable, raise_for_outcome
from loraflow.report import loss_curve_png, publish_run_artifacts
from loraflow.results import persist_results_in
from loraflow.report import publish_line_artifacts
from loraflow.summary import RunSummary, build_summary, finish
from loraflow.timeline import mark
from loraflow.tracking import check_tracking
from loraflow.training import plan_training, published_adapter
from tasks.attach_lora import attach_lora_task
from tasks.fetch_dataset import fetch_dataset_task
from tasks.find_dataset import find_dataset_task
from tasks.format_prompts import format_prompts_task
from tasks.load_model import load_model_task
from tasks.merge_model import merge_model_task
from tasks.promote import promote_task
from tasks.push_hub import push_hub_task
from tasks.save_local import save_local_task
from tasks.smoke_infer import smoke_infer_task
from tasks.train import train_task
from tasks.train_on_devices import train_on_devices_task


@flow(name="finetune")
def finetune(config: FinetuneConfig | dict[str, Any] | None = None, config_file: str | None = None) -> RunSummary:
    """Fine-tune a model with LoRA and publish the adapter.

    `config` is a whole FinetuneConfig, or a partial one merged over `config_file` (a YAML file from
    deployments/configs/), so a run can override any key without editing files.
    """
    started, run_id = time.time(), flow_run.get_id() or "local"
    mark("flow_started")
    cfg = resolve_config(config, config_file)
    check_tracking(cfg.train)  # trainer_args against SFTConfig, trackers installed: before anything loads
    check_output_dir(cfg.output, cfg.data)  # unwritable, or holding files loraflow did not write: said before anything runs
    backend = choose_backend(cfg.model.backend)  # once per run; Unsloth is imported now, before transformers
    check_packing(cfg.train, backend)
    check_target_modules(cfg.model, cfg.lora)  # from the model's config alone, before any weights load
    with persist_results_in(cfg.output.store):
        source = find_dataset_task(uri=cfg.data.uri)  # data.uri, or the newest file under that folder
        dataset = fetch_dataset_task(uri=source.uri)
        eval_dataset = fetch_dataset_task(uri=cfg.data.eval_uri) if cfg.data.eval_uri else None
        prompts = format_prompts_task(dataset=dataset, eval_dataset=eval_dataset, prompt=cfg.prompt, data=cfg.data,
                                      infer=cfg.infer, model=cfg.model)
        check_gate_measurable(cfg.hub, prompts.labels, prompts.why_no_labels)  # said before any model loads
        spec = plan_training(cfg, backend, dataset, eval_dataset, prompts)
        adapter = published_adapter(spec)  # trained before on the same inputs: load nothing, train nothing
        if adapter is None and spec.world_size > 1:  # one process per GPU: each loads and attaches its own copy
            adapter = train_on_devices_task(spec=spec, prompts=prompts)
        elif adapter is None:
            model = load_model_task(model=cfg.model, backend=backend)
            model = attach_lora_task(model=model, lora=cfg.lora, max_seq_length=cfg.model.max_seq_length,
                                     seed=cfg.train.seed, init_adapter=spec.init_adapter)
            adapter = train_task.with_options(timeout_seconds=cfg.train.timeout_seconds)(
                model=model, prompts=prompts, spec=spec)
            del model  # train kept the live model for smoke-infer and promote; they let it go
        scores = smoke_infer_task.with_options(timeout_seconds=cfg.infer.timeout_seconds)(
            adapter=adapter, prompts=prompts, infer=cfg.infer, model=cfg.model, backend=backend)
        summary = build_summary(cfg, backend, run_id, dataset, prompts, adapter, scores, cache_hits(run_id),
                                run_record_uris(cfg.output.store, run_id))
        promotion = promote_task.with_options(timeout_seconds=cfg.infer.timeout_seconds)(
            summary=summary, adapter=adapter, inferred=scores, prompts=prompts, cfg=cfg, backend=backend)
    merged = merge_model_task(adapter=adapter, model=cfg.model) if cfg.output.save_merged and not scores.unusable else None
    summary = summary.model_copy(update={"promotion": promotion})
    card, curve = render_model_card(summary, cfg.hub), loss_curve_png(summary.train_losses, f"{cfg.model.name}: training loss")
    push = None if summary.quality_gate.failures or summary.smoke_failure else push_hub_task(
        summary=summary, model_card=card, loss_curve=curve, adapter=adapter, merged_key=merged, hub=cfg.hub,
        return_state=True)
    pushed = push.result(raise_on_failure=False) if push and push.is_completed() else {}
    summary = save_local_task(summary=finish(summary, started, **pushed), model_card=card, loss_curve=curve,
                              adapter=adapter, merged_key=merged, output_dir=cfg.output.dir,
                              overwrite=cfg.output.overwrite)
    publish_run_artifacts(summary, curve)
    publish_line_artifacts(cfg.output.store, cfg.line, cfg.promote.alias)  # the line over time, from the alias history
    raise_for_outcome(summary, cfg.hub, push)  # smoke-infer, the gate or the push failed: the run fails, all saved
    return summary


def resolve_config(config: FinetuneConfig | dict[str, Any] | None, config_file: str | None) -> FinetuneConfig:
    """The flow's door: a whole config, or a YAML file with a partial config merged over it; validated once."""
    if isinstance(config, FinetuneConfig) and not config_file:
        return config
    raw = read_config_file(config_file) if config_file else {}
    partial = config.model_dump(mode="json") if isinstance(config, FinetuneConfig) else (config or {})
    return build_config(deep_merge(raw, partial), source=config_file or "config parameter")
