"""What each cached output depends on, spelled out. Prefect's DEFAULT policy includes the flow-run id and
never hits across runs, so every cached step uses a key built here from its real inputs; the adapter's key
(`train_key`) names it in the store, which is where "already trained" is found (loraflow.training.published_adapter)."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from loraflow.backends import cuda_available
from loraflow.config import FinetuneConfig, resolved_optimizer
from loraflow.fingerprint import dataset_fingerprint, stable_hash

TRAINING_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo")


def library_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in TRAINING_LIBRARIES}


# Settings that change nothing that is trained:
# - how often checkpoints are written: a rerun with another interval still finds the checkpoints and the adapter;
# - how many GPUs share the work: every optimizer step sees the same examples (the effective batch is the
#   configured one, its micro-batches spread over the ranks) and the loss is normalised by the tokens of the whole
#   step on every rank count, so 1 or N GPUs give the same training up to the order of float additions;
# - how long a rank waits for the others.
# - how long a step may run (train.timeout_seconds);
# - the trackers it reports to: a rerun that only adds one is served from the cache (it trains nothing, so reports
#   nothing new).
NOT_TRAINING_SETTINGS = {"save_steps", "save_total_limit", "num_devices", "ddp_timeout_seconds", "report_to", "timeout_seconds"}


def train_settings_excluded(cfg: FinetuneConfig) -> set[str]:
    """What of cfg.train the key leaves out. trainer_args only while empty: configs without them keep the keys
    they had before the field existed, so their published adapters are still found."""
    return NOT_TRAINING_SETTINGS | (set() if cfg.train.trainer_args else {"trainer_args"})


def train_key(
    cfg: FinetuneConfig, data_sha256: str, eval_sha256: str | None, backend: str, parent: str | None = None
) -> str:
    """The adapter depends on: data, split, template, model (name, revision, precision), the adapter it starts from
    (`parent`: its store key and digest, or Hub repo and commit; None = fresh), LoRA, training settings (not the
    checkpoint interval, the number of ranks or the timeout), backend, device kind and library versions. Not on
    infer, output, hub or promote settings."""
    parts = [] if parent is None else [{"init_adapter": parent}]  # a fresh start keeps the keys of earlier versions
    if cfg.train.optimizer == "auto" and cuda_available():
        # auto trained with adamw_8bit on CUDA before it meant adamw_torch_fused: those adapters are not these
        parts.append({"optimizer": resolved_optimizer("auto", on_cuda=True)})
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
        cfg.train.model_dump(mode="json", exclude=train_settings_excluded(cfg)),
        backend,
        # dtype auto, optimizer auto and load_in_4bit resolve by device: fp32, adamw_torch and no NF4 on a CPU
        "cuda" if cuda_available() else "cpu",
        library_versions(),
    )


def adapter_key(train_cache_key: str) -> str:
    return f"adapters/{train_cache_key}"


def checkpoints_prefix(train_cache_key: str) -> str:
    """Where train's checkpoints for this key go (see loraflow.checkpoints)."""
    return f"checkpoints/{train_cache_key}"


# --- Prefect cache keys of the steps (cache_key_fn(context, parameters) -> key; None = do not cache) ------------------


DATASET_RESULT_VERSION = 2  # in fetch-dataset's key: a Dataset cached in another shape is never read back
PROMPTS_RESULT_VERSION = 3  # the same for format-prompts' Prompts, and for how they are formed (answers trimmed)


def dataset_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """fetch-dataset by what the bytes are, not where they are: a changed row changes the key (an S3 object's
    ETag changes with its bytes); None where neither is known (no caching)."""
    fingerprint = dataset_fingerprint(parameters["uri"])
    return None if fingerprint is None else f"fetch-dataset-v{DATASET_RESULT_VERSION}-{fingerprint}"


def prompts_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """format-prompts depends on the data, the template, the split, the tokenizer and the length examples must fit
    (model.max_seq_length): nothing else. data.ignore_fields only decides whether it fails, and failures are not cached."""
    eval_dataset = parameters["eval_dataset"]
    return f"format-prompts-v{PROMPTS_RESULT_VERSION}-" + stable_hash(
        parameters["dataset"].sha256,
        eval_dataset.sha256 if eval_dataset else None,
        parameters["prompt"],
        parameters["data"].eval_fraction,
        parameters["data"].seed,
        parameters["infer"].prompts,
        parameters["model"].name,
        parameters["model"].revision,
        parameters["model"].max_seq_length,
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
