"""Experiment trackers and trainer passthrough: `train.report_to` and `train.trainer_args`.

- report_to: the names of transformers' reporting integrations (tensorboard, mlflow, wandb, ...). The trainer's
  own callbacks do the logging, configured by each tracker's environment (MLFLOW_TRACKING_URI, WANDB_MODE, ...);
  loraflow adds what they miss: the Prefect flow run's name as the tracker's run name, the LoRA settings as
  parameters, TensorBoard's log folder inside the published adapter (`runs/<flow run name>/`), and the tracker's
  run id/URL in summary.json and a Prefect link artifact.
- trainer_args: any other SFTConfig argument, applied after loraflow's own. Keys loraflow owns are refused when
  the config is validated (a static table, no import); unknown keys and wrong types are found against
  `dataclasses.fields(trl.SFTConfig)` by `check_tracking`, which the CLI's preflight and the flow's door call
  before any model loads (importing trl takes ~7 s here, too slow for every config validation).

This module imports nothing heavy at import time: loraflow.config imports it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import parse_qsl, urlsplit, urlunsplit
from urllib.request import url2pathname

from loraflow.errors import ConfigError

log = logging.getLogger(__name__)

# transformers 5.17's INTEGRATION_TO_CALLBACK keys (tests/test_tracking.py keeps this in step with it): known
# without importing transformers, so `train.report_to` can be checked with the rest of the config.
TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow", "mlflow",
            "neptune", "swanlab", "tensorboard", "trackio", "wandb")
INSTALL_HINTS = {"mlflow": "pip install 'loraflow[mlflow]'", "tensorboard": "pip install 'loraflow[tensorboard]'",
                 "wandb": "pip install wandb"}
TENSORBOARD_DIR = "runs"  # inside the adapter folder, as the HF Trainer's own default (the Hub shows its curves)
LINK_ARTIFACT_PREFIX = "finetune-tracker-"

# Credentials a tracker reads from the environment. When one is unset, train reads the Prefect Secret block of
# the same name in kebab case (`wandb-api-key`), like HF_TOKEN / `hf-token`; never from the config.
TRACKER_CREDENTIALS = {
    "wandb": ("WANDB_API_KEY",),
    "mlflow": ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"),
    "comet_ml": ("COMET_API_KEY",),
    "neptune": ("NEPTUNE_API_TOKEN",),
}

_CHECKPOINTS = "loraflow checkpoints to the store under the train key and resumes by itself (train.save_steps, " \
               "train.save_total_limit)"
_HUB = "push-hub publishes the adapter (the hub section; the token comes from HF_TOKEN or the hf-token block)"
_EVAL = "train is given no eval dataset: smoke-infer scores the eval split against the base model"
# SFTConfig arguments loraflow sets itself, with the reason a user sees when they pass one in trainer_args.
OWNED_TRAINER_ARGS = {
    "output_dir": "train writes to a temporary folder and publishes to the store; set output.dir",
    "per_device_train_batch_size": "set train.per_device_batch_size",
    "gradient_accumulation_steps": "set train.gradient_accumulation_steps",
    "max_steps": "set train.max_steps",
    "num_train_epochs": "set train.num_epochs",
    "learning_rate": "set train.learning_rate",
    "lr_scheduler_type": "set train.lr_scheduler",
    "warmup_steps": "set train.warmup_steps",
    "optim": "set train.optimizer",
    "weight_decay": "set train.weight_decay",
    "seed": "set train.seed",
    "logging_steps": "set train.logging_steps",
    "logging_strategy": "losses are logged every train.logging_steps steps: summary.json, the loss curve and the "
                        "trackers read them",
    "report_to": "set train.report_to",
    "run_name": "trackers get the Prefect flow run's name",
    "save_strategy": _CHECKPOINTS,
    "save_steps": _CHECKPOINTS,
    "save_total_limit": _CHECKPOINTS,
    "save_only_model": _CHECKPOINTS,
    "resume_from_checkpoint": _CHECKPOINTS,
    "ignore_data_skip": _CHECKPOINTS,
    "max_length": "set model.max_seq_length",
    "bf16": "model.dtype and the device decide the precision",
    "fp16": "model.dtype and the device decide the precision",
    "use_cpu": "the backend decides the device",
    "ddp_timeout": "set train.ddp_timeout_seconds",
    "ddp_find_unused_parameters": "every LoRA adapter trains each step: DDP needs no search for unused parameters",
    "packing": "set train.packing",
    "padding_free": "set train.packing",
    "packing_strategy": "set train.packing",
    "completion_only_loss": "set train.completion_only_loss",
    "assistant_only_loss": "set train.completion_only_loss (loss on the last answer only)",
    "loss_type": "loraflow picks the loss for the backend (Unsloth's fused cross-entropy; TRL's chunked head on a "
                 "transformers GPU, or on a CPU with train.completion_only_loss)",
    "gradient_checkpointing": "set lora.gradient_checkpointing (attach-LoRA turns it on)",
    "gradient_checkpointing_kwargs": "set lora.gradient_checkpointing (attach-LoRA turns it on)",
    "dataset_text_field": "format-prompts builds the training rows",
    "chat_template_path": "set prompt.template",
    "eos_token": "format-prompts closes every text with the tokenizer's EOS",
    "model_init_kwargs": "load-4bit-model loads the model (the model section)",
    "push_to_hub": _HUB,
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "hub_private_repo": _HUB,
    "hub_always_push": _HUB,
    "hub_revision": _HUB,
    "hub_token": _HUB,
    "do_eval": _EVAL,
    "eval_strategy": _EVAL,
    "eval_steps": _EVAL,
    "eval_on_start": _EVAL,
    "load_best_model_at_end": _EVAL,
    "metric_for_best_model": _EVAL,
}


# --- config validation ----------------------------------------------------------------------------------------


def report_to_list(value: Any) -> Any:
    """YAML and --set spellings of train.report_to as a list: `mlflow` -> ["mlflow"]; `none`/null -> []."""
    if value is None or value == "none":
        return []
    return [value] if isinstance(value, str) else value


def check_tracker_names(names: list[str]) -> list[str]:
    """Raise ValueError for a name transformers does not know, `all` or `none` in a list, or a repeat."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        hint = " (name them: loraflow reports only where it is told)" if "all" in unknown else ""
        raise ValueError(f"unknown tracker(s) {unknown}{hint}; known: {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a tracker is named twice: {names}")
    return names


