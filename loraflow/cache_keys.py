"""What each cached output depends on, spelled out. Prefect's DEFAULT policy includes the flow-run id and
never hits across runs, so every cached step uses a key built here from its real inputs; the adapter's key
(`train_key`) names it in the store, which is where "already trained" is found (loraflow.training.published_adapter)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from loraflow.config import FinetuneConfig
from loraflow.fingerprint import dataset_fingerprint, stable_hash

TRAINING_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo")


def library_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in TRAINING_LIBRARIES}


# How often checkpoints are written changes nothing that is trained, and a rerun with another interval should
# still find the checkpoints and the adapter of the same training.
NOT_TRAINING_SETTINGS = {"save_steps", "save_total_limit", "timeout_seconds"}


def train_key(
    cfg: FinetuneConfig, data_sha256: str, eval_sha256: str | None, backend: str, parent: str | None = None
) -> str:
    """The adapter depends on: data, split, template, model (name, revision, precision), the adapter it starts from
    (`parent`: its store key and digest, or Hub repo and commit; None = fresh), LoRA, training settings (not the
    checkpoint interval or the timeout), backend and library versions. Not on infer, output, hub or promote settings."""
    parts = [] if parent is None else [{"init_adapter": parent}]  # a fresh start keeps the keys of earlier versions
    return stable_hash(
        *parts,
        data_sha256,
        eval_sha256,
        cfg.data.eval_fraction,
        cfg.data.seed,
        cfg.prompt,
        cfg.model.name,
        cfg.model.revision,
        cfg.model.load_in_4bit,
        cfg.model.max_seq_length,
        cfg.model.dtype,
        cfg.lora,
        cfg.train.model_dump(mode="json", exclude=NOT_TRAINING_SETTINGS),
        backend,
        library_versions(),
    )


def adapter_key(train_cache_key: str) -> str:
    return f"adapters/{train_cache_key}"


def checkpoints_prefix(train_cache_key: str) -> str:
    """Where train's checkpoints for this key go (see loraflow.checkpoints)."""
    return f"checkpoints/{train_cache_key}"


# --- Prefect cache keys of the steps (cache_key_fn(context, parameters) -> key; None = do not cache) ------------------


def dataset_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """fetch-dataset by what the bytes are, not where they are: a changed row changes the key (an S3 object's
    ETag changes with its bytes); None where neither is known (no caching)."""
    fingerprint = dataset_fingerprint(parameters["uri"])
    return None if fingerprint is None else f"fetch-dataset-{fingerprint}"


def prompts_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """format-prompts depends on the data, the template, the split and the tokenizer: nothing else."""
    eval_dataset = parameters["eval_dataset"]
    return "format-prompts-" + stable_hash(
        parameters["dataset"].sha256,
        eval_dataset.sha256 if eval_dataset else None,
        parameters["prompt"],
        parameters["data"].eval_fraction,
        parameters["data"].seed,
        parameters["infer"].prompts,
        parameters["model"].name,
        parameters["model"].revision,
    )


INFER_RESULT_VERSION = 4  # in smoke-infer's key: a result cached in another shape is never read back


def smoke_infer_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """smoke-infer's answers depend on the adapter's bytes, the prompts and the generation settings; not on the run."""
    prompts = parameters["prompts"]
    return f"smoke-infer-v{INFER_RESULT_VERSION}-" + stable_hash(
        parameters["adapter"].digest,
        [(e.prompt, e.answer) for e in prompts.eval_examples + prompts.infer_prompts],
        prompts.labels,
        parameters["infer"].model_dump(mode="json", exclude={"timeout_seconds"}),
    )


# --- which steps the cache served in this process's flow runs (the summary's cached_tasks) ----------------------------

_CACHE_HITS: dict[str, list[str]] = {}


def note_cache_hit(task: Any, task_run: Any, state: Any) -> None:
    """Prefect on_completion hook of the cached steps: a Cached state means Prefect served the result."""
    if state.name == "Cached":
        _CACHE_HITS.setdefault(str(task_run.flow_run_id), []).append(task.name)


def cache_hits(flow_run_id: str) -> list[str]:
    """The steps of `flow_run_id` served from the cache so far, in the order they ran."""
    return list(_CACHE_HITS.get(flow_run_id, []))
