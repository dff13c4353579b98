"""Training: TRL's SFTTrainer over the prompt set; the adapter goes to the store, a reference to it comes back.

Training runs from a `TrainSpec`, one serializable value with everything it needs (model, LoRA and training
settings, the backend, the prompt set's key in the store, the store and the keys to write). In the flow's own
process the live model from attach-LoRA is passed in (no second load); a fresh process runs the same spec with
`python -m loraflow.training <spec.json>`, loading and attaching itself.

Every `train.save_steps` the trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, step), copied
to the store under the spec's checkpoints prefix (loraflow/checkpoints.py). A later attempt with the same spec (a
task retry, a flow retry, a rerun after a crash) resumes from the newest complete one.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.backends import LiveModel, attach_lora, backend_named, keep_trained, load_model
from loraflow.batching import BatchLayout, batch_layout, packing_enabled
from loraflow.builders import build_sft_config
from loraflow.cache_keys import adapter_key, checkpoints_prefix, train_key
from loraflow.checkpoints import checkpoint_sync_callback, fetch_latest_checkpoint, new_attempt_id
from loraflow.config import FinetuneConfig, LoraSettings, ModelConfig, TrainSettings
from loraflow.data import Dataset
from loraflow.errors import TrainingOutOfMemoryError
from loraflow.lineage import ParentAdapter, resolve_init_adapter
from loraflow.logs import run_logger
from loraflow.progress import train_progress_callback
from loraflow.prompts import Prompts, load_prompts, prompts_key
from loraflow.step_clock import StepClock, peak_memory_bytes
from loraflow.store import open_store

METRICS_FILE = "training_metrics.json"  # travels with the adapter, so a run that reuses it can report its numbers


class TrainSpec(BaseModel):
    """Everything one training needs, as plain data: a process started anywhere can execute it."""

    model: ModelConfig
    lora: LoraSettings
    train: TrainSettings
    backend: str  # "unsloth" | "transformers", chosen once by the run
    store_uri: str
    prompts_key: str  # the prompt set in the store (loraflow.prompts.store_prompts)
    adapter_key: str  # where the adapter is published: adapters/<train cache key>
    checkpoints_prefix: str | None = None  # where checkpoints go; None: none stored, none resumed (benchmarks)
    init_adapter: ParentAdapter | None = None  # the adapter LoRA starts from (model.init_adapter); None = fresh


@dataclass
class TrainMetrics:
    """What a training measured; figures are of this machine and run."""

    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per logged step
    runtime_seconds: float = 0.0
    tokens_per_second: float = 0.0  # real (non-pad) tokens over the whole train() call
    peak_memory_bytes: int = 0
    packing: bool = False
    first_step_seconds: float = 0.0  # train() start to the end of step 1: data prep, compilation, warm-up
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    step_tokens: list[int] = field(default_factory=list)  # real (non-pad) tokens of each optimizer step
    resumed_from_step: int = 0  # the stored checkpoint this attempt continued from; 0 = started fresh

    @property
    def steady_tokens_per_second(self) -> float:
        """Real tokens/s once warm: the first steps (compilation, allocator growth) left out."""
        skip = min(3, len(self.step_seconds) // 2)
        seconds = sum(self.step_seconds[skip:])
        return sum(self.step_tokens[skip:]) / seconds if seconds else 0.0

    @property
    def loss_first(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


@dataclass(frozen=True)
class AdapterRef:
    """A published adapter: what train hands to smoke-infer, merge, push and the summary."""

    store_uri: str
    key: str  # adapters/<train cache key>
    uri: str  # where it is: a folder path or s3://...
    digest: str  # of its manifest: changes whenever any of its bytes do
    metrics: TrainMetrics
    reused: bool = False  # True: an earlier run with the same inputs trained it; this run trained nothing
    parent: ParentAdapter | None = None  # the adapter its training started from (lineage); None = fresh


def log_plan(train: TrainSettings, lengths: list[int], layout: BatchLayout, packing: bool) -> None:
    """nanoGPT-style: the derived numbers, before the first step."""
    mean_tokens = sum(lengths) / len(lengths)
    effective_batch = train.per_device_batch_size * train.gradient_accumulation_steps
    # examples per optimizer step = batch × accumulation, packed or not; tokens per step = that × mean length
    rows = (f"{layout.accumulation} padding-free row(s) of {layout.batch_size} examples per step" if packing
            else f"{layout.batch_size} × {layout.accumulation} padded rows of ≤{layout.row_tokens} tokens")
    run_logger().info(
        "train: %d texts (mean %.0f, max %d tokens), effective batch %d examples = %d × %d accumulation, "
        "~%.0f tokens per step, packing %s (%s), max_steps %s, epochs %s, lr %g",
        len(lengths), mean_tokens, max(lengths), effective_batch, train.per_device_batch_size,
        train.gradient_accumulation_steps, effective_batch * mean_tokens, "on" if packing else "off", rows,
        train.max_steps, train.num_epochs, train.learning_rate,
    )


def build_trainer(
    live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, work_dir: Path,
    clock: StepClock | None = None,
) -> Any:
    """TRL's SFTTrainer over the prompt set, laid out by loraflow.batching, with the progress bar and the clock."""
    from datasets import Dataset as HFDataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    packing = packing_enabled(train, live.backend.SUPPORTS_PACKING)
    lengths = [len(ids) for ids in live.tokenizer(prompts.train_texts)["input_ids"]]
    layout = batch_layout(train, model, lengths, packing)
    args = build_sft_config(train, layout, live.device == "cuda", live.dtype, live.backend.loss_type(live), packing,
                            work_dir / "checkpoints")
    log_plan(train, lengths, layout, packing)
    live.backend.prepare_for_training(live, layout.batch_size * min(max(lengths), layout.row_tokens))
    if train.completion_only_loss:  # TRL masks the prompt tokens out of the loss for prompt/completion rows
        rows = {"prompt": prompts.train_prompts, "completion": prompts.train_completions}
    else:  # the notebook's way: loss on every token of the text
        rows = {"text": prompts.train_texts}
    # progress: a Prefect progress artifact and a terminal bar with loss and tokens/s (the clock counts the tokens)
    progress = train_progress_callback((lambda: sum(clock.batch_tokens)) if clock else None)
    trainer = SFTTrainer(
        model=live.model, args=args, train_dataset=HFDataset.from_dict(rows), processing_class=live.tokenizer,
        callbacks=[clock.callback(), progress] if clock else [progress],
    )
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; the printer would add a dict per step
    if clock:
        clock.count_tokens(trainer.data_collator)
    return trainer


