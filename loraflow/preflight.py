"""Everything that can be wrong with a run's input, found before Prefect starts or any model loads.

`loraflow run` calls check_inputs first, so a bad input ends in seconds with one `error:` line (exit 2). The flow
enforces the same rules itself for runs started without the CLI (deployments): output.dir at its door, the data and
the prompts in fetch-dataset and format-prompts, lora.target_modules before load-4bit-model; each fails before any
model loads.

The order puts what needs nothing first: data, rows and labels, output folder, store, backend; then what needs the
tokenizer (a built-in model is prepared for it): chat template, token lengths; then the model's architecture from
its config (no weights).
"""

from __future__ import annotations

from loraflow.architecture import check_target_modules
from loraflow.backends import choose_backend
from loraflow.config import FinetuneConfig
from loraflow.data import read_dataset
from loraflow.sources import newest_object
from loraflow.outputs import check_output_dir
from loraflow.prompts import Prompts, build_prompts, load_tokenizer, plan_rows
from loraflow.quality import check_gate_measurable
from loraflow.store import open_store
from loraflow.tracking import check_tracking


def check_inputs(cfg: FinetuneConfig) -> Prompts:
    """Check the config's data, prompts, output folder, store, backend and LoRA targets; returns the prompt set the
    run will train on, with what the user must know in its notes (rows left out, copies removed, no label set).

    Raises a LoraflowInputError (ConfigError, DatasetError, StoreConfigError) naming what is wrong, or
    ConnectionError / StoreUnavailableError when a dataset, the store or the Hub cannot be reached."""
    check_tracking(cfg.train)  # train.trainer_args against trl's SFTConfig, train.report_to's packages installed
    train = read_dataset(newest_object(cfg.data.uri).uri)  # data.uri, or the newest file under that folder
    eval_dataset = read_dataset(cfg.data.eval_uri) if cfg.data.eval_uri else None
    plan = plan_rows(train, eval_dataset, cfg.prompt, cfg.data)
    check_gate_measurable(cfg.hub, plan.labels, plan.why_no_labels)
    check_output_dir(cfg.output, cfg.data)
    open_store(cfg.output.store).check()
    # the backend's module first: Unsloth must be imported before the tokenizer below imports transformers
    choose_backend(cfg.model.backend)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.revision)
    prompts = build_prompts(train, eval_dataset, cfg.prompt, cfg.data, cfg.infer, tokenizer, cfg.model)
    check_target_modules(cfg.model, cfg.lora)
    return prompts