def refuse_owned(trainer_args: dict[str, Any]) -> dict[str, Any]:
    """Raise ValueError naming the first key of `trainer_args` that loraflow sets itself, with the reason."""
    for key in trainer_args:
        if key in OWNED_TRAINER_ARGS:
            raise ValueError(f"{key} is set by loraflow, not trainer_args: {OWNED_TRAINER_ARGS[key]}")
    return trainer_args


class Uncheckable(Exception):
    """A field type this checker does not understand (none in trl 1.14's SFTConfig; a later one may add one)."""


def fits(value: Any, annotation: Any) -> bool:
    """Whether a value read from YAML/JSON fits a dataclass field's annotation.

    bool, int (not bool), float (an int too), str, Literal, Enum (its values; a str in `Enum | str` must be one of
    them, as TrainingArguments converts it), dict/list with their item types, Optional/Union, Any; any other
    class by isinstance, which a config value never is. Raises Uncheckable for typing forms beyond these.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, Enum)]
        if enums and isinstance(value, str):
            return any(fits(value, e) for e in enums)
        return any(fits(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return value in {member.value for member in annotation}
    if annotation is dict or origin is dict:
        key_type, value_type = args or (Any, Any)
        return isinstance(value, dict) and all(fits(k, key_type) and fits(v, value_type) for k, v in value.items())
    if annotation is list or origin is list:
        (item_type,) = args or (Any,)
        return isinstance(value, list) and all(fits(item, item_type) for item in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    raise Uncheckable(annotation)


def describe(annotation: Any) -> str:
    """An annotation in the words of a config file: `float or null`, `one of 'no', 'steps', 'epoch'`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, Enum)]
        return " or ".join(describe(a) for a in args if not (enums and a is str))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(repr(member.value) for member in annotation)
    if annotation is dict or origin is dict:
        return "a mapping"
    if annotation is list or origin is list:
        return f"a list of {describe(args[0])}" if args else "a list"
    if annotation is float:
        return "a number"
    if annotation in (bool, int, str):
        return {bool: "true or false", int: "an integer", str: "a string"}[annotation]
    return f"a {getattr(annotation, '__name__', annotation)} object (a config cannot hold one)"