def train_adapter(live: LiveModel, prompts: Prompts, spec: TrainSpec) -> AdapterRef:
    """Train LoRA weights on `live`, publish adapter + tokenizer to the store under spec.adapter_key.

    Checkpoints go to the store under spec.checkpoints_prefix as they are written; when one is there already,
    training resumes from the newest (weights, optimizer, scheduler, RNG, data position, loss history).
    Raises TrainingOutOfMemoryError (never retried) when the GPU runs out of memory.
    """
    if live.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    store = open_store(spec.store_uri)
    clock = StepClock(live.device)
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as work:
        trainer = build_trainer(live, prompts, spec.train, spec.model, Path(work), clock)
        resume = None
        if spec.checkpoints_prefix:
            resume = fetch_latest_checkpoint(store, spec.checkpoints_prefix, Path(work) / "resume")
            trainer.add_callback(checkpoint_sync_callback(store, spec.checkpoints_prefix, new_attempt_id(),
                                                          spec.train.save_total_limit))
        resumed_from_step = resume[1] if resume else 0
        if resume:
            run_logger().info("train: resuming from the stored checkpoint at step %d", resumed_from_step)
        clock.start()
        output = train_or_explain_oom(trainer, spec, str(resume[0]) if resume else None)
        runtime = time.perf_counter() - clock.started
        adapter_dir = Path(work) / "adapter"
        live.model.save_pretrained(adapter_dir)
        live.tokenizer.save_pretrained(adapter_dir)
        # After a resume the history holds the checkpoint's steps too: one loss curve, steps 1..N.
        losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
        step_seconds, step_tokens = clock.step_seconds(), clock.step_tokens()
        metrics = TrainMetrics(
            steps=int(output.global_step),
            losses=losses,
            runtime_seconds=runtime,
            tokens_per_second=sum(step_tokens) / runtime if runtime else 0.0,
            peak_memory_bytes=peak_memory_bytes(live.device),
            packing=bool(trainer.args.padding_free),
            first_step_seconds=step_seconds[0] if step_seconds else 0.0,
            step_seconds=step_seconds,
            step_tokens=step_tokens,
            resumed_from_step=resumed_from_step,
        )
        (adapter_dir / METRICS_FILE).write_text(json.dumps(asdict(metrics), indent=1))
        uri = store.put_folder(adapter_dir, spec.adapter_key)
    run_logger().info(
        "train: %d steps%s in %.1f s (first: %.1f s), loss %.4f -> %.4f, %.0f real tokens/s overall, %.0f once warm, "
        "peak memory %.2f GiB; adapter at %s",
        metrics.steps - resumed_from_step, f" ({resumed_from_step + 1}-{metrics.steps})" if resumed_from_step else "",
        runtime, metrics.first_step_seconds, metrics.loss_first, metrics.loss_last,
        metrics.tokens_per_second, metrics.steady_tokens_per_second, metrics.peak_memory_bytes / 2**30, uri,
    )
    keep_trained(spec.adapter_key, live)
    return AdapterRef(spec.store_uri, spec.adapter_key, uri, store.digest(spec.adapter_key), metrics,
                      parent=spec.init_adapter)


