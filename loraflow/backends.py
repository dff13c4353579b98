"""The backends behind one small interface: chosen once per run, then carried with the live model.

| backend        | runs on                                              | loads with            | LoRA by                  | packing                | label scoring                      |
|----------------|------------------------------------------------------|-----------------------|--------------------------|------------------------|------------------------------------|
| `unsloth`      | CUDA, Unsloth installed                              | FastLanguageModel     | Unsloth's get_peft_model | yes (varlen attention) | one row per (prompt, label)        |
| `transformers` | CUDA (bitsandbytes NF4 when load_in_4bit), or a CPU  | AutoModelForCausalLM  | PEFT                     | with flash-attention   | each prompt once, labels from its cache |

Each backend is a module, loraflow/backend_<name>.py, with the functions of `Backend`. The Unsloth one is the only
module that imports Unsloth; `backend_named("unsloth")` imports it, and the flow asks for it before anything imports
transformers, TRL or PEFT (the order Unsloth needs to patch them). What differs between backends lives in those two
modules; the code here and in training/inference calls `live.backend.<function>` and never asks which one it has.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from loraflow.config import LoraSettings, ModelConfig
from loraflow.errors import ConfigError
from loraflow.logs import run_logger
from loraflow.models import resolve_model
from loraflow.store import open_store
from loraflow.timeline import mark

BACKENDS = ("unsloth", "transformers")


class Backend(Protocol):
    """What a backend module provides (loraflow/backend_transformers.py, loraflow/backend_unsloth.py)."""

    NAME: str
    SUPPORTS_PACKING: bool  # its attention keeps packed (padding-free) examples apart

    def load(self, path: str, model: ModelConfig, dtype: Any) -> "LiveModel": ...
    def attach_lora(self, live: "LiveModel", lora: LoraSettings, max_seq_length: int, seed: int) -> Any: ...
    def prepare_for_training(self, live: "LiveModel", micro_batch_tokens: int) -> str: ...
    def force_gradient_checkpointing(self, live: "LiveModel") -> None: ...
    def prepare_for_inference(self, live: "LiveModel") -> None: ...
    def loss_type(self, live: "LiveModel", completion_only_loss: bool) -> str: ...
    def label_log_likelihoods(
        self, live: "LiveModel", prompts: list[list[int]], completions: list[list[int]]
    ) -> list[list[float]]: ...


@dataclass
class LiveModel:
    """A loaded model inside one process: what load-4bit-model hands to attach-LoRA, train and smoke-infer.

    Never persisted as a Prefect result, never cached (those steps use NO_CACHE)."""

    model: Any
    tokenizer: Any
    backend: Backend  # the module that loaded it, and that attaches, trains and scores it
    device: str  # "cuda" | "cpu"
    dtype: Any  # torch.dtype
    model_path: str  # what from_pretrained loaded
    attn_implementation: str | None = None
    gradient_checkpointing: str = "auto"  # lora.gradient_checkpointing, once attach-LoRA has run
    checkpointing_decision: str = ""  # what training chose, with its numbers (prepare_for_training)


def local_device_index() -> int:
    """The GPU this process trains on: its local rank when a launcher (accelerate, torchrun) started it, else 0."""
    return int(os.environ.get("LOCAL_RANK", 0))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def visible_gpus() -> int:
    """GPUs this worker may use: those CUDA_VISIBLE_DEVICES lists, else every GPU torch sees; 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([device for device in listed.split(",") if device.strip()])
    return torch.cuda.device_count()


