"""What load-4bit-model hands to attach-LoRA, train and smoke-infer inside one flow run.

Live objects: never persisted as Prefect results, never cached (their tasks use NO_CACHE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LiveModel:
    model: Any
    tokenizer: Any
    backend: str  # "unsloth" | "transformers"
    device: str  # "cuda" | "cpu"
    dtype: Any  # torch.dtype
    model_path: str  # what from_pretrained loaded
    attn_implementation: str | None = None
    gradient_checkpointing: str = "auto"  # lora.gradient_checkpointing, once attach-LoRA has run
