"""The flow's one parameter: a typed, validated description of a fine-tuning job.

Every section is a pydantic model, so Prefect validates a run's parameters and renders them as a form.
Rules that span fields live in validators here and are checked once, at the flow's door; tasks receive
their section and trust it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraflow import tracking
from loraflow.errors import ConfigError

NOTEBOOK_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILTIN_TEMPLATES = ("alpaca", "alpaca_zh", "chat")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    uri: str = Field(
        description="Training data: local .json/.jsonl/.csv/.parquet, s3://, http(s)://, or a hub id; or a folder (a "
        "local directory, or an s3:// prefix ending in /): its newest data file (last-modified, ties by key)."
    )
    eval_uri: str | None = Field(
        None, description="Separate eval file; when unset, eval_fraction is split off. A fixed eval file keeps the "
        "scores of successive runs (and of the champion) comparable."
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out when eval_uri is unset.")
    seed: int = Field(3407, description="Seed of the train/eval split.")
    ignore_fields: list[str] = Field(
        default_factory=list,
        description="Record fields to leave out of training on purpose (ids, sources). Any other field that holds data "
        "and that the template or the record shape does not use stops the run.",
    )


class PromptConfig(Section):
    template: str = Field(
        "alpaca",
        description="alpaca | alpaca_zh | chat (tokenizer's chat template) | a custom string with "
        "{instruction}, {input} and {output}.",
    )

    @field_validator("template")
    @classmethod
    def _custom_template_has_fields(cls, template: str) -> str:
        if template in BUILTIN_TEMPLATES:
            return template
        missing = [f for f in ("{instruction}", "{output}") if f not in template]
        if missing:
            raise ValueError(
                f"a custom template must contain {' and '.join(missing)} (or be one of {', '.join(BUILTIN_TEMPLATES)})"
            )
        if template.count("{output}") > 1:
            raise ValueError("{output} appears more than once: the answer would be trained on twice in every text")
        if not template.endswith("{output}"):
            after = template[template.index("{output}") + len("{output}"):]
            hint = (" (a YAML `template: |` block ends with a newline: write `template: |-`)" if not after.strip()
                    else "")
            raise ValueError(f"a custom template must end with {{output}}: generation continues from there, and the "
                             f"answer ends with EOS; this one has {after!r} after it{hint}")
        before = template[: template.index("{output}")]
        if before and before[-1].isspace() and before[-1] not in "\r\n":
            # Tokenizers attach a space (or tab) to the word after it: " positive" is one token. The prompt would end
            # in a lone space token the model never sees before an answer, so prompt + answer tokens differ from the
            # training text's (TRL warns per row) and generation starts from the wrong place.
            shown = before.rstrip().splitlines()[-1][-20:] if before.strip() else ""
            raise ValueError(
                f"whitespace right before {{output}} ({shown + before[len(before.rstrip()):] + '{output}'!r}) splits the "
                "answer's first token between prompt and answer (tokenizers attach the space to the word after it); "
                f"end the prompt without it ({shown + '{output}'!r}) or with a newline ({shown + chr(10) + '{output}'!r})"
            )
        unknown = set(re.findall(r"\{(\w*)\}", template)) - {"instruction", "input", "output"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{instruction}}, {{input}}, {{output}}")
        return template


class ModelConfig(Section):
    name: str = Field(description="Hub id, local folder, local .gguf file, or a built-in loraflow:<name>.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    load_in_4bit: bool = Field(True, description="QLoRA: NF4 base weights (needs CUDA).")
    max_seq_length: int = Field(2048, gt=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bf16 where supported, else fp16 on GPU, fp32 on CPU."
    )
    init_adapter: str | None = Field(
        None,
        description="Start LoRA from an existing adapter instead of fresh (continued fine-tuning): an alias of this "
        "model line (`production`, `candidate`), a store key (`adapters/<key>`), or a Hub repo (`hf://owner/name` or "
        "`hf://owner/name@revision`). Its LoRA shape must match the lora section. An alias that points nowhere yet "
        "starts fresh.",
    )


class LoraSettings(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(default_factory=lambda: list(NOTEBOOK_TARGET_MODULES), min_length=1)
    gradient_checkpointing: Literal["auto", "unsloth", "true", "false"] = Field(
        "auto",
        description="auto = Unsloth's offloaded checkpointing (PEFT's on transformers), off for a run whose largest "
        "micro-batch's activations fit the GPU's memory budget, measured when training starts (Unsloth backend; "
        "loraflow/memory.py)",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads `true`/`false` as booleans; the field keeps one spelling.
        return str(value).lower() if isinstance(value, bool) else value


def resolved_optimizer(name: str, on_cuda: bool) -> str:
    """The Hugging Face `optim` name that train.optimizer `name` trains with; any name but "auto" is kept.

    auto = adamw_torch_fused on CUDA, adamw_torch on a CPU. Only the adapter is trained, so its optimizer state is
    small in 32-bit (8B at r=16 on 7 modules: 42 M parameters, 2 × 4 B × 42 M = 336 MB of Adam moments; 84 MB in
    bitsandbytes' 8-bit), and the fused kernel updates all 448 adapter tensors in a few launches where the
    notebook's adamw_8bit launches one kernel per tensor from Python: on an 8B step of ~0.25 s that host time
    shows: 1.10× the tokens/s of adamw_8bit on the notebook's 8B workload (docs/benchmarks.md, run Q).
    """
    if name != "auto":
        return name
    return "adamw_torch_fused" if on_cuda else "adamw_torch"


class TrainSettings(Section):
    per_device_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    max_steps: int | None = Field(60, gt=0, description="Stop after this many optimizer steps; null to train by epochs.")
    num_epochs: float | None = Field(None, gt=0, description="Passes over the data; alone, it unsets max_steps' default.")
    learning_rate: float = Field(2e-4, gt=0)
    optimizer: str = Field(
        "auto", description="auto = adamw_torch_fused on CUDA, adamw_torch on CPU (resolved_optimizer); or any HF optim name."
    )
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: str = "linear"
    seed: int = 3407
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(10000, gt=0)
    save_total_limit: int = Field(2, gt=0)
    timeout_seconds: int | None = Field(
        None, gt=0, description="Fail the train step after this long (a hung GPU or data loader); None = no limit."
    )
    completion_only_loss: bool = Field(
        False,
        description="Loss on the responses only: an instruction row's output, a conversation's last assistant turn "
        "(earlier turns, answers included, are context). Off: every token of the text, as the notebook trains.",
    )
    packing: Literal["auto", "true", "false"] = Field(
        "auto", description="Padding-free packing of short examples; auto = on where the backend supports it."
    )
    num_devices: Literal["auto"] | int = Field(
        "auto",
        description="GPUs (ranks) one run trains on, data parallel: auto = every GPU the worker sees "
        "(CUDA_VISIBLE_DEVICES, else all; 1 on a CPU), or a number (on a CPU: that many gloo ranks). The effective "
        "batch stays per_device_batch_size × gradient_accumulation_steps: the accumulation is divided among the ranks.",
    )
    ddp_timeout_seconds: int = Field(
        600, gt=0, description="How long a rank waits in a collective for the others before the run fails.")
    report_to: list[str] = Field(
        default_factory=list,
        description="Trackers that get the training metrics: transformers' integrations (tensorboard, mlflow, wandb, "
        "...), each configured by its own environment (MLFLOW_TRACKING_URI, WANDB_MODE, ...). Default none.",
    )
    trainer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other trl SFTConfig argument (max_grad_norm, neftune_noise_alpha, lr_scheduler_kwargs, ...), "
        "applied after loraflow's own settings; part of the train cache key. Arguments loraflow sets are refused.",
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value

    # Names and owned keys are checked here; trainer_args' names and types against SFTConfig by
    # tracking.check_tracking at the CLI's preflight and the flow's door (importing trl takes seconds).
    _report_to_list = field_validator("report_to", mode="before")(tracking.report_to_list)
    _known_trackers = field_validator("report_to")(tracking.check_tracker_names)
    _not_owned = field_validator("trainer_args")(tracking.refuse_owned)

    @field_validator("num_devices")
    @classmethod
    def _positive_devices(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or a number ≥ 1")
        return value

    @model_validator(mode="before")
    @classmethod
    def _epochs_or_steps(cls, data: Any) -> Any:
        """num_epochs given alone trains by epochs (max_steps' default of 60 would otherwise win, as max_steps does
        in the trainer); given beside a max_steps, one of them would be ignored: an error, not a silent choice."""
        if not isinstance(data, dict) or data.get("num_epochs") is None:
            return data
        if "max_steps" not in data:
            return {**data, "max_steps": None}
        if data["max_steps"] is not None:
            raise ValueError(f"max_steps ({data['max_steps']}) and num_epochs ({data['num_epochs']}) are both set, and "
                             "max_steps would win: set train.max_steps=null to train by epochs")
        return data

    @model_validator(mode="after")
    def _has_a_length(self) -> "TrainSettings":
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("set train.max_steps or train.num_epochs")
        return self


class InferPrompt(Section):
    instruction: str = Field(min_length=1)
    input: str = ""


class InferSettings(Section):
    prompts: list[InferPrompt] = Field(default_factory=list)
    max_new_tokens: int = Field(64, gt=0)
    max_eval_examples: int = Field(64, ge=0, description="How many eval rows smoke-infer generates for.")
    label_scoring: Literal["likelihood", "greedy"] = Field(
        "likelihood",
        description="How accuracy on a closed label set is scored, for both models alike: `likelihood` = the label "
        "(then EOS) the model finds most likely after the prompt; `greedy` = the first line of the greedy answer.",
    )
    timeout_seconds: int | None = Field(
        None, gt=0, description="Fail smoke-infer, and promote's scoring of the champion, after this long; None = no limit."
    )


GGUF_UNAVAILABLE = (
    "loraflow has no GGUF converter that runs offline: llama.cpp's convert_hf_to_gguf.py is not part of the "
    "`gguf` package (that only reads and writes the file format) and llama-cpp-python compiles llama.cpp from "
    "source. Set output.save_merged: true and convert <output.dir>/merged with llama.cpp: "
    "python convert_hf_to_gguf.py <output.dir>/merged --outtype f16"
)


class OutputSettings(Section):
    dir: str = Field("outputs/run", description="Where the adapter, tokenizer and summary.json are written.")
    store: str = Field(".loraflow/store", description="Artifact and result store: a local folder or s3://bucket/prefix.")
    save_merged: bool = Field(
        False,
        description="Also save the base model with the adapter merged in, 16-bit safetensors, to <dir>/merged "
        "(and the store): loads with AutoModelForCausalLM.from_pretrained, no PEFT needed.",
    )
    save_gguf: bool = Field(False, description="GGUF export: not available offline; see the error it gives.")
    overwrite: bool = Field(
        False,
        description="Replace an output.dir that holds files loraflow did not write (they are deleted). Off: such a "
        "folder stops the run before anything loads; a folder an earlier run wrote is replaced whole either way.",
    )

    @field_validator("save_gguf")
    @classmethod
    def _gguf_needs_a_converter(cls, save_gguf: bool) -> bool:
        if save_gguf:
            raise ValueError(GGUF_UNAVAILABLE)
        return save_gguf


class HubSettings(Section):
    repo_id: str | None = Field(None, description="Push to this Hub repo; the token comes from the hf-token block or HF_TOKEN.")
    private: bool = True
    license: str | None = Field(None, description="The adapter's license for the model card (a Hub license id, e.g. "
                                "apache-2.0); usually the base model's.")
    min_eval_accuracy: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Quality gate: fail the run, and push nothing, when eval accuracy is below this (0..1).",
    )
    require_beat_base: bool = Field(
        False, description="Quality gate: fail the run, and push nothing, unless eval accuracy beats the base model's."
    )
    push_candidates: bool = Field(
        True, description="An adapter that is not promoted goes to the branch candidates/<flow run id> (false: it is "
        "not pushed). Only a promoted adapter reaches main, tagged run-<flow run id>."
    )

    @property
    def gate_on(self) -> bool:
        return self.min_eval_accuracy is not None or self.require_beat_base


ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
LINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PromoteSettings(Section):
    """Champion/challenger: the new adapter against the one the alias points at, on the same eval examples."""

    enabled: bool = Field(True, description="Off: no alias moves and nothing is compared; push-hub goes to main.")
    line: str | None = Field(
        None, description="The model line whose aliases this run reads and moves (store key aliases/<line>.json); "
        "default: hub.repo_id with / as --, else the model name with anything but letters, digits, . _ - as -."
    )
    alias: str = Field("production", description="The alias the challenger must beat, and moves when it does.")
    min_improvement: float = Field(
        0.0, ge=0.0, le=1.0,
        description="The challenger's accuracy must exceed the champion's, by at least this much (0..1).",
    )
    require_significance: bool = Field(
        True, description="Also require a paired test on the same eval examples (McNemar's exact test) at `alpha`."
    )
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="Significance level of the paired test (two-sided).")

    @field_validator("alias")
    @classmethod
    def _alias_name(cls, alias: str) -> str:
        if not ALIAS_NAME.match(alias):
            raise ValueError("an alias is lower-case letters, digits, - and _, starting with a letter")
        return alias

    @field_validator("line")
    @classmethod
    def _line_name(cls, line: str | None) -> str | None:
        if line is not None and not LINE_NAME.match(line):
            raise ValueError("a line name is letters, digits, . _ and - (it becomes the store key aliases/<line>.json)")
        return line


def default_line(repo_id: str | None, model_name: str) -> str:
    """hub.repo_id with / as -- (me/adapter -> me--adapter), else the model name made key-safe."""
    if repo_id:
        return repo_id.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"


class FinetuneConfig(Section):
    data: DataConfig
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    model: ModelConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    infer: InferSettings = Field(default_factory=InferSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    promote: PromoteSettings = Field(default_factory=PromoteSettings)

    @property
    def line(self) -> str:
        """The model line: promote.line, else derived from hub.repo_id or the model name (default_line)."""
        return self.promote.line or default_line(self.hub.repo_id, self.model.name)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "FinetuneConfig":
        if self.data.eval_uri is None and self.data.eval_fraction == 0.0 and not self.infer.prompts:
            raise ValueError("nothing for smoke-infer to try: set data.eval_uri, data.eval_fraction > 0 or infer.prompts")
        no_eval_rows = self.data.eval_uri is None and self.data.eval_fraction == 0.0
        if self.hub.gate_on and (no_eval_rows or self.infer.max_eval_examples == 0):
            raise ValueError(
                "hub.min_eval_accuracy / hub.require_beat_base score the eval split: set data.eval_uri or "
                "data.eval_fraction > 0, and infer.max_eval_examples > 0"
            )
        return self


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML file, then partial overrides (dicts or `section.key=value` strings), validated once.


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_assignment(assignment: str) -> dict[str, Any]:
    """`train.max_steps=5` -> {"train": {"max_steps": 5}}; the value is read as YAML (numbers, lists, null)."""
    path, sep, raw = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:  # not YAML, so a plain string: e.g. a template "{instruction}{input}"
        value = raw
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans several, with a caret drawing)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file (deployments/configs/ holds the shipped ones)") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as a UTF-8 text file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, ...), got {type(loaded).__name__}")
    return loaded


def build_config(raw: dict[str, Any], source: str = "config") -> FinetuneConfig:
    """Validate a raw dict; errors name the source and each offending field."""
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            # pydantic prefixes a validator's own message with "Value error, ": the message is ours, say it plainly
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
            f"{closest_key_hint(err)}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def closest_key_hint(error: Any) -> str:
    """'; did you mean max_steps?' for a key no section has (pydantic's extra_forbidden) that is close to one it
    has (difflib's ratio ≥ 0.6, its default); '' otherwise."""
    if error["type"] != "extra_forbidden":
        return ""
    import difflib

    model: Any = FinetuneConfig
    for part in error["loc"][:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def load_config(
    path: str | Path | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> FinetuneConfig:
    raw = read_config_file(path) if path else {}
    for override in overrides or []:
        raw = deep_merge(raw, override)
    return build_config(raw, source=str(path) if path else "config")
