"""What each cached output depends on, spelled out. Prefect's DEFAULT policy includes the flow-run id and
never hits across runs, so every cached task uses a key built here from its real inputs."""

from __future__ import annotations

from importlib import metadata

from loraflow.config import FinetuneConfig
from loraflow.fingerprint import stable_hash

TRAINING_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo")


def library_versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in TRAINING_LIBRARIES}


# How often checkpoints are written changes nothing that is trained, and a rerun with another interval should
# still find the checkpoints and the adapter of the same training. Nor do the trackers it reports to: a rerun
# that only adds one is served from the cache (it trains nothing, so reports nothing new).
NOT_TRAINING_SETTINGS = {"save_steps", "save_total_limit", "report_to"}


def train_settings_excluded(cfg: FinetuneConfig) -> set[str]:
    """What of cfg.train the key leaves out. trainer_args only while empty: configs without them keep the keys
    they had before the field existed, so their published adapters are still found."""
    return NOT_TRAINING_SETTINGS | (set() if cfg.train.trainer_args else {"trainer_args"})


def train_key(cfg: FinetuneConfig, data_sha256: str, eval_sha256: str | None, backend: str) -> str:
    """The adapter depends on: data, split, template, model (name, revision, precision), LoRA, training
    settings (not the checkpoint interval), backend and library versions. Not on infer, output or hub settings."""
    return stable_hash(
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
        library_versions(),
    )


def adapter_key(train_cache_key: str) -> str:
    return f"adapters/{train_cache_key}"


def checkpoints_prefix(train_cache_key: str) -> str:
    """Where train's checkpoints for this key go (see loraflow.checkpoints)."""
    return f"checkpoints/{train_cache_key}"
