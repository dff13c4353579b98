"""A model's architecture without its weights: which layers LoRA can target, checked before anything loads.

The model is built from its config.json alone on PyTorch's meta device (accelerate's `init_empty_weights`): every
module exists, no parameter holds memory, nothing is downloaded but the config. An 8B Llama builds in about a second.
"""

from __future__ import annotations

from typing import Any

from loraflow.config import LoraSettings, ModelConfig
from loraflow.errors import ConfigError
from loraflow.models import resolve_model

def empty_model(model: ModelConfig) -> Any:
    """The model's modules from its config, with no weights (meta tensors). Raises ConfigError when the config
    cannot be read (no such folder or Hub model); a network failure stays a ConnectionError."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraflow.retries import is_transient

    try:
        config = AutoConfig.from_pretrained(resolve_model(model.name), revision=model.revision)
    except OSError as exc:
        if is_transient(exc):
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"model.name: cannot read the config of {model.name}: {first_line}"
        if "couldn't connect" in first_line.lower():
            raise ConnectionError(message) from None
        raise ConfigError(message) from None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def lora_layers(module_tree: Any) -> dict[str, str]:
    """The layers LoRA can wrap (linear layers, embeddings): full module name -> layer type."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return {name: type(module).__name__ for name, module in module_tree.named_modules() if isinstance(module, kinds)}


def check_target_modules(model: ModelConfig, lora: LoraSettings) -> None:
    """Every lora.target_modules entry names a layer of the model that LoRA can wrap, found from the config alone,
    before any weight loads. PEFT's rule: an entry matches a module whose full name is it or ends in '.' + it.
    Raises ConfigError listing the entries that match no such layer and the linear layers' names."""
    tree = empty_model(model)
    layers = lora_layers(tree)
    missing = [target for target in lora.target_modules
               if not any(name == target or name.endswith("." + target) for name in layers)]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, kind in layers.items() if kind != "Embedding"})
        raise ConfigError(
            f"lora.target_modules: {', '.join(repr(m) for m in missing)} names no linear layer of {model.name} "
            f"({type(tree).__name__}); its linear layers are {', '.join(linear)}"
        )