def resolve_world_size(num_devices: str | int) -> int:
    """train.num_devices -> ranks: auto = every visible GPU (1 on a CPU); a number is checked against the GPUs.

    On a CPU a number > 1 runs that many gloo ranks (how CI tests this path). Raises ConfigError when more GPUs
    are asked for than the worker sees."""
    gpus = visible_gpus()
    if num_devices == "auto":
        return max(gpus, 1)
    if gpus and num_devices > gpus:
        raise ConfigError(f"train.num_devices: {num_devices} asked for, {gpus} GPU(s) visible to this worker "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return num_devices


def check_backend(requested: str) -> None:
    """Raise ConfigError when `requested` (model.backend) cannot run on this machine; `auto` always can."""
    if requested != "unsloth":
        return
    if not cuda_available():
        raise ConfigError("model.backend: unsloth needs a CUDA GPU; use backend auto or transformers on this machine")
    if importlib.util.find_spec("unsloth") is None:
        raise ConfigError("model.backend: unsloth is not installed (pip install 'loraflow[gpu]')")


def choose_backend(requested: str) -> str:
    """The run's backend name, once per run. auto: Unsloth on CUDA where it is installed, else transformers
    (bitsandbytes on CUDA, full precision on a CPU). Its module is imported now: Unsloth must load before anything
    imports transformers, TRL or PEFT. Raises ConfigError for a backend this machine cannot run."""
    check_backend(requested)
    if requested == "auto":
        requested = "unsloth" if cuda_available() and importlib.util.find_spec("unsloth") is not None else "transformers"
    backend_named(requested)
    mark("backend_imported")
    return requested


def backend_named(name: str) -> Backend:
    """The backend module of a chosen name (importing Unsloth for `unsloth`)."""
    if name not in BACKENDS:
        raise ConfigError(f"model.backend: unknown backend {name!r}; use one of auto, {', '.join(BACKENDS)}")
    return importlib.import_module(f"loraflow.backend_{name}")  # type: ignore[return-value]


def resolve_dtype(requested: str) -> Any:
    """auto = bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if not cuda_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(model: ModelConfig, backend: str) -> LiveModel:
    """The base model and tokenizer by the chosen backend; logs parameters, dtype, device and load time."""
    started = time.perf_counter()
    live = backend_named(backend).load(resolve_model(model.name), model, resolve_dtype(model.dtype))
    if live.tokenizer.pad_token is None:
        live.tokenizer.pad_token = live.tokenizer.eos_token
    params = sum(p.numel() for p in live.model.parameters())
    mark("model_loaded")
    run_logger().info(
        "load-4bit-model: %s via %s on %s, dtype %s, 4-bit %s, %.1fM parameters, loaded in %.1f s",
        model.name, backend, live.device, str(live.dtype).removeprefix("torch."),
        model.load_in_4bit and live.device == "cuda", params / 1e6, time.perf_counter() - started,
    )
    return live


def attach_lora(live: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int, init_adapter: Any = None) -> LiveModel:
    """LoRA adapters on the live base model (only they train); logs the trainable-parameter share. With
    `init_adapter` (a loraflow.lineage.ParentAdapter) the adapters start from its weights instead of fresh."""
    model = live.backend.attach_lora(live, lora, max_seq_length, seed)
    if init_adapter is not None:
        from loraflow.lineage import load_parent_weights

        load_parent_weights(model, init_adapter, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    mark("lora_attached")
    run_logger().info(
        "attach-LoRA: r=%d alpha=%d on %s; trainable %.3fM of %.1fM parameters (%.3f%%)",
        lora.r, lora.alpha, ",".join(lora.target_modules), trainable / 1e6, total / 1e6, 100 * trainable / total,
    )
    return replace(live, model=model, gradient_checkpointing=lora.gradient_checkpointing)


def load_adapter(model: ModelConfig, backend: str, store_uri: str, adapter_key: str) -> LiveModel:
    """The base model with a published adapter from the store on it (PEFT's from_pretrained), ready to generate."""
    from peft import PeftModel

    live = load_model(model, backend)
    with tempfile.TemporaryDirectory(prefix="loraflow-adapter-") as folder:
        open_store(store_uri).get_folder(adapter_key, Path(folder))
        peft_model = PeftModel.from_pretrained(live.model, folder)
    run_logger().info("loaded the published adapter %s onto %s", adapter_key, model.name)
    return replace(live, model=peft_model)


# The model that trained an adapter, kept for the next step of the same process (smoke-infer), so the adapter is not
# loaded a second time. Live models never travel as Prefect parameters or results; a step in another process (or a
# run that found the adapter already published) loads the base and the adapter from the store instead.
_TRAINED_HERE: dict[str, LiveModel] = {}


def keep_trained(adapter_key: str, live: LiveModel) -> None:
    """Remember the live model that has just published `adapter_key` in this process."""
    _TRAINED_HERE[adapter_key] = live


def take_trained(adapter_key: str) -> LiveModel | None:
    """The live model holding `adapter_key` that a step of this process kept (handed over once), or None."""
    return _TRAINED_HERE.pop(adapter_key, None)


def open_trained(model: ModelConfig, backend: str, store_uri: str, adapter_key: str) -> LiveModel:
    """The model holding the adapter `adapter_key`: the one that trained it in this process (handed over once),
    else the base model with the adapter loaded from the store."""
    live = take_trained(adapter_key)
    return live if live is not None else load_adapter(model, backend, store_uri, adapter_key)
