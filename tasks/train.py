"""train: TRL's SFTTrainer over the formatted texts; the adapter goes to the store, metrics come back."""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.builders import build_sft_config, packing_enabled
from loraflow.config import ModelConfig, TrainSettings
from loraflow.live_model import LiveModel
from loraflow.logs import run_logger
from loraflow.store import open_store
from tasks.format_prompts import Prompts


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

    @property
    def loss_first(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def log_plan(live: LiveModel, train: TrainSettings, model: ModelConfig, texts: list[str], packing: bool) -> None:
    """nanoGPT-style: the derived numbers, before the first step."""
    lengths = [len(ids) for ids in live.tokenizer(texts[:256])["input_ids"]]
    mean_tokens = sum(lengths) / len(lengths)
    effective_batch = train.per_device_batch_size * train.gradient_accumulation_steps
    # tokens per optimizer step = batch × accumulation × tokens per row (a full row when packed)
    tokens_per_row = model.max_seq_length if packing else mean_tokens
    run_logger().info(
        "train: %d texts (mean %.0f tokens), effective batch %d = %d × %d accumulation, ~%.0f tokens per step, "
        "packing %s, max_steps %s, epochs %s, lr %g",
        len(texts), mean_tokens, effective_batch, train.per_device_batch_size, train.gradient_accumulation_steps,
        effective_batch * tokens_per_row, "on" if packing else "off", train.max_steps, train.num_epochs,
        train.learning_rate,
    )


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_trainer(live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, work_dir: Path) -> Any:
    from datasets import Dataset as HFDataset
    from trl import SFTTrainer

    packing = packing_enabled(train, live.backend, live.attn_implementation)
    args = build_sft_config(train, model, live.backend, live.dtype, work_dir / "checkpoints", packing)
    log_plan(live, train, model, prompts.train_texts, packing)
    if train.completion_only_loss:  # TRL masks the prompt tokens out of the loss for prompt/completion rows
        rows = {"prompt": prompts.train_prompts, "completion": prompts.train_completions}
    else:  # the notebook's way: loss on every token of the text
        rows = {"text": prompts.train_texts}
    return SFTTrainer(model=live.model, args=args, train_dataset=HFDataset.from_dict(rows), processing_class=live.tokenizer)


def train_adapter(
    live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, store_uri: str, adapter_key: str
) -> TrainResult:
    """Train LoRA weights, publish adapter + tokenizer to the store under `adapter_key`, return metrics."""
    if live.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="loraflow-train-") as work:
        trainer = build_trainer(live, prompts, train, model, Path(work))
        started = time.perf_counter()
        output = trainer.train()
        runtime = time.perf_counter() - started
        adapter_dir = Path(work) / "adapter"
        live.model.save_pretrained(adapter_dir)
        live.tokenizer.save_pretrained(adapter_dir)
        adapter_uri = open_store(store_uri).put_folder(adapter_dir, adapter_key)
    losses = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    result = TrainResult(
        adapter_key=adapter_key,
        adapter_uri=adapter_uri,
        steps=int(output.global_step),
        losses=losses,
        runtime_seconds=runtime,
        tokens_per_second=trainer.state.num_input_tokens_seen / runtime if runtime else 0.0,
        peak_memory_bytes=peak_memory_bytes(live.device),
        packing=bool(trainer.args.packing),
    )
    run_logger().info(
        "train: %d steps in %.1f s, loss %.4f -> %.4f, %.0f tokens/s, peak memory %.2f GiB; adapter at %s",
        result.steps, runtime, result.loss_first, result.loss_last, result.tokens_per_second,
        result.peak_memory_bytes / 2**30, adapter_uri,
    )
    return result


@task(name="train", cache_policy=NO_CACHE, persist_result=False)
def train_task(
    live: LiveModel, prompts: Prompts, train: TrainSettings, model: ModelConfig, store_uri: str, adapter_key: str
) -> TrainResult:
    """Fine-tune the LoRA adapters and publish them to the artifact store."""
    return train_adapter(live, prompts, train, model, store_uri, adapter_key)