def train_or_explain_oom(trainer: Any, spec: TrainSpec, resume_from: str | None) -> Any:
    import torch

    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(
            f"CUDA out of memory at train.per_device_batch_size={spec.train.per_device_batch_size} × "
            f"model.max_seq_length={spec.model.max_seq_length}: lower the batch size (raise gradient_accumulation_steps "
            f"to keep the effective batch) or the sequence length, or turn on lora.gradient_checkpointing. ({exc})"
        ) from None


def published_adapter(spec: TrainSpec) -> AdapterRef | None:
    """The adapter an earlier run published under spec.adapter_key (same inputs, same adapter), or None.

    This is the one place a run decides it has nothing to train."""
    store = open_store(spec.store_uri)
    if not store.has(spec.adapter_key):
        return None
    fields = json.loads(store.read_file(spec.adapter_key, METRICS_FILE))
    fields["losses"] = [tuple(pair) for pair in fields["losses"]]
    return AdapterRef(spec.store_uri, spec.adapter_key, store.uri_of(spec.adapter_key), store.digest(spec.adapter_key),
                      TrainMetrics(**fields), reused=True, parent=spec.init_adapter)


def plan_training(
    cfg: FinetuneConfig, backend: str, dataset: Dataset, eval_dataset: Dataset | None, prompts: Prompts
) -> TrainSpec:
    """The run's TrainSpec: its keys say everything the adapter depends on (loraflow.cache_keys.train_key), the
    adapter it starts from (model.init_adapter, resolved now to a pinned store digest or Hub commit) included."""
    parent = resolve_init_adapter(cfg)
    key = train_key(cfg, dataset.sha256, eval_dataset.sha256 if eval_dataset else None, backend,
                    parent.identity if parent else None)
    return TrainSpec(
        model=cfg.model, lora=cfg.lora, train=cfg.train, backend=backend, store_uri=cfg.output.store,
        prompts_key=prompts_key(prompts), adapter_key=adapter_key(key), checkpoints_prefix=checkpoints_prefix(key),
        init_adapter=parent,
    )


def run_spec(spec: TrainSpec) -> AdapterRef:
    """A whole training from the spec alone: load the base model, attach LoRA, read the prompts, train, publish."""
    store = open_store(spec.store_uri)
    live = attach_lora(load_model(spec.model, spec.backend), spec.lora, spec.model.max_seq_length, spec.train.seed,
                       spec.init_adapter)
    return train_adapter(live, load_prompts(store, spec.prompts_key), spec)


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.training <spec.json>`: run a TrainSpec in this process; prints the AdapterRef as JSON."""
    args = sys.argv[1:] if argv is None else argv
    spec = TrainSpec.model_validate_json(Path(args[0]).read_text())
    backend_named(spec.backend)  # Unsloth, where it is the backend, before anything loads transformers
    adapter = run_spec(spec)
    print(json.dumps(asdict(adapter), default=lambda value: value.model_dump(mode="json")))  # the parent: pydantic
    return 0


if __name__ == "__main__":
    sys.exit(main())
