"""train: TRL's SFTTrainer over the formatted texts; the adapter goes to the store, metrics come back.

Every `train.save_steps` the trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, step) and
it is copied to the store under the train cache key (loraflow/checkpoints.py). A later attempt with the same
key (a task retry, a flow retry, a rerun after a crash) resumes from the newest complete one.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from loraflow.builders import (
    BatchLayout,
    activation_bytes,
    batch_layout,
    build_sft_config,
    keep_gradient_checkpointing,
    packing_enabled,
)
from loraflow.checkpoints import (
    checkpoint_sync_callback, fetch_latest_checkpoint, finished_training, load_finished_training, new_attempt_id,
)
from loraflow.config import ModelConfig, TrainSettings
from loraflow.errors import TrainingOutOfMemoryError
from loraflow.live_model import LiveModel
from loraflow.logs import run_logger
from loraflow.progress import train_progress_callback
from loraflow.retries import retry_transient
from loraflow.store import open_store
from tasks.format_prompts import Prompts

METRICS_FILE = "training_metrics.json"


@dataclass
class TrainResult:
    adapter_key: str  # store key of the adapter folder (content-addressed by the train cache key)
    adapter_uri: str
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per logged step
    runtime_seconds: float = 0.0
    tokens_per_second: float = 0.0
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


class StepClock:
    """Wall time and real tokens of every optimizer step, without a host-device sync per micro-batch.

    Tokens are counted on the CPU as the collator builds each micro-batch (attention-mask sum when padded,
    every token when packed or padding-free); the clock syncs CUDA once per optimizer step, where the
    trainer's loss logging syncs anyway.
    """

    def __init__(self, device: str):
        self.device = device
        self.batch_tokens: list[int] = []  # per micro-batch, in the order the collator built them
        self.step_ends: list[float] = []
        self.micro_batches_at_step: list[int] = []
        self.micro_batches = 0
        self.started = 0.0

    def count_tokens(self, collator: Any) -> None:
        build = collator.torch_call

        def torch_call(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = build(examples)
            mask = batch.get("attention_mask")
            self.batch_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
            return batch

        collator.torch_call = torch_call

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.micro_batches += 1

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.micro_batches += 1
                clock.step_ended()

        return Callback()

    def start(self) -> None:
        self.started = time.perf_counter()

    def step_ended(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        self.micro_batches_at_step.append(self.micro_batches)
        if len(self.step_ends) == 1:
            run_logger().info("train: step 1 done %.1f s after train() began (data, compilation, warm-up)",
                              self.step_ends[0] - self.started)

    def step_seconds(self) -> list[float]:
        ends = [self.started, *self.step_ends]
        return [b - a for a, b in zip(ends, ends[1:])]

    def step_tokens(self) -> list[int]:
        bounds = [0, *self.micro_batches_at_step]
        return [sum(self.batch_tokens[a:b]) for a, b in zip(bounds, bounds[1:])]


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_trainer(
    live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, work_dir: Path,
    clock: StepClock | None = None,
) -> Any:
    from datasets import Dataset as HFDataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    packing = packing_enabled(train, live.backend, live.attn_implementation)
    lengths = [len(ids) for ids in live.tokenizer(prompts.train_texts)["input_ids"]]
    layout = batch_layout(train, model, lengths, packing)
    args = build_sft_config(train, model, live.backend, live.dtype, work_dir / "checkpoints", packing, layout)
    log_plan(train, lengths, layout, packing)
    if live.backend == "unsloth" and live.gradient_checkpointing == "auto":
        choose_gradient_checkpointing(live, layout.batch_size * min(max(lengths), layout.row_tokens))
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


def choose_gradient_checkpointing(live: LiveModel, micro_batch_tokens: int) -> None:
    """lora.gradient_checkpointing auto on Unsloth: off for this run when its activations fit (see builders)."""
    import torch

    from loraflow import unsloth_backend

    free_bytes, _ = torch.cuda.mem_get_info()
    keep = keep_gradient_checkpointing(live.model.config, micro_batch_tokens, free_bytes)
    unsloth_backend.set_gradient_checkpointing(live.model, "unsloth" if keep else False)
    run_logger().info(
        "train: gradient checkpointing %s: activations of a %d-token micro-batch ≈ %.1f GiB, %.1f GiB of GPU memory free",
        "on (Unsloth's)" if keep else "off", micro_batch_tokens,
        activation_bytes(live.model.config, micro_batch_tokens) / 2**30, free_bytes / 2**30,
    )


def train_adapter(
    live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, store_uri: str, adapter_key: str,
    checkpoints_prefix: str | None = None,
) -> TrainResult:
    """Train LoRA weights, publish adapter + tokenizer to the store under `adapter_key`, return metrics.

    Checkpoints go to the store under `checkpoints_prefix` as they are written; when one is there already,
    training resumes from the newest (weights, optimizer, scheduler, RNG, data position, loss history).
    Without a prefix (benchmarks) nothing is stored or resumed.
    """
    if live.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    store = open_store(store_uri)
    clock = StepClock(live.device)
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as work:
        trainer = build_trainer(live, prompts, train, model, Path(work), clock)
        resume = None
        if checkpoints_prefix:
            resume = fetch_latest_checkpoint(store, checkpoints_prefix, Path(work) / "resume")
            trainer.add_callback(checkpoint_sync_callback(store, checkpoints_prefix, new_attempt_id(),
                                                          train.save_total_limit))
        resumed_from_step = resume[1] if resume else 0
        if resume:
            run_logger().info("train: resuming from the stored checkpoint at step %d", resumed_from_step)
        clock.start()
        if resume and finished_training(resume[0]):  # e.g. the adapter's publish failed after the last checkpoint
            output = load_finished_training(trainer, live.model, resume[0])
        else:
            output = train_or_explain_oom(trainer, train, model, str(resume[0]) if resume else None)
        runtime = time.perf_counter() - clock.started
        adapter_dir = Path(work) / "adapter"
        live.model.save_pretrained(adapter_dir)
        live.tokenizer.save_pretrained(adapter_dir)
        # After a resume the history holds the checkpoint's steps too: one loss curve, steps 1..N.
        losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
        step_seconds, step_tokens = clock.step_seconds(), clock.step_tokens()
        result = TrainResult(
            adapter_key=adapter_key,
            adapter_uri="",
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
        # The metrics travel with the adapter, so a later run that finds it in the store can report them.
        (adapter_dir / METRICS_FILE).write_text(json.dumps(asdict(result), indent=1))
        result.adapter_uri = adapter_uri = store.put_folder(adapter_dir, adapter_key)
    run_logger().info(
        "train: %d steps%s in %.1f s (first: %.1f s), loss %.4f -> %.4f, %.0f real tokens/s overall, %.0f once warm, "
        "peak memory %.2f GiB; adapter at %s",
        result.steps - resumed_from_step, f" ({resumed_from_step + 1}-{result.steps})" if resumed_from_step else "",
        runtime, result.first_step_seconds, result.loss_first, result.loss_last,
        result.tokens_per_second, result.steady_tokens_per_second, result.peak_memory_bytes / 2**30, adapter_uri,
    )
    return result


def train_or_explain_oom(trainer: Any, train: TrainSettings, model: ModelConfig, resume_from: str | None) -> Any:
    import torch

    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(
            f"CUDA out of memory at train.per_device_batch_size={train.per_device_batch_size} × "
            f"model.max_seq_length={model.max_seq_length}: lower the batch size (raise gradient_accumulation_steps "
            f"to keep the effective batch) or the sequence length, or turn on lora.gradient_checkpointing. ({exc})"
        ) from None


def published_result(store_uri: str, adapter_key: str) -> TrainResult:
    """The TrainResult of an adapter already in the store (trained by an earlier run with the same key)."""
    store = open_store(store_uri)
    fields = json.loads(store.read_file(adapter_key, METRICS_FILE))
    fields["losses"] = [tuple(pair) for pair in fields["losses"]]
    return TrainResult(**{**fields, "adapter_uri": store.uri_of(adapter_key)})


def train_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The adapter key already is what the adapter depends on (see loraflow.cache_keys.train_key)."""
    return "train-" + parameters["adapter_key"].replace("/", "-")


@task(name="train", cache_key_fn=train_cache_key, persist_result=True,
      retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train_task(
    live: LiveModel | None, prompts: Prompts, train: TrainSettings, model: ModelConfig, store_uri: str, adapter_key: str,
    checkpoints_prefix: str,
) -> TrainResult:
    """Fine-tune the LoRA adapters, checkpointing to the store, and publish them to the artifact store.

    The cached result is the TrainResult (metrics and the adapter's URI), never the model. `live` is None
    when the flow found the adapter already published: then the metrics are read back from the store.
    A retry (of this task or of the flow) or a rerun after a crash resumes from the newest stored checkpoint.
    """
    if live is None:
        return published_result(store_uri, adapter_key)
    return train_adapter(live, prompts, train, model, store_uri, adapter_key, checkpoints_prefix)
