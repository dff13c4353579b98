"""load-4bit-model: the base model and tokenizer, by backend.

- unsloth: FastLanguageModel.from_pretrained (CUDA, Unsloth installed)
- transformers on CUDA: bitsandbytes NF4 when load_in_4bit (QLoRA is a field, not a second code path)
- transformers on CPU: full precision; 4-bit needs CUDA, said once in the log
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.builders import build_bnb_config, choose_backend, cuda_available, resolve_dtype
from loraflow.config import ModelConfig
from loraflow.live_model import LiveModel
from loraflow.logs import run_logger
from loraflow.models import resolve_model


def load_model(cfg: ModelConfig) -> LiveModel:
    """Load the base model for training; logs parameters, dtype, device and load time."""
    log = run_logger()
    started = time.perf_counter()
    backend = choose_backend(cfg.backend)
    dtype = resolve_dtype(cfg.dtype)
    path = resolve_model(cfg.name)
    if backend == "unsloth":
        from loraflow import unsloth_backend

        model, tokenizer = unsloth_backend.load(path, cfg, dtype)
        live = LiveModel(model, tokenizer, backend, "cuda", dtype, path)
    else:
        live = load_with_transformers(path, cfg, dtype)
    if live.tokenizer.pad_token is None:
        live.tokenizer.pad_token = live.tokenizer.eos_token
    params = sum(p.numel() for p in live.model.parameters())
    log.info(
        "load-4bit-model: %s via %s on %s, dtype %s, 4-bit %s, %.1fM parameters, loaded in %.1f s",
        cfg.name, backend, live.device, str(dtype).removeprefix("torch."),
        cfg.load_in_4bit and live.device == "cuda", params / 1e6, time.perf_counter() - started,
    )
    return live


def load_with_transformers(path: str, cfg: ModelConfig, dtype: object) -> LiveModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_cuda = cuda_available()
    quantize = cfg.load_in_4bit and on_cuda
    if cfg.load_in_4bit and not on_cuda:
        run_logger().warning("load-4bit-model: 4-bit loading needs CUDA; loading in full precision on the CPU")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=cfg.revision,
        dtype=dtype,
        quantization_config=build_bnb_config(dtype) if quantize else None,
        device_map={"": 0} if on_cuda else None,
        attn_implementation="sdpa",
    )
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision)
    return LiveModel(model, tokenizer, "transformers", "cuda" if on_cuda else "cpu", dtype, path, "sdpa")


@task(name="load-4bit-model", cache_policy=NO_CACHE, persist_result=False)
def load_model_task(cfg: ModelConfig) -> LiveModel:
    """Load the base model (a live object: never cached or persisted)."""
    return load_model(cfg)
