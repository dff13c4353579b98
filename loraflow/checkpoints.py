"""Training checkpoints in the artifact store: uploaded as the trainer writes them, found again by a retry.

    checkpoints/<train cache key>/step-<N>-<attempt>/    the trainer's checkpoint-<N> folder: adapter, optimizer,
                                                         scheduler, RNG states, trainer_state.json (global step,
                                                         loss history; the data position follows from the step);
                                                         the last step's: adapter and trainer_state.json only
    checkpoints/<train cache key>/step-<N>-<attempt>/manifest.json    written last: the checkpoint is complete

Every training attempt writes under its own random `<attempt>` suffix, so two runs of one config never write the
same key; any attempt may resume from any complete checkpoint of its key, since the key is everything the
training depends on. Pruning keeps the newest `save_total_limit` complete checkpoints of the key and deletes
only complete ones (manifest first), never an upload still in progress.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.errors import StoreUnavailableError
from loraflow.logs import run_logger
from loraflow.store import Store

CHECKPOINT_NAME = re.compile(r"^step-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class StoredCheckpoint:
    key: str
    step: int


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]


def stored_checkpoints(store: Store, prefix: str) -> list[StoredCheckpoint]:
    """The complete checkpoints under `prefix`, newest (highest step) first."""
    found = []
    for key in store.list_complete(prefix):
        match = CHECKPOINT_NAME.match(key.rsplit("/", 1)[-1])
        if match:
            found.append(StoredCheckpoint(key, int(match.group(1))))
    return sorted(found, key=lambda c: (c.step, c.key), reverse=True)


def fetch_latest_checkpoint(store: Store, prefix: str, destination: Path) -> tuple[Path, int] | None:
    """Download the newest complete checkpoint into `destination`; (folder, step), or None to start fresh.

    A checkpoint pruned by a concurrent run while it downloads is skipped for the next newest.
    """
    for checkpoint in stored_checkpoints(store, prefix):
        folder = destination / f"checkpoint-{checkpoint.step}"
        try:
            store.get_folder(checkpoint.key, folder)
        except (OSError, StoreUnavailableError) as exc:
            run_logger().warning("train: checkpoint %s could not be read (%s); trying an older one", checkpoint.key, exc)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        return folder, checkpoint.step
    return None


def prune_checkpoints(store: Store, prefix: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted keys."""
    doomed = [c.key for c in stored_checkpoints(store, prefix)[keep:]]
    for key in doomed:
        store.delete(key)
    return doomed


def finished_training(checkpoint: Path) -> bool:
    """The checkpoint is of the last step: its trainer_state.json has global_step >= max_steps."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])


def load_finished_training(trainer: Any, model: Any, checkpoint: Path) -> Any:
    """Restore a training that had finished from its last checkpoint, instead of resuming it: transformers' loop
    takes one more optimizer step before it looks at max_steps, so resuming at step N would train step N+1 (an
    adapter an undisturbed run never makes). Loads the LoRA weights into `model` and the checkpoint's TrainerState
    (global step, loss history) into `trainer`; returns a TrainOutput like `trainer.train()`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, 0.0, {})


def final_checkpoint_model_only() -> Any:
    """A TrainerCallback: the checkpoint of the last step holds the adapter and the trainer's state, not the
    optimizer, scheduler and RNG states. A finished training is never resumed, only restored
    (load_finished_training), so those would be written and copied to the store for nothing: AdamW's two moments
    are 2 × 4 B per trainable parameter, 336 MB for LoRA r=16 on the seven projections of an 8B (41.9 M), twice
    the adapter. Earlier checkpoints keep everything a resume needs. It sets the trainer's
    `args.save_only_model` at the last step (so that run's training_args.bin says True); use it only where
    final_checkpoint_may_be_model_only says so."""
    from transformers import TrainerCallback

    class FinalCheckpointModelOnly(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # transformers saves after on_step_end, reading save_only_model then (Trainer._save_checkpoint)
            if state.max_steps and state.global_step >= state.max_steps:
                args.save_only_model = True

    return FinalCheckpointModelOnly()


SHARDED_TRAINING_SETTINGS = ("fsdp", "fsdp_config", "deepspeed")


def final_checkpoint_may_be_model_only(train: Any) -> bool:
    """False where `train.trainer_args` turns on FSDP or DeepSpeed (SHARDED_TRAINING_SETTINGS): their checkpoints
    are the trainer's own, and their checks of save_only_model run when the trainer is built, before a callback
    could change it. (save_only_model, push_to_hub and hub_strategy are loraflow's: config validation refuses them
    in trainer_args, loraflow.tracking.OWNED_TRAINER_ARGS.)"""
    return not set(SHARDED_TRAINING_SETTINGS) & set(train.trainer_args)


def checkpoint_sync_callback(store: Store, prefix: str, attempt: str, keep: int) -> Any:
    """A TrainerCallback that copies each checkpoint the trainer saves to the store, then prunes old ones."""
    from transformers import TrainerCallback

    class CheckpointSync(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            started = time.perf_counter()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            uri = store.put_folder(folder, f"{prefix}/step-{state.global_step}-{attempt}", shared_blobs=False)
            pruned = prune_checkpoints(store, prefix, keep)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            run_logger().info("train: checkpoint at step %d -> %s (%.1f MiB in %.1f s)%s", state.global_step, uri,
                              size / 2**20, time.perf_counter() - started,
                              f"; pruned {len(pruned)} older" if pruned else "")

    return CheckpointSync()
