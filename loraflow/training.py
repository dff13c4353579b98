"""Training: TRL's SFTTrainer over the prompt set; the adapter goes to the store, a reference to it comes back.

Training runs from a `TrainSpec`, one serializable value with everything it needs (model, LoRA and training
settings, the backend, the prompt set's key in the store, the store and the keys to write). In the flow's own
process the live model from attach-LoRA is passed in (no second load); a fresh process runs the same spec with
`python -m loraflow.training <spec.json>`, loading and attaching itself.

Every `train.save_steps` the trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, step), copied
to the store under the spec's checkpoints prefix (loraflow/checkpoints.py); the one of the last step holds the
adapter and the step only. A later attempt with the same spec (a task retry, a flow retry, a rerun after a crash)
resumes from the newest complete one, or takes the last one as the finished training.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.backends import LiveModel, attach_lora, backend_named, keep_trained, load_model, resolve_world_size
from loraflow.batching import BatchLayout, batch_layout, memorisation_note, packing_enabled
from loraflow.builders import build_sft_config
from loraflow.cache_keys import adapter_key, checkpoints_prefix, train_key
from loraflow.checkpoints import (
    checkpoint_sync_callback, fetch_latest_checkpoint, final_checkpoint_may_be_model_only, final_checkpoint_model_only,
    finished_training, load_finished_training, new_attempt_id,
)
from loraflow.compile_cache import (
    COMPILE_CACHE_PREFIX, compile_cache_tag, publish_compile_cache, restore_compile_cache,
)
from loraflow.config import FinetuneConfig, LoraSettings, ModelConfig, TrainSettings
from loraflow.data import Dataset
from loraflow.errors import TrainingOutOfMemoryError
from loraflow.lineage import ParentAdapter, resolve_init_adapter
from loraflow.logs import run_logger
from loraflow.processes import end_with_parent
from loraflow.progress import train_progress_callback
from loraflow.prompts import Prompts, load_prompts, prompts_key
from loraflow.step_clock import StepClock, peak_memory_bytes
from loraflow.store import open_store
from loraflow.tracking import attach_trackers, flow_run_name, tracked_runs

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
    world_size: int = 1  # ranks (one process per GPU) that share each step; > 1: launched by loraflow.launcher
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
    setup_seconds: float = 0.0  # train() start to the trainer's loop beginning (optimizer, data loader), in step 1
    finish_seconds: float = 0.0  # the last step's end to train()'s return: the final checkpoint
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    step_tokens: list[int] = field(default_factory=list)  # real (non-pad) tokens of each optimizer step
    resumed_from_step: int = 0  # the stored checkpoint this attempt continued from; 0 = started fresh
    world_size: int = 1  # ranks that trained it
    layout: str = ""  # how each step was split: examples × micro-batches × ranks (loraflow.batching.BatchLayout)
    gradient_checkpointing: str = ""  # on or off, and why (loraflow/memory.py)
    started_at: float = 0.0  # epoch seconds when train() began (first step at started_at + first_step_seconds)
    tracker_runs: list[dict[str, str | None]] = field(default_factory=list)  # train.report_to's runs (loraflow.tracking)

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

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "AdapterRef":
        """The inverse of dataclasses.asdict (JSON from a training process)."""
        metrics = dict(fields["metrics"])
        metrics["losses"] = [tuple(pair) for pair in metrics["losses"]]
        parent = ParentAdapter.model_validate(fields["parent"]) if fields.get("parent") else None
        return cls(**{**fields, "metrics": TrainMetrics(**metrics), "parent": parent})


def log_plan(train: TrainSettings, lengths: list[int], layout: BatchLayout, packing: bool) -> None:
    """nanoGPT-style: the derived numbers, before the first step."""
    mean_tokens = sum(lengths) / len(lengths)
    effective_batch = train.per_device_batch_size * train.gradient_accumulation_steps
    # examples per optimizer step = batch × accumulation, packed or not, on any number of ranks;
    # tokens per step = that × mean length
    rows = (f"padding-free rows of {layout.batch_size} examples" if packing
            else f"padded rows of ≤{layout.row_tokens} tokens")
    run_logger().info(
        "train: %d texts (mean %.0f, max %d tokens), effective batch %d examples = %d × %d accumulation "
        "(per step: %s; %s), ~%.0f tokens per step, packing %s, max_steps %s, epochs %s, lr %g",
        len(lengths), mean_tokens, max(lengths), effective_batch, train.per_device_batch_size,
        train.gradient_accumulation_steps, layout.describe(), rows, effective_batch * mean_tokens,
        "on" if packing else "off", train.max_steps, train.num_epochs, train.learning_rate,
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
    layout = batch_layout(train, model, lengths, packing, current_world_size())
    loss_type = live.backend.loss_type(live, train.completion_only_loss)
    args = build_sft_config(train, layout, live.device == "cuda", live.dtype, loss_type, packing,
                            work_dir / "checkpoints", run_name=flow_run_name())
    log_plan(train, lengths, layout, packing)
    live.checkpointing_decision = live.backend.prepare_for_training(
        live, layout.batch_size * min(max(lengths), layout.row_tokens))
    if train.completion_only_loss:  # TRL masks the prompt tokens out of the loss for prompt/completion rows
        rows = {"prompt": prompts.train_prompts, "completion": prompts.train_completions}
    else:  # the notebook's way: loss on every token of the text
        rows = {"text": prompts.train_texts}
    # progress: a Prefect progress artifact and a terminal bar with loss and tokens/s (the clock counts the tokens)
    progress = train_progress_callback((lambda: sum(clock.batch_tokens)) if clock else None)
    trainer = SFTTrainer(
        model=live.model, args=args, train_dataset=HFDataset.from_dict(rows), processing_class=live.tokenizer,
        callbacks=[*([clock.callback()] if clock else []), progress,
                   *([final_checkpoint_model_only()] if final_checkpoint_may_be_model_only(train) else [])],
    )
    trainer.remove_callback(PrinterCallback)  # our bar shows the loss; the printer would add a dict per step
    if clock:
        clock.count_tokens(trainer.data_collator)
    attach_trackers(trainer, train.report_to, work_dir / "adapter")  # TensorBoard's events go out with the adapter
    return trainer


def train_adapter(live: LiveModel, prompts: Prompts, spec: TrainSpec) -> AdapterRef | None:
    """Train LoRA weights on `live`, publish adapter + tokenizer to the store under spec.adapter_key.

    Checkpoints go to the store under spec.checkpoints_prefix as they are written; when one is there already,
    training resumes from the newest (weights, optimizer, scheduler, RNG, data position, loss history).
    In a launch of several ranks every rank trains and rank 0 alone publishes: the others return None.
    When lora.gradient_checkpointing auto turned checkpointing off and the GPU runs out of memory anyway (another
    process took memory, a longer row than measured), training starts again with it on, from the LoRA weights it
    began with (or the newest checkpoint), once. Raises TrainingOutOfMemoryError (never retried) otherwise.
    """
    first_try = lora_weights(live) if live.device == "cuda" and live.gradient_checkpointing == "auto" else None
    try:
        return train_once(live, prompts, spec)
    except TrainingOutOfMemoryError as exc:
        if first_try is None or not live.checkpointing_decision.startswith("off") or current_world_size() > 1:
            raise
        run_logger().warning("train: out of memory with gradient checkpointing off (%s); training again with it on",
                             str(exc).split("(", 1)[0].strip())
    import torch

    restore_lora_weights(live, first_try)
    gc.collect()  # the failed attempt's activations and optimizer state, held in reference cycles
    torch.cuda.empty_cache()
    live.backend.force_gradient_checkpointing(live)
    retry = replace(live, gradient_checkpointing="unsloth")
    adapter = train_once(retry, prompts, spec)
    if adapter is not None:
        adapter.metrics.gradient_checkpointing = "on after an out-of-memory with it off: " + live.checkpointing_decision
    return adapter


def lora_weights(live: LiveModel) -> dict[str, Any]:
    """A CPU copy of the trainable (LoRA) weights: r16 on the seven projections of an 8B is ~170 MB."""
    return {name: p.detach().to("cpu", copy=True) for name, p in live.model.named_parameters() if p.requires_grad}


def restore_lora_weights(live: LiveModel, weights: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in live.model.named_parameters():
            if name in weights:
                parameter.copy_(weights[name])


def train_once(live: LiveModel, prompts: Prompts, spec: TrainSpec) -> AdapterRef | None:
    """One train() over the spec, resuming from the newest stored checkpoint; see train_adapter."""
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
        share_compile_cache(store, live, spec, restore_compile_cache, "restored from")
        clock.start()
        started_at = time.time()
        if resume and finished_training(resume[0]):  # e.g. the adapter's publish failed after the last checkpoint
            output = load_finished_training(trainer, live.model, resume[0])
        else:
            try:
                with objects_alive_now_left_out_of_gc():
                    output = train_or_explain_oom(trainer, spec, str(resume[0]) if resume else None)
            finally:  # also when training fails: a task retry in this process trains beside what is left
                release_optimizer_state(trainer)
        ended = time.perf_counter()
        runtime = ended - clock.started
        # After a resume the history holds the checkpoint's steps too: one loss curve, steps 1..N.
        losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
        step_seconds, step_tokens = clock.step_seconds(), summed_over_ranks(clock.step_tokens())
        if not trainer.is_world_process_zero():
            return None  # rank 0 alone publishes
        adapter_dir = Path(work) / "adapter"
        live.model.save_pretrained(adapter_dir)
        live.tokenizer.save_pretrained(adapter_dir)
        metrics = TrainMetrics(
            steps=int(output.global_step),
            losses=losses,
            runtime_seconds=runtime,
            tokens_per_second=sum(step_tokens) / runtime if runtime else 0.0,
            peak_memory_bytes=peak_memory_bytes(live.device),
            packing=bool(trainer.args.padding_free),
            first_step_seconds=step_seconds[0] if step_seconds else 0.0,
            setup_seconds=clock.setup_seconds(),
            finish_seconds=clock.finish_seconds(ended),
            step_seconds=step_seconds,
            step_tokens=step_tokens,
            resumed_from_step=resumed_from_step,
            world_size=current_world_size(),
            layout=trainer_layout(trainer),
            gradient_checkpointing=live.checkpointing_decision,
            started_at=started_at,
            tracker_runs=tracked_runs(trainer),
        )
        (adapter_dir / METRICS_FILE).write_text(json.dumps(asdict(metrics), indent=1))
        uri = store.put_folder(adapter_dir, spec.adapter_key)
    share_compile_cache(store, live, spec, publish_compile_cache, "published to")
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


def share_compile_cache(store: Any, live: LiveModel, spec: TrainSpec, action: Any, done: str) -> None:
    """Restore (before the first step) or publish (after training) Unsloth's and Inductor's/Triton's compile cache
    through the store, on CUDA with backend unsloth (loraflow/compile_cache.py): the first step of a fresh worker
    otherwise compiles for ~20 s. A cache only saves time, so a failure is logged and training goes on."""
    if live.device != "cuda" or spec.backend != "unsloth":
        return
    import torch

    try:
        tag = compile_cache_tag(torch.cuda.get_device_capability())
        files = action(store, tag)
    except Exception as exc:  # noqa: BLE001 - any failure of an optional cache leaves the run as it was
        run_logger().warning("train: compile cache not %s the store (%s: %s)", done.split()[0], type(exc).__name__, exc)
        return
    if files:
        run_logger().info("train: compile cache: %d files %s %s", files, done, store.uri_of(f"{COMPILE_CACHE_PREFIX}/{tag}"))


def current_world_size() -> int:
    """Ranks in this training: WORLD_SIZE as a launcher (accelerate, torchrun) set it, else 1."""
    return int(os.environ.get("WORLD_SIZE", 1))


def summed_over_ranks(values: list[int]) -> list[int]:
    """Each rank counted its own tokens per step; the step's tokens are their sum (an all-reduce across ranks)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(total)
    return total.tolist()