def check_trainer_args(trainer_args: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key of `trainer_args` that is no SFTConfig argument, or whose value does
    not fit the argument's type or `choices`. Owned keys are refused earlier (refuse_owned, in the config).

    Not checked: what goes inside a mapping (lr_scheduler_kwargs for the scheduler, fsdp_config, deepspeed), a JSON
    string given for a mapping, ranges (a negative max_grad_norm), and SFTConfig's own cross-argument rules
    (its __post_init__): those fail when train builds the SFTConfig, after the model loaded.
    """
    if not trainer_args:
        return
    import dataclasses

    from trl import SFTConfig  # ~7 s on this machine (torch, transformers): only when trainer_args are given

    fields = {f.name: f for f in dataclasses.fields(SFTConfig) if f.init}
    hints = typing.get_type_hints(SFTConfig)
    for key, value in trainer_args.items():
        where = f"train.trainer_args.{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{where}: not an argument of trl's SFTConfig{hint}")
        try:
            ok = fits(value, hints[key])
        except Uncheckable:
            log.warning("%s: type %s not checked here; SFTConfig checks it when train builds it", where, hints[key])
            continue
        choices = fields[key].metadata.get("choices")
        if ok and choices is not None and value is not None and value not in list(choices):
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        if not ok:
            raise ConfigError(f"{where}: expected {describe(hints[key])}, got {type(value).__name__} {value!r}")


def check_report_to(report_to: list[str]) -> None:
    """Raise ConfigError when a tracker in `report_to` is not usable here (its package missing, or what
    transformers' own availability check requires, e.g. COMET_API_KEY)."""
    if not report_to:
        return
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for name in report_to:
        if name not in available:
            hint = INSTALL_HINTS.get(name, f"install the {name} package")
            raise ConfigError(f"train.report_to: {name} is not available here ({hint})")


def check_tracking(train: Any) -> None:
    """The checks that need trl/transformers, for the CLI's preflight and the flow's door (before any model loads).

    `train` is a TrainSettings. Raises ConfigError (exit 2 from `loraflow run`)."""
    check_trainer_args(train.trainer_args)
    check_report_to(train.report_to)
    check_optimizer_and_scheduler(train.optimizer, train.lr_scheduler)


# transformers' optim names whose optimizer torch or transformers itself provides (no package to check), and auto
# (config.resolved_optimizer): checked without importing transformers' Trainer, ~1.5 CPU-s on this 2-core machine
OPTIMIZERS_OF_TORCH = frozenset({"auto", "adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor"})


def check_optimizer_and_scheduler(optimizer: str, lr_scheduler: str) -> None:
    """train.optimizer and train.lr_scheduler as the trainer will take them, checked by transformers itself
    (SchedulerType; TrainingArguments and Trainer.get_optimizer_cls_and_kwargs, which also import the optimizer's
    package) before any model loads: an unknown name, or an optimizer whose package is not installed here
    (adamw_8bit without bitsandbytes). The linear scheduler and OPTIMIZERS_OF_TORCH are built in and not checked,
    which keeps transformers' Trainer out of most runs' checks. Raises ConfigError naming the key."""
    if lr_scheduler != "linear":
        from transformers import SchedulerType

        names = [kind.value for kind in SchedulerType]
        if lr_scheduler not in names:
            close = difflib.get_close_matches(lr_scheduler, names, n=1)
            hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(names)}"
            raise ConfigError(f"train.lr_scheduler: {lr_scheduler!r} is not a scheduler of transformers; {hint}")
    if optimizer in OPTIMIZERS_OF_TORCH:
        return
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    names = [name.value for name in OptimizerNames]
    if optimizer not in names:
        close = difflib.get_close_matches(optimizer, names, n=1)
        hint = f"did you mean {close[0]}?" if close else "use auto, or one of transformers' OptimizerNames"
        raise ConfigError(f"train.optimizer: {optimizer!r} is not an optimizer of transformers; {hint}")
    try:
        Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(optim=optimizer, report_to=[]))
    except (ImportError, ValueError) as exc:  # its package missing: transformers says which, and how to install it
        raise ConfigError(f"train.optimizer: {optimizer!r}: {str(exc).strip().splitlines()[0]}") from None


# --- during training ------------------------------------------------------------------------------------------


def flow_run_name() -> str | None:
    """The Prefect flow run's name (e.g. `crafty-beaver`), None outside a run (benchmarks, unit tests)."""
    from prefect.runtime import flow_run

    return flow_run.get_name()


