"""The transformers backend: AutoModelForCausalLM and PEFT, on CUDA (bitsandbytes NF4 when load_in_4bit) or a CPU.

On a CPU the model loads in full precision, with one warning that 4-bit loading needs CUDA. QLoRA is a field
(`model.load_in_4bit`), not a second code path.
"""

from __future__ import annotations

import sys
from typing import Any

from loraflow.backends import LiveModel, cuda_available, local_device_index
from loraflow.builders import build_bnb_config, build_peft_config
from loraflow.config import LoraSettings, ModelConfig
from loraflow.logs import run_logger
from loraflow.scoring import shared_prompt_log_likelihoods

NAME = "transformers"
SUPPORTS_PACKING = False  # sdpa attention (what load asks for) would let packed examples see each other
ATTENTION = "sdpa"


def load(path: str, model: ModelConfig, dtype: Any) -> LiveModel:
    """Base model and tokenizer from `path` (a folder or Hub id), on this rank's GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = cuda_available()
    quantize = model.load_in_4bit and on_cuda
    if model.load_in_4bit and not on_cuda:
        run_logger().warning("load-4bit-model: 4-bit loading needs CUDA; loading in full precision on the CPU")
    loaded = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model.revision,
        dtype=dtype,
        quantization_config=build_bnb_config(dtype) if quantize else None,
        device_map={"": local_device_index()} if on_cuda else None,
        attn_implementation=ATTENTION,
    )
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model.revision)
    return LiveModel(loaded, tokenizer, sys.modules[__name__], "cuda" if on_cuda else "cpu", dtype, path, ATTENTION)


def attach_lora(live: LiveModel, lora: LoraSettings, max_seq_length: int, seed: int) -> Any:
    """PEFT's get_peft_model; 4-bit weights are prepared for k-bit training first. "unsloth" and "auto"
    checkpointing mean plain (non-reentrant) checkpointing here."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(seed)  # LoRA's A matrices are random: same seed, same start
    checkpointing = lora.gradient_checkpointing != "false"
    if getattr(live.model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(live.model, use_gradient_checkpointing=checkpointing)
    else:
        model = live.model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return get_peft_model(model, build_peft_config(lora))


def prepare_for_training(live: LiveModel, micro_batch_tokens: int) -> str:
    """Nothing to decide: attach_lora already set checkpointing as configured (auto means on here)."""
    return "off (as configured)" if live.gradient_checkpointing == "false" else "on (PEFT's)"


def force_gradient_checkpointing(live: LiveModel) -> None:
    """Checkpointing is on already unless configured off, and then it stays as configured."""


def prepare_for_inference(live: LiveModel) -> None:
    live.model.eval()


def loss_type(live: LiveModel, completion_only_loss: bool) -> str:
    """TRL's loss: its chunked head ("chunked_nll") projects only the labelled tokens onto the vocabulary, in chunks
    recomputed under checkpointing; "nll" is the model's own, over every position.

    On a GPU always chunked (never the logits of a 128k vocabulary at once). On a CPU chunked only when the loss is
    on the completions (`completion_only_loss`): the prompt tokens then never reach the vocabulary, which outweighs
    the recompute (train() 1.3x faster for tiny-cpu, 1.2x for SmolLM2-135M, same losses to 1e-6: docs/benchmarks.md,
    "The loss on a CPU"); with the loss on every token the recompute is all that is left (7.4 s against 5.3 s a
    step for SmolLM2-135M, batch 8 x ~90 tokens, on this workplace's 2 cores)."""
    return "chunked_nll" if live.device == "cuda" or completion_only_loss else "nll"


def label_log_likelihoods(live: LiveModel, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Each prompt runs once; every label continues from its cached keys and values."""
    return shared_prompt_log_likelihoods(live, prompts, completions)