def trainer_layout(trainer: Any) -> str:
    args = trainer.args
    return (f"{args.per_device_train_batch_size} examples × {args.gradient_accumulation_steps} micro-batches × "
            f"{args.world_size} rank(s)")


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


@contextmanager
def objects_alive_now_left_out_of_gc() -> Iterator[None]:
    """Python's cyclic garbage collector skips every object alive on entry (the model's modules, the libraries:
    ~0.85 M objects in an Unsloth process) until the block ends; what the block creates is collected as usual.

    Unsloth's and accelerate's set-up before the first step run four full collections, and Unsloth's clean-up after
    the last step one more; each walks the whole heap, 0.58 s per pass on the H200 machine (docs/benchmarks.md,
    "Where train()'s time outside the steps went"). gc.freeze() is Python's tool for this (the gc module's
    documentation). Unsloth has its own freeze around Trainer.train(), but it stands aside when anything at all is
    frozen already, and in the Unsloth processes measured something was (375 objects, frozen before training
    started), so it did not freeze. Python cannot unfreeze only some objects: on exit every frozen object is
    unfrozen, an earlier freeze included (nothing in this process depends on one: a frozen object is only exempt
    from cycle collection).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_optimizer_state(trainer: Any) -> None:
    """Free the optimizer's state now, whether training finished or failed: fused AdamW keeps 2 × 4 B per trainable
    parameter (336 MB of GPU memory for LoRA r=16 on the seven projections of an 8B, 41.9 M parameters; 84 MB
    with 8-bit AdamW). Unsloth's trainer sits in reference cycles that only a full collection breaks, and the next
    training's heap freeze (objects_alive_now_left_out_of_gc) keeps whatever is garbage then alive through that
    training: every training in one process held one optimizer's state more (peak +0.31 GiB per repeat, run V in
    docs/benchmarks.md). The trainer is not used for training again afterwards."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None:
        optimizer.state.clear()


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
    adapter it starts from (model.init_adapter, resolved now to a pinned store digest or Hub commit) included.
    Warns, with the numbers, when the plan shows each example so often that it will be memorised."""
    memorised = memorisation_note(cfg.train, len(prompts.train_prompts))
    if memorised:
        run_logger().warning("train: %s", memorised)
    parent = resolve_init_adapter(cfg)
    key = train_key(cfg, dataset.sha256, eval_dataset.sha256 if eval_dataset else None, backend,
                    parent.identity if parent else None)
    return TrainSpec(
        model=cfg.model, lora=cfg.lora, train=cfg.train, backend=backend, store_uri=cfg.output.store,
        prompts_key=prompts_key(prompts), adapter_key=adapter_key(key), checkpoints_prefix=checkpoints_prefix(key),
        init_adapter=parent, world_size=resolve_world_size(cfg.train.num_devices),
    )


def run_spec(spec: TrainSpec) -> AdapterRef | None:
    """A whole training from the spec alone: load the base model, attach LoRA, read the prompts, train, publish."""
    store = open_store(spec.store_uri)
    live = attach_lora(load_model(spec.model, spec.backend), spec.lora, spec.model.max_seq_length, spec.train.seed,
                       spec.init_adapter)
    return train_adapter(live, load_prompts(store, spec.prompts_key), spec)


def main(argv: list[str] | None = None) -> int:
    """`python -m loraflow.training <spec.json> [<result dir>]`: run a TrainSpec in this process (one rank of a
    launch, or alone). Rank 0 prints the AdapterRef as JSON and writes it to <result dir>/adapter.json; a rank that
    fails writes <result dir>/error-rank<N>.json (what failed, and whether a retry could get past it)."""
    args = sys.argv[1:] if argv is None else argv
    spec = TrainSpec.model_validate_json(Path(args[0]).read_text())
    results = Path(args[1]) if len(args) > 1 else None
    rank = int(os.environ.get("RANK", 0))
    if "LOCAL_RANK" in os.environ:  # a launcher's rank: it starts ranks in sessions of their own, so a signal to
        end_with_parent(signal.SIGKILL)  # the run's group misses them; they must not outlive the launcher
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"rank {rank}: %(message)s")
    try:
        backend_named(spec.backend)  # Unsloth, where it is the backend, before anything loads transformers
        allow_indexed_cpu_locations()
        adapter = run_spec(spec)
    except BaseException as exc:
        if results:
            (results / f"error-rank{rank}.json").write_text(json.dumps(describe_failure(exc)))
        raise
    if adapter is not None:
        body = json.dumps(asdict(adapter), default=lambda value: value.model_dump(mode="json"))  # the parent: pydantic
        if results:
            (results / "adapter.json").write_text(body)
        print(body)
    return 0


def allow_indexed_cpu_locations() -> None:
    """CPU ranks (gloo) run on accelerate's device "cpu:<rank>", and the trainer resumes a checkpoint with
    torch.load(map_location=that device); torch's loader knows the location "cpu" only. Tensors bound for
    "cpu:<n>" are CPU tensors already: accept them as they are."""
    import torch

    def deserialize(obj: Any, location: str) -> Any:
        return obj if location.startswith("cpu:") else None

    torch.serialization.register_package(99, lambda obj: None, deserialize)


def describe_failure(exc: BaseException) -> dict[str, Any]:
    """What the launching process needs to fail the step the way an in-process failure would (retry or not)."""
    from loraflow.errors import LoraflowInputError
    from loraflow.retries import is_transient

    kind = ("out_of_memory" if isinstance(exc, TrainingOutOfMemoryError) else
            "input" if isinstance(exc, LoraflowInputError) else
            "transient" if is_transient(exc) else "other")
    return {"kind": kind, "type": type(exc).__name__, "message": str(exc)}


if __name__ == "__main__":
    sys.exit(main())