def redact_uri(uri: str) -> str:
    """A URI fit for logs and artifacts: user:password@ becomes ***@, and query values whose name says
    token/key/secret/password/signature become ***."""
    parts = urlsplit(uri)
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    secret_words = ("token", "key", "secret", "password", "passwd", "signature", "sig", "credential", "auth")
    query = "&".join(
        f"{name}={'***' if any(w in name.lower() for w in secret_words) else value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: the UI page of a tracking server, the run's folder of a file store, else the
    store's URI (a database: open it with `mlflow ui --backend-store-uri ...`)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if parts.scheme in ("file", ""):
        root = Path(url2pathname(parts.path) if parts.scheme else tracking_uri)
        return (root / experiment_id / run_id).resolve().as_uri()
    return tracking_uri


def load_tracker_credentials(report_to: list[str]) -> None:
    """Fill each unset credential variable of the trackers in use from the Prefect Secret block of that name
    (WANDB_API_KEY <- `wandb-api-key`), for this process. The value is never logged; a missing block is fine."""
    for tracker in report_to:
        for variable in TRACKER_CREDENTIALS.get(tracker, ()):
            if os.environ.get(variable):
                continue
            block = variable.lower().replace("_", "-")
            try:
                from prefect.blocks.system import Secret

                os.environ[variable] = str(Secret.load(block).get())
            except Exception:  # no such block, or no Prefect API: the tracker decides if it needs the value
                continue
            from loraflow.logs import run_logger

            run_logger().info("train: %s from the Prefect Secret block %r", variable, block)


def peft_params(model: Any) -> dict[str, str]:
    """The adapter's LoRA settings as `peft.<field>` parameters: MLflow's callback logs the base model's config and
    the training arguments, not the PEFT config (whose rank and alpha are what a LoRA run is compared by)."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return {}
    fields = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "use_rslora",
              "use_dora")
    values = {name: getattr(config, name, None) for name in fields}
    values["target_modules"] = sorted(values["target_modules"] or [])
    return {f"peft.{name}": str(getattr(value, "value", value)) for name, value in values.items()}


def tracking_callback(report_to: list[str], run_name: str | None, run_id: str | None, adapter_dir: Path) -> Any:
    """A TrainerCallback, added after the trainer's reporting callbacks (so theirs set up first), that records
    each tracker's run as a dict {tracker, run_name, run_id, url, log_dir} in `.tracker_runs`, logs the LoRA
    settings and the flow run to MLflow and TensorBoard, and closes a W&B run at the end (its callback leaves it
    open for the process's life)."""
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        def __init__(self) -> None:
            self.tracker_runs: list[dict[str, str | None]] = []
            self.tensorboard: Any = None  # transformers' TensorBoardCallback, set by attach_trackers

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            params = peft_params(model)
            if "mlflow" in report_to:
                tags = {"loraflow.flow_run_name": run_name, "loraflow.flow_run_id": run_id}
                self.tracker_runs.append(mlflow_run(params, {k: v for k, v in tags.items() if v}))
            if "tensorboard" in report_to and self.tensorboard is not None:
                self.tracker_runs.append(tensorboard_run(self.tensorboard, params, run_name, adapter_dir))
            if "wandb" in report_to:
                self.tracker_runs.append(wandb_run())
            from loraflow.logs import run_logger

            for run in self.tracker_runs:
                run_logger().info("train: reporting to %s, run %s (%s)", run["tracker"], run["run_id"] or run["run_name"],
                                  run["url"] or run["log_dir"])

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if "wandb" in report_to and state.is_world_process_zero:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return TrackingCallback()


def mlflow_run(params: dict[str, str], tags: dict[str, str]) -> dict[str, str | None]:
    import mlflow

    run = mlflow.active_run()  # started by transformers' MLflowCallback a moment ago
    mlflow.log_params(params)
    mlflow.set_tags(tags)
    uri = mlflow.get_tracking_uri()
    return {"tracker": "mlflow", "run_name": run.info.run_name, "run_id": run.info.run_id,
            "url": redact_uri(mlflow_run_url(uri, run.info.experiment_id, run.info.run_id)), "log_dir": None}


def tensorboard_run(callback: Any, params: dict[str, str], run_name: str | None, adapter_dir: Path) -> dict[str, str | None]:
    if callback.tb_writer is not None:
        callback.tb_writer.add_text("peft_config", json.dumps(params, indent=1))
    log_dir = Path(callback.logging_dir).resolve()
    # Inside the adapter folder: recorded relative to it, as it will lie in output.dir (runs_for_summary);
    # elsewhere (TENSORBOARD_LOGGING_DIR) as the absolute path it is
    if log_dir.is_relative_to(adapter_dir.resolve()):
        log_dir = log_dir.relative_to(adapter_dir.resolve())
    return {"tracker": "tensorboard", "run_name": run_name, "run_id": None, "url": None, "log_dir": str(log_dir)}


def wandb_run() -> dict[str, str | None]:
    import wandb

    run = wandb.run
    offline = run.settings.mode == "offline"  # checked with wandb 0.31 (WANDB_MODE=offline)
    # Offline, the run is a local folder that `wandb sync` uploads later.
    url = Path(run.dir).parent.resolve().as_uri() if offline else run.url
    return {"tracker": "wandb", "run_name": run.name, "run_id": run.id, "url": redact_uri(url) if url else None,
            "log_dir": None}


def attach_trackers(trainer: Any, report_to: list[str], adapter_dir: Path) -> None:
    """Set the trainer's tracker callbacks up for this run, before train() starts (nothing without report_to).

    - credentials: unset ones from Prefect Secret blocks (load_tracker_credentials);
    - TensorBoard: events go to `adapter_dir/runs/<flow run name>/` unless TENSORBOARD_LOGGING_DIR says otherwise,
      so they are published with the adapter and copied to output.dir (transformers' default is under the
      trainer's output_dir, the task's temporary folder here);
    - MLflow: a tracking URI with credentials in it is not printed (MLflow prints "View run ... at: <URI>");
    - a TrackingCallback that records the runs for tracked_runs().
    """
    if not report_to:
        return
    from prefect.runtime import flow_run
    from transformers.integrations import TensorBoardCallback

    load_tracker_credentials(report_to)
    if "mlflow" in report_to and "@" in urlsplit(os.environ.get("MLFLOW_TRACKING_URI", "")).netloc:
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    run_name = trainer.args.run_name
    callback = tracking_callback(report_to, run_name, flow_run.get_id(), adapter_dir)
    for existing in trainer.callback_handler.callbacks:
        if isinstance(existing, TensorBoardCallback):
            if existing.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset
                existing.logging_dir = str(adapter_dir / TENSORBOARD_DIR / (run_name or "local"))
            callback.tensorboard = existing
    trainer.add_callback(callback)


def tracked_runs(trainer: Any) -> list[dict[str, str | None]]:
    """The tracker runs the TrackingCallback recorded; [] when nothing was reported."""
    for callback in trainer.callback_handler.callbacks:
        if hasattr(callback, "tracker_runs"):
            return list(callback.tracker_runs)
    return []


# --- after training: summary and artifacts --------------------------------------------------------------------


def runs_for_summary(runs: list[dict[str, str | None]], output_dir: str) -> list[dict[str, str | None]]:
    """The tracker runs as summary.json lists them: TensorBoard's log folder as a file:// URL in output.dir (it
    came with the adapter), every URL redacted."""
    folder = Path(output_dir).expanduser().resolve()
    resolved = []
    for run in runs:
        run = dict(run)
        if run["tracker"] == "tensorboard" and run["log_dir"]:
            log_dir = Path(run["log_dir"])
            if not log_dir.is_absolute():
                log_dir = folder / log_dir
            run["log_dir"], run["url"] = str(log_dir), log_dir.as_uri()
        if run["url"]:
            run["url"] = redact_uri(run["url"])
        resolved.append(run)
    return resolved


def publish_tracker_links(runs: list[dict[str, str | None]]) -> None:
    """One Prefect link artifact per tracker run (key `finetune-tracker-<tracker>`), in the current flow run."""
    from prefect.artifacts import create_link_artifact

    for run in runs:
        if not run["url"]:
            continue
        name = f"{run['tracker']} run {run['run_name'] or run['run_id'] or ''}".strip()
        create_link_artifact(link=run["url"], link_text=name,
                             key=LINK_ARTIFACT_PREFIX + run["tracker"].replace("_", "-"),
                             description=f"loraflow: the training's {run['tracker']} run")
