"""Training throughput on one GPU: the project's train path (Unsloth and transformers backends) against a bare
Unsloth loop, on random-initialised Llama-3-8B- and Llama-3.2-1B-shaped models, plus the classic notebook's
short-example workload with and without packing.

Run on the GPU machine (see docs/benchmarks.md for the device command):
    source bench/gpu_env.sh; python3 bench/train_throughput.py --out $OUT

One run does, per shape (each measurement in its own process, so Unsloth's patching of transformers never
reaches the transformers backend and every path pays its own import, load and compilation):
    build        random bf16 model saved to local disk once (the project loads it by path, like a Hub id)
    bare         FastLanguageModel.from_pretrained + get_peft_model + a plain loop (the reference)
    unsloth      the project's load_model -> attach_lora -> train_adapter (TRL SFTTrainer) with backend unsloth,
                 then the notebook workload (960 examples of 61-151 tokens, batch 4 × accumulation 4) packed
                 and unpacked, with held-out loss after each
    transformers the same train path with backend transformers (bitsandbytes NF4, sdpa, PEFT checkpointing)
    cli          (first shape only) `loraflow run` on the notebook workload: time from start to the first step
Every throughput figure is steady state: `--warmup` steps, then `--steps` timed steps, each CUDA-synchronised.
MFU = tokens/s × 6 × parameters / 790e12 (the bf16 matrix rate measured on this workplace's H200s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 790e12  # bf16 dense matrix product measured on the H200 (KINDS.md), not the datasheet's 990
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B: 8.03e9 parameters
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # Llama-3.2-1B: 1.24e9 parameters (tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # for dry runs of this script on a CPU (backend transformers only)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}
NOTEBOOK_EXAMPLES, NOTEBOOK_HELD_OUT = 960, 64
TOKENIZER = "smollm2-135m-instruct"  # carried in .gpuassets; its ids (< 49,152) fit the 128,256-row embedding


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tokenizer_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE_DIR", Path.home() / ".cache" / "loraflow")) / "models" / TOKENIZER


# --- inputs ---------------------------------------------------------------------------------------------------


def exact_length_texts(tokenizer: Any, count: int, length: int, seed: int) -> list[str]:
    """Texts of exactly `length` tokens each (EOS included): random words, cut and re-checked."""
    rng = random.Random(seed)
    # sorted: get_vocab()'s order differs between processes, and the texts must not
    words = sorted(w for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha() and len(w) > 3)
    texts = []
    while len(texts) < count:
        text = " ".join(rng.choice(words)[1:] for _ in range(length * 2))
        cut = length - 1
        for _ in range(20):  # decode(ids[:n]) can re-tokenize to n ± 1: move the cut until it is exact
            candidate = tokenizer.decode(tokenizer(text)["input_ids"][:cut]) + tokenizer.eos_token
            have = len(tokenizer(candidate)["input_ids"])
            if have == length:
                texts.append(candidate)
                break
            cut += length - have
        # else: this text's cut oscillates around the length (seen once at 2,048 on the H200): draw another
    return texts


def notebook_rows(tokenizer: Any, count: int, seed: int) -> list[dict[str, str]]:
    """Sentiment rows like the notebook's dataset.json: whole texts of 61-151 tokens under the template below."""
    from loraflow.templates import render

    demo = json.loads((ROOT / "data" / "demo" / "sentiment_zh.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        base = rng.choice(demo)
        target = rng.randint(61, 151)
        text_input = base["input"]
        row = {"instruction": base["instruction"], "input": text_input, "output": base["output"]}
        while len(tokenizer(render(NOTEBOOK_TEMPLATE, row, tokenizer))["input_ids"]) < target:
            row["input"] += "，" + rng.choice(demo)["input"]
        while len(row["input"]) > 1 and len(tokenizer(render(NOTEBOOK_TEMPLATE, row, tokenizer))["input_ids"]) > target:
            row["input"] = row["input"][:-1]
        rows.append(row)
    return rows


# The notebook's rows are 61-151 Llama-3 tokens under alpaca_zh; SmolLM2's tokenizer spends ~110 tokens on that
# template alone, so the rows here use a short template and longer inputs to keep the same token lengths.
NOTEBOOK_TEMPLATE = "{instruction}\n{input}\n答:{output}"


def notebook_prompts(tokenizer: Any, data_file: Path) -> Any:
    from loraflow.config import DataConfig, InferSettings, PromptConfig
    from loraflow.data import read_dataset
    from loraflow.prompts import format_prompts

    data = DataConfig(uri=str(data_file), eval_fraction=NOTEBOOK_HELD_OUT / (NOTEBOOK_EXAMPLES + NOTEBOOK_HELD_OUT))
    prompts = format_prompts(read_dataset(str(data_file)), None, PromptConfig(template=NOTEBOOK_TEMPLATE), data,
                             InferSettings(), tokenizer)
    assert len(prompts.train_texts) == NOTEBOOK_EXAMPLES, len(prompts.train_texts)
    lengths = [len(ids) for ids in tokenizer(prompts.train_texts)["input_ids"]]
    log(f"notebook rows: {len(lengths)} of {min(lengths)}-{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.1f}")
    return prompts, sum(lengths) / len(lengths)


def write_notebook_data(work: Path) -> Path:
    from transformers import AutoTokenizer

    path = work / "notebook_dataset.json"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
        rows = notebook_rows(tokenizer, NOTEBOOK_EXAMPLES + NOTEBOOK_HELD_OUT, seed=3407)
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


# --- workers (one process each) --------------------------------------------------------------------------------


def build(shape: str, out: Path) -> dict[str, Any]:
    """A random-initialised Llama of the shape, in bf16, saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    config = LlamaConfig(
        **SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if device() == "cuda" else torch.float32)
    with torch.device(device()):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="4GB")
    tokenizer.save_pretrained(out)
    return {"params": params, "build_and_save_s": time.perf_counter() - started}


def step_figures(step_seconds: list[float], step_tokens: list[int], warmup: int, params: int) -> dict[str, Any]:
    timed_s, timed_tokens = step_seconds[warmup:], step_tokens[warmup:]
    seconds = sum(timed_s)
    tokens_per_s = sum(timed_tokens) / seconds
    return {
        "tokens_per_s": tokens_per_s,
        "s_per_step": seconds / len(timed_s),
        "mfu": tokens_per_s * 6 * params / PEAK_FLOPS,
        "first_step_s": step_seconds[0],
        "steps_timed": len(timed_s),
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
    }


def bare(model_dir: Path, layouts: list[tuple[int, int]], warmup: int, steps: int, params: int) -> dict[str, Any]:
    """The reference: Unsloth's own calls and a plain loop (bf16 autocast, 8-bit AdamW as the project uses)."""
    import torch

    t0 = time.perf_counter()
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel
    import bitsandbytes as bnb

    result: dict[str, Any] = {"import_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=2048,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    result["load_s"] = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=3407, max_seq_length=2048,
    )
    FastLanguageModel.for_training(model)
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    for batch, length in layouts:
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(100, 49000, (batch, length), device="cuda")
        torch.cuda.synchronize()
        last, seconds = time.perf_counter(), []
        for _ in range(warmup + steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss)  # the loop reads its loss every step, as a trainer logging each step does
            torch.cuda.synchronize()
            now = time.perf_counter()
            seconds.append(now - last)
            last = now
        figures = step_figures(seconds, [batch * length] * len(seconds), warmup, params)
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result[f"{batch}x{length}"] = figures
        log(f"bare {batch}x{length}: {figures['tokens_per_s']:.0f} tokens/s, {figures['peak_gib']:.2f} GiB")
    return result


def reset_lora(model: Any, seed: int) -> None:
    """Every LoRA pair back to PEFT's start (A Kaiming-uniform, B zero), seeded: runs start from one point."""
    import torch

    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", True)


def held_out_loss(live: Any, prompts: Any) -> float:
    """Mean token loss over the held-out examples' whole texts (what training minimises), one at a time."""
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in prompts.eval_examples:
            text = example.prompt + example.answer + prompts.eos_token
            ids = live.tokenizer(text, return_tensors="pt")["input_ids"].to(live.model.device)
            with torch.autocast(device(), dtype=live.dtype, enabled=live.device == "cuda"):
                loss = live.model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return total / tokens


NOTEBOOK_VARIANTS = {
    "notebook": "the notebook's configuration: 4 × 4 unpacked, padding as Unsloth decides (padding-free rows), "
                "Unsloth's gradient checkpointing, adamw_8bit",
    "packed": "the project's defaults (train.packing auto, lora.gradient_checkpointing auto, optimizer auto): the "
              "step's 16 examples in one padding-free row, checkpointing off where the activations fit, fused AdamW",
    "packed-ckpt": "packed, with Unsloth's gradient checkpointing forced on",
    "packed-nogc": "packed, with no garbage collection at all during train() (a bound, not a setting)",
    "packed-before": "packed, as the project trained before 2026-12-01's set-up fixes: no freeze of its own (Unsloth's "
                     "stands aside), so Python's gc walks the whole heap in Unsloth's and accelerate's collections; "
                     "optimizer state in the final checkpoint",
    "packed-8bit": "packed, with the notebook's adamw_8bit instead of auto's fused AdamW",
    "segments": "packed, but attention as Unsloth does it on torch 2.11: one SDPA call per example",
    "merged": "unpacked, accumulation folded into the batch: one padded 16-row micro-batch per step",
    "trl": "TRL's own packing: 4 × 4 bin-packed rows of 2,048 tokens (3 optimizer steps for 960 examples)",
}


def notebook_variant(name: str, base: Any, unpacked_steps: int) -> tuple[Any, dict[str, Any], bool]:
    """(train settings, SFTConfig fields to force, flash varlen on) for a variant of the notebook workload;
    `packed.2` is a repeat of `packed`."""
    name = name.split(".")[0].removesuffix("+prof")
    if name == "notebook":  # the notebook's SFTConfig: optim="adamw_8bit", its rows as Unsloth's trainer makes them
        return base.model_copy(update={"packing": "false", "max_steps": unpacked_steps, "optimizer": "adamw_8bit"}), \
            {"padding_free": None}, True
    if name in ("packed", "packed-ckpt", "packed-before", "packed-nogc"):
        return base.model_copy(update={"packing": "auto"}), {}, True
    if name == "packed-8bit":  # the project's defaults but the notebook's optimizer: what `optimizer: auto` buys
        return base.model_copy(update={"packing": "auto", "optimizer": "adamw_8bit"}), {}, True
    if name == "segments":
        return base.model_copy(update={"packing": "auto"}), {}, False
    if name == "merged":
        return base.model_copy(update={"packing": "false", "per_device_batch_size": 16,
                                       "gradient_accumulation_steps": 1}), {}, True
    if name == "trl":
        return base.model_copy(update={"packing": "auto", "max_steps": None, "num_epochs": 1.0}), \
            {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "max_length": 2048, "packing": True,
             "packing_strategy": "bfd"}, True
    raise ValueError(name)


class sft_overrides:
    """Force SFTConfig fields the project sets otherwise (bench variants only; the project never does this)."""

    def __init__(self, **fields: Any):
        self.fields = fields

    def __enter__(self) -> None:
        import loraflow.training

        self.original = build_sft_config = loraflow.training.build_sft_config
        fields = self.fields

        def patched(*args: Any, **kwargs: Any) -> Any:
            config = build_sft_config(*args, **kwargs)
            for key, value in fields.items():
                setattr(config, key, value)
            return config

        loraflow.training.build_sft_config = patched

    def __exit__(self, *exc: Any) -> None:
        import loraflow.training

        loraflow.training.build_sft_config = self.original


class as_before_setup_fixes:
    """The project's train path without the gc freeze around trainer.train() and with the optimizer state in the
    final checkpoint (bench variant `packed-before` only): the same call measures what those two save."""

    def __enter__(self) -> None:
        import loraflow.training
        from transformers import TrainerCallback

        self.original = (loraflow.training.objects_alive_now_left_out_of_gc,
                         loraflow.training.final_checkpoint_model_only)
        loraflow.training.objects_alive_now_left_out_of_gc = contextlib.nullcontext
        loraflow.training.final_checkpoint_model_only = TrainerCallback

    def __exit__(self, *exc: Any) -> None:
        import loraflow.training

        (loraflow.training.objects_alive_now_left_out_of_gc,
         loraflow.training.final_checkpoint_model_only) = self.original


class profiled_windows:
    """cProfile of three windows of each training started inside the block (bench variant suffix `+prof`): set-up
    (trainer.train() called → the trainer's on_train_begin), steady steps (steps 4-58, or 4 to the one before the
    last in a shorter training: sorted by own time, where the
    host's time per step goes) and finish (the last step's end → train() returned). The reports land in .reports."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.reports: dict[str, str] = {}

    def __enter__(self) -> "profiled_windows":
        if not self.enabled:
            return self
        import cProfile

        import loraflow.training
        from transformers import TrainerCallback

        windows = {name: cProfile.Profile() for name in ("setup", "steps", "finish")}
        self.windows, self.original = windows, loraflow.training.build_trainer

        class Windows(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                windows["setup"].disable()

            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == 3 and state.max_steps > 4:
                    windows["steps"].enable()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == min(58, state.max_steps - 1) and state.max_steps > 4:
                    windows["steps"].disable()
                if state.global_step == state.max_steps:
                    windows["finish"].enable()

        def build_trainer(*args: Any, **kwargs: Any) -> Any:
            trainer = self.original(*args, **kwargs)
            trainer.add_callback(Windows())
            train = trainer.train

            def profiled_train(*train_args: Any, **train_kwargs: Any) -> Any:
                windows["setup"].enable()
                try:
                    return train(*train_args, **train_kwargs)
                finally:
                    windows["finish"].disable()

            trainer.train = profiled_train
            return trainer

        loraflow.training.build_trainer = build_trainer
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        import io
        import pstats

        import loraflow.training

        loraflow.training.build_trainer = self.original
        for name, profile in self.windows.items():
            report = io.StringIO()
            stats = pstats.Stats(profile, stream=report)
            stats.sort_stats("tottime" if name == "steps" else "cumulative").print_stats(40)
            self.reports[name] = report.getvalue()


def gc_probe() -> dict[str, Any]:
    """What a full collection costs in this process now, and what is frozen already (diagnostics for the set-up;
    it changes nothing: no freeze, no unfreeze)."""
    import gc

    def timed(generation: int = 2) -> float:
        started = time.perf_counter()
        gc.collect(generation)
        return time.perf_counter() - started

    return {"python": sys.version.split()[0], "freeze_count": gc.get_freeze_count(),
            "tracked": [len(gc.get_objects(g)) for g in range(3)], "callbacks": len(gc.callbacks),
            "collect_s": [timed(), timed()]}


class gc_events:
    """Every collection during the block through gc.callbacks: generation, seconds, objects collected."""

    def __init__(self, enabled: bool):
        self.enabled, self.events, self.started = enabled, [], 0.0

    def __enter__(self) -> "gc_events":
        import gc

        if self.enabled:
            gc.callbacks.append(self.callback)
        return self

    def callback(self, phase: str, info: dict[str, int]) -> None:
        """gc.callbacks' signature: `phase` "start" or "stop", `info` with the generation and objects collected."""
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.events.append((info["generation"], round(time.perf_counter() - self.started, 4), info["collected"]))

    def __exit__(self, *exc: Any) -> None:
        import gc

        if self.enabled:
            gc.callbacks.remove(self.callback)

    def summary(self) -> dict[str, Any] | None:
        """Collections per generation, their seconds, and the first 20 full ones; None where not enabled."""
        if not self.enabled:
            return None
        full = [e for e in self.events if e[0] == 2]
        return {"count_by_generation": [sum(e[0] == g for e in self.events) for g in range(3)],
                "seconds_by_generation": [round(sum(e[1] for e in self.events if e[0] == g), 3) for g in range(3)],
                "full": full[:20]}


class no_gc:
    """Bench variant `packed-nogc`: no collection at all during the block (gc disabled, gc.collect a no-op): the
    most the set-up and the steps could gain from Python's collector."""

    def __enter__(self) -> None:
        import gc

        self.collect, gc.collect = gc.collect, lambda generation=2: 0
        gc.disable()

    def __exit__(self, *exc: Any) -> None:
        import gc

        gc.collect = self.collect
        gc.enable()


def project(path: str, model_dir: Path, layouts: list[tuple[int, int]], warmup: int, steps: int, params: int,
            work: Path, variants: list[str], unpacked_steps: int) -> dict[str, Any]:
    """The project's own task functions, as the flow calls them. `path` is the backend, optionally with a memory cap
    (`unsloth-cap24`: torch.cuda.set_per_process_memory_fraction to 24 GiB, a small GPU simulated). Each layout runs
    twice: with lora.gradient_checkpointing auto (what the project decides; key `4x2048`) and forced on (key
    `4x2048-ckpt`, the bare loop's setting)."""
    backend, _, cap = path.partition("-cap")
    t0 = time.perf_counter()
    if backend == "unsloth":
        import loraflow.backend_unsloth  # (first, as the flow does)
    import torch
    from loraflow.backends import attach_lora, load_model
    from loraflow.config import LoraSettings, ModelConfig, TrainSettings
    from loraflow.prompts import Prompts
    from loraflow.training import TrainSpec, train_adapter

    def train(live: Any, prompts: Any, settings: TrainSettings, key: str) -> Any:
        spec = TrainSpec(model=model_cfg, lora=LoraSettings(), train=settings, backend=backend, store_uri=store,
                         prompts_key="prompts/unused.json", adapter_key=key)
        return train_adapter(live, prompts, spec).metrics

    result: dict[str, Any] = {"import_s": time.perf_counter() - t0}
    if cap and device() == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(int(cap) * 2**30 / total)
        result["memory_cap_gib"] = int(cap)
    model_cfg = ModelConfig(name=str(model_dir), backend=backend, load_in_4bit=True, max_seq_length=2048)
    t0 = time.perf_counter()
    live = load_model(model_cfg, backend)
    result["load_s"] = time.perf_counter() - t0
    live = attach_lora(live, LoraSettings(), model_cfg.max_seq_length, seed=3407)
    store = str(work / "store")

    for batch, length in layouts:
        texts = exact_length_texts(live.tokenizer, batch * (warmup + steps), length, seed=batch)
        prompts = Prompts([""] * len(texts), texts, [], [], None, live.tokenizer.eos_token)
        settings = TrainSettings(per_device_batch_size=batch, gradient_accumulation_steps=1, warmup_steps=0,
                                 max_steps=warmup + steps, optimizer="auto", packing="false")
        for mode in ("auto", "ckpt") if not cap else ("auto",):
            variant = dataclasses.replace(live, gradient_checkpointing="auto" if mode == "auto" else "unsloth")
            if backend == "unsloth":
                loraflow.backend_unsloth.set_gradient_checkpointing(live.model, "unsloth")  # as attach-LoRA left it
            torch.cuda.empty_cache() if device() == "cuda" else None
            trained = train(variant, prompts, settings, f"bench/{path}-{batch}x{length}-{mode}")
            figures = step_figures(trained.step_seconds, trained.step_tokens, warmup, params)
            figures["peak_gib"] = trained.peak_memory_bytes / 2**30
            figures["train_runtime_s"] = trained.runtime_seconds
            figures["gradient_checkpointing"] = trained.gradient_checkpointing
            key = f"{batch}x{length}" + ("" if mode == "auto" else "-ckpt")
            result[key] = figures
            log(f"{path} project {key}: {figures['tokens_per_s']:.0f} tokens/s, {figures['peak_gib']:.2f} GiB, "
                f"first step {figures['first_step_s']:.1f} s, checkpointing {trained.gradient_checkpointing}")

    if variants:
        prompts, mean_tokens = notebook_prompts(live.tokenizer, write_notebook_data(work))
        if any(name.endswith("+prof") for name in variants):
            result["gc_probe"] = gc_probe()
            log(f"gc probe: {result['gc_probe']}")
        # The notebook: batch 4 × accumulation 4, warm-up 5, 60 steps at 2e-4 = 960 examples seen once.
        notebook_train = TrainSettings(per_device_batch_size=4, gradient_accumulation_steps=4, warmup_steps=5,
                                       max_steps=60, learning_rate=2e-4, optimizer="auto")
        for name in variants:
            settings, sft_fields, flash_varlen = notebook_variant(name, notebook_train, unpacked_steps)
            if backend == "unsloth":
                loraflow.backend_unsloth.use_flash_varlen(flash_varlen)
            reset_lora(live.model, seed=3407)
            # the notebook and "-ckpt" keep Unsloth's checkpointing; the others decide as the project does (auto)
            checkpointing = "unsloth" if name == "notebook" or name.endswith("-ckpt") else "auto"
            variant_live = dataclasses.replace(live, gradient_checkpointing=checkpointing)
            if backend == "unsloth":
                loraflow.backend_unsloth.set_gradient_checkpointing(live.model, "unsloth")  # as attach-LoRA left it
            torch.cuda.empty_cache()
            kind = name.split(".")[0].removesuffix("+prof")  # packed.2+prof: a profiled repeat of packed
            before = as_before_setup_fixes() if kind == "packed-before" else contextlib.nullcontext()
            nogc = no_gc() if kind == "packed-nogc" else contextlib.nullcontext()
            with sft_overrides(**sft_fields), before, nogc, profiled_windows(name.endswith("+prof")) as profile, \
                    gc_events(name.endswith("+prof")) as collections:
                trained = train(variant_live, prompts, settings, f"bench/{backend}-notebook-{name}")
            skip = min(3, len(trained.step_seconds) // 2)
            figures = step_figures(trained.step_seconds, trained.step_tokens, skip, params)
            figures.update(
                packing=trained.packing, steps=trained.steps, train_runtime_s=trained.runtime_seconds,
                examples_seen=round(sum(trained.step_tokens) / mean_tokens), real_tokens=sum(trained.step_tokens),
                loss_first=trained.loss_first, loss_last=trained.loss_last,
                held_out_loss=held_out_loss(live, prompts), peak_gib=trained.peak_memory_bytes / 2**30,
                setup_s=trained.setup_seconds, finish_s=trained.finish_seconds,
                steps_after_first_s=sum(trained.step_seconds[1:]), profile=profile.reports, gc=collections.summary(),
            )
            result[f"notebook_{name}"] = figures
            log(f"{backend} notebook {name}: {trained.steps} steps, train() {trained.runtime_seconds:.1f} s, "
                f"{figures['tokens_per_s']:.0f} real tokens/s steady, first step {figures['first_step_s']:.1f} s, "
                f"held-out loss {figures['held_out_loss']:.4f}, set-up {figures['setup_s']:.2f} s, steps 2.. "
                f"{figures['steps_after_first_s']:.1f} s, finish {figures['finish_s']:.2f} s, peak {figures['peak_gib']:.2f} GiB")
        if backend == "unsloth":
            loraflow.backend_unsloth.use_flash_varlen(True)
    return result


def ddp(path: str, model_dir: Path, layouts: list[tuple[int, int]], warmup: int, steps: int, params: int,
        work: Path, variants: list[str]) -> dict[str, Any]:
    """The project's train step on N GPUs (`unsloth-ddp2`): the TrainSpec launched in N ranks by accelerate, as
    train.num_devices does. Each rank keeps the 1-GPU micro-batch (batch × 1 per rank, so the effective batch is
    N × batch); the notebook workload keeps its 4 × 4 effective batch (accumulation 2 on each of 2 ranks). The
    held-out loss is computed here afterwards, with the adapter loaded from the store."""
    backend, _, ranks = path.partition("-ddp")
    world = int(ranks)
    if backend == "unsloth":
        import loraflow.backend_unsloth  # noqa: F401  (before transformers: this process scores the adapter after)
    from transformers import AutoTokenizer

    from loraflow.config import LoraSettings, ModelConfig, TrainSettings
    from loraflow.launcher import launch_training
    from loraflow.prompts import Prompts
    from loraflow.training import TrainSpec

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_cfg = ModelConfig(name=str(model_dir), backend=backend, load_in_4bit=True, max_seq_length=2048)
    store = str(work / f"store-ddp{world}")
    result: dict[str, Any] = {"world_size": world}

    def launch(prompts: Any, settings: TrainSettings, key: str) -> Any:
        spec = TrainSpec(model=model_cfg, lora=LoraSettings(), train=settings, backend=backend, store_uri=store,
                         prompts_key="", adapter_key=key, world_size=world)
        started = time.perf_counter()
        adapter = launch_training(spec, prompts)
        return adapter, time.perf_counter() - started

    for batch, length in layouts:
        texts = exact_length_texts(tokenizer, batch * world * (warmup + steps), length, seed=batch)
        prompts = Prompts([""] * len(texts), texts, [], [], None, tokenizer.eos_token)
        settings = TrainSettings(per_device_batch_size=batch, gradient_accumulation_steps=world, warmup_steps=0,
                                 max_steps=warmup + steps, optimizer="auto", packing="false")
        adapter, launch_s = launch(prompts, settings, f"bench/ddp{world}-{batch}x{length}-{time.time_ns()}")
        trained = adapter.metrics
        figures = step_figures(trained.step_seconds, trained.step_tokens, warmup, params)
        figures.update(peak_gib=trained.peak_memory_bytes / 2**30, train_runtime_s=trained.runtime_seconds,
                       launch_s=launch_s, layout=trained.layout, gradient_checkpointing=trained.gradient_checkpointing)
        result[f"{batch}x{length}"] = figures
        log(f"{path} {batch}x{length}: {figures['tokens_per_s']:.0f} tokens/s over {world} GPUs ({trained.layout}), "
            f"{figures['peak_gib']:.2f} GiB on rank 0, launch to end {launch_s:.1f} s")

    if variants:
        from loraflow.backends import load_adapter

        prompts, mean_tokens = notebook_prompts(tokenizer, write_notebook_data(work))
        notebook_train = TrainSettings(per_device_batch_size=4, gradient_accumulation_steps=4, warmup_steps=5,
                                       max_steps=60, learning_rate=2e-4, optimizer="auto", packing="auto")
        for name in variants:
            adapter, launch_s = launch(prompts, notebook_train, f"bench/ddp{world}-notebook-{name}-{time.time_ns()}")
            trained = adapter.metrics
            skip = min(3, len(trained.step_seconds) // 2)
            figures = step_figures(trained.step_seconds, trained.step_tokens, skip, params)
            live = load_adapter(model_cfg, backend, store, adapter.key)
            figures.update(
                packing=trained.packing, steps=trained.steps, train_runtime_s=trained.runtime_seconds, launch_s=launch_s,
                examples_seen=round(sum(trained.step_tokens) / mean_tokens), real_tokens=sum(trained.step_tokens),
                loss_first=trained.loss_first, loss_last=trained.loss_last, layout=trained.layout,
                held_out_loss=held_out_loss(live, prompts), peak_gib=trained.peak_memory_bytes / 2**30,
                setup_s=trained.setup_seconds, finish_s=trained.finish_seconds,
                steps_after_first_s=sum(trained.step_seconds[1:]),
            )
            del live
            result[f"notebook_{name}"] = figures
            log(f"{path} notebook {name}: train() {trained.runtime_seconds:.1f} s, {figures['tokens_per_s']:.0f} real "
                f"tokens/s steady, held-out loss {figures['held_out_loss']:.4f}, launch to end {launch_s:.1f} s")
    return result


def notebook_config(model_dir: Path, work: Path, backend: str, steps: int, devices: int, store: str | None = None,
                    seed: int = 3407) -> dict[str, Any]:
    """The notebook workload as a loraflow config (960 examples, 4 × 4, lr 2e-4, NF4), in a new store unless `store`
    names one: a store that has the adapter would (rightly) skip training, so runs sharing a store need seeds of
    their own. bench/deployment_phases.py runs it too."""
    data_file = write_notebook_data(work)
    return {
        "data": {"uri": str(data_file), "eval_fraction": NOTEBOOK_HELD_OUT / (NOTEBOOK_EXAMPLES + NOTEBOOK_HELD_OUT)},
        "prompt": {"template": NOTEBOOK_TEMPLATE},
        "model": {"name": str(model_dir), "backend": backend, "load_in_4bit": True, "max_seq_length": 2048},
        "train": {"per_device_batch_size": 4, "gradient_accumulation_steps": 4, "warmup_steps": 5, "max_steps": steps,
                  "learning_rate": 2e-4, "optimizer": "auto", "num_devices": devices, "seed": seed},
        # A random model never says EOS: generate for no example, so smoke-infer has nothing to fail on.
        "infer": {"max_eval_examples": 0, "max_new_tokens": 8},
        "output": {"dir": str(work / "cli-out"), "store": store or str(work / f"cli-store-{time.time_ns()}")},
    }


def cli_run(model_dir: Path, work: Path, backend: str, steps: int, devices: int = 1, store: str | None = None,
            cache_dir: str | None = None, seed: int = 3407) -> dict[str, Any]:
    """`loraflow run` on the notebook workload, as a user starts it: seconds from launch to each milestone.
    `cache_dir`: the run's LORAFLOW_CACHE_DIR (an empty one: a fresh machine's compile cache)."""
    import yaml

    config = notebook_config(model_dir, work, backend, steps, devices, store, seed)
    config_file = work / "cli.yaml"
    config_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    milestones = {"Beginning flow run": "flow_started_s", "load-4bit-model:": "loaded_s", "attach-LoRA:": "attached_s", "train: step 1 done": "first_step_s",
                  f"train: {steps} steps": "trained_s"}
    seen: dict[str, float] = {}
    started = time.perf_counter()
    env = {**os.environ, **({"LORAFLOW_CACHE_DIR": cache_dir} if cache_dir else {})}
    process = subprocess.Popen([sys.executable, "-m", "cli", "run", "--config", str(config_file)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        for marker, key in milestones.items():
            if marker in line and key not in seen:
                seen[key] = time.perf_counter() - started
    code = process.wait()
    seen["total_s"] = time.perf_counter() - started
    result: dict[str, Any] = {"returncode": code, "devices": devices, "compile_cache": cache_dir or "kept",
                              "compile_cache_log": [line.strip()[-160:] for line in lines if "compile cache" in line],
                              **seen}
    summary_file = work / "cli-out" / "summary.json"
    if code == 0 and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        result.update(train_runtime_s=summary["train_runtime_seconds"], packing=summary["packing"],
                      train_steps=summary["train_steps"], backend=summary["backend"], phases=summary.get("phases"),
                      world_size=summary.get("world_size"))
    else:
        result["log_tail"] = "".join(lines[-60:])
    (work / "cli.log").write_text("".join(lines))
    return result


# --- orchestration ---------------------------------------------------------------------------------------------


def run_worker(name: str, args: list[str], log_file: Path) -> dict[str, Any]:
    result_file = Path(tempfile.mkdtemp(prefix="bench-")) / f"{name}.json"  # $OUT returns 8 files at most
    command = [sys.executable, __file__, "worker", name, "--result", str(result_file), *args]
    log(f"worker {name} {' '.join(args)}")
    started = time.perf_counter()
    with log_file.open("a") as handle:
        code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not result_file.exists():
        tail = log_file.read_text(errors="replace")[-4000:]
        log(f"worker {name} failed ({code}):\n{tail}")
        return {"error": f"exit {code}", "log_tail": tail[-1500:]}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def table(results: dict[str, Any]) -> str:
    rows = ["| shape | path | batch × len (per GPU) | tokens/s | s/step | peak GiB | MFU | first step s | vs bare | "
            "vs transformers | checkpointing |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for shape, per_path in results["shapes"].items():
        for layout in results["layouts"]:
            for path, figures_by_key in per_path.items():
                if not isinstance(figures_by_key, dict) or path == "build":
                    continue
                for key in (layout, f"{layout}-ckpt"):
                    figures = figures_by_key.get(key)
                    if not figures:
                        continue
                    tps = figures["tokens_per_s"]
                    vs_bare = ratio(tps, per_path.get("bare", {}).get(layout, {}).get("tokens_per_s"))
                    vs_tf = ratio(tps, per_path.get("transformers", {}).get(layout, {}).get("tokens_per_s"))
                    ckpt = figures.get("gradient_checkpointing", "on (bare loop)" if path == "bare" else "")
                    label = f"{path}{' (checkpointing forced on)' if key.endswith('-ckpt') else ''}"
                    rows.append(
                        f"| {shape} | {label} | {layout.replace('x', ' × ')} | {tps:,.0f} | {figures['s_per_step']:.3f} | "
                        f"{figures['peak_gib']:.2f} | {figures['mfu']:.1%} | {figures['first_step_s']:.1f} | "
                        f"{'' if vs_bare is None else f'{vs_bare:.3f}×'} | {'' if vs_tf is None else f'{vs_tf:.2f}×'} | "
                        f"{ckpt.split(':')[0]} |"
                    )
    rows += ["", "| shape | notebook workload (960 examples of 61-151 tokens) | steps | train() s | real tokens/s steady | "
             "vs notebook | first step s | of it set-up s | steps 2.. s | final checkpoint s | held-out loss | examples seen |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape, per_path in results["shapes"].items():
        runs = {f"{path} {k.removeprefix('notebook_')}": v for path in per_path if isinstance(per_path[path], dict)
                for k, v in per_path[path].items() if k.startswith("notebook_")}
        base = runs.get("unsloth notebook", {}).get("tokens_per_s")
        for name, figures in runs.items():
            vs = ratio(figures["tokens_per_s"], base)
            rows.append(
                f"| {shape} | {name} | {figures['steps']} | {figures['train_runtime_s']:.1f} | "
                f"{figures['tokens_per_s']:,.0f} | {'' if vs is None else f'{vs:.1f}×'} | {figures['first_step_s']:.1f} | "
                f"{figures.get('setup_s', 0):.1f} | {figures.get('steps_after_first_s', 0):.1f} | {figures.get('finish_s', 0):.1f} | "
                f"{figures['held_out_loss']:.4f} | {figures['examples_seen']} |"
            )
    for run, cli in enumerate(results.get("cli_runs", []), 1):
        rows += ["", f"`loraflow run` #{run}{' (' + cli['label'] + ')' if 'label' in cli else ''} (notebook workload, {results['cli_shape']}, {cli.get('devices', 1)} GPU(s), "
                     "seconds from launch): "
                     + ", ".join(f"{k} {v:.1f}" for k, v in cli.items() if k.endswith("_s") and isinstance(v, float))
                     + f", exit {cli.get('returncode')}"]
    return "\n".join(rows)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo",
                 "datasets", "prefect"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="where the JSON and logs go")
    parser.add_argument("--work", default="/tmp/loraflow-bench", help="models, data and stores (local disk)")
    parser.add_argument("--shapes", default="8b,1b")
    parser.add_argument("--layouts", default="4x2048,1x2048", help="batch x length, comma-separated ('-': none)")
    parser.add_argument("--paths", default="bare,unsloth,transformers")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--notebook", default="8b:notebook,packed,merged;1b:notebook,packed,segments,merged,trl",
                        help="notebook-workload variants per shape (see NOTEBOOK_VARIANTS)")
    parser.add_argument("--notebook-paths", default="unsloth", help="paths that run the notebook workload")
    parser.add_argument("--cli-backend", default="unsloth")
    parser.add_argument("--cli-steps", type=int, default=60)
    parser.add_argument("--cli-runs", type=int, default=2, help="`loraflow run` repeats (the later ones: warm caches)")
    parser.add_argument("--unpacked-steps", default="8b:10,1b:60",
                        help="optimizer steps of the `notebook` variant per shape (60 = all 960 examples)")
    parser.add_argument("--cli", default="8b", help="shape for the `loraflow run` timing ('' = skip)")
    parser.add_argument("--cli-devices", default="1", help="train.num_devices of each `loraflow run`, comma-separated")
    parser.add_argument("--cli-cache-sharing", action="store_true",
                        help="instead of --cli-runs: three `loraflow run`s, each with an empty compile cache (a fresh "
                             "machine): one publishing to a store, one with a store of its own (the control), one "
                             "restoring from the first's store")
    args = parser.parse_args()
    args.variants = dict(item.split(":") for item in args.notebook.split(";") if item)

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    logs = out / "workers.log"
    unpacked_steps = dict(item.split(":") for item in args.unpacked_steps.split(","))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "gpu": gpu_name(), "versions": versions(), "command": " ".join(sys.argv),
        "layouts": args.layouts.split(","), "warmup": args.warmup, "steps": args.steps, "peak_flops": PEAK_FLOPS,
        "shapes": {},
    }
    started = time.perf_counter()
    for shape in args.shapes.split(","):
        model_dir = work / f"llama-{shape}-bf16"
        per_path: dict[str, Any] = results["shapes"].setdefault(shape, {})
        built = run_worker("build", [shape, str(model_dir)], logs) if not (model_dir / "config.json").exists() else {}
        params_file = work / f"llama-{shape}.params"
        if "params" in built:
            params_file.write_text(str(built["params"]))
        per_path["build"] = built
        per_path["params"] = int(params_file.read_text())
        common = [str(model_dir), args.layouts, str(args.warmup), str(args.steps), str(per_path["params"]), str(work)]
        for path in [p for p in args.paths.split(",") if p not in ("", "-")]:
            variants = args.variants.get(shape, "") if path in args.notebook_paths.split(",") else ""
            extra = [variants or "-", unpacked_steps.get(shape, "60")] if path != "bare" else []
            per_path[path] = run_worker(path, common + extra, logs)
            (out / "bench.json").write_text(json.dumps(results, indent=1))
        if shape == args.cli:
            results["cli_shape"] = shape
            results["cli_runs"] = []
            if args.cli_cache_sharing:
                shared = str(work / f"cli-store-shared-{time.time_ns()}")
                for seed, (label, store) in enumerate((("cold, publishes", shared), ("cold, own store", None),
                                                       ("restores from the first's store", shared)), 1):
                    cache = tempfile.mkdtemp(prefix="compile-cache-", dir=work)
                    results["cli_runs"].append({"label": label, **run_worker(
                        "cli", [str(model_dir), str(work), args.cli_backend, str(args.cli_steps), "1", store or "-",
                                cache, str(seed)], logs)})
                    (out / "bench.json").write_text(json.dumps(results, indent=1))
            for devices in args.cli_devices.split(",") if not args.cli_cache_sharing else []:
                for _ in range(args.cli_runs):
                    results["cli_runs"].append(run_worker(
                        "cli", [str(model_dir), str(work), args.cli_backend, str(args.cli_steps), devices], logs))
                (out / "bench.json").write_text(json.dumps(results, indent=1))
    results["total_s"] = time.perf_counter() - started
    report = table(results)
    results["table"] = report
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(report + "\n")
    print(f"\n{results['date']}, {results['gpu']}, " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    print(report)


def worker_main(argv: list[str]) -> None:
    name, _, result_file, *rest = argv
    if name == "build":
        result = build(rest[0], Path(rest[1]))
    elif name == "cli":
        store, cache, seed = (rest[5:8] if len(rest) > 5 else ["-", "", "3407"])
        result = cli_run(Path(rest[0]), Path(rest[1]), rest[2], int(rest[3]), int(rest[4]),
                         None if store == "-" else store, cache or None, int(seed))
    else:
        model_dir, layouts, warmup, steps, params, work = rest[:6]
        parsed = [tuple(int(x) for x in item.split("x")) for item in layouts.split(",") if item != "-"]
        if name == "bare":
            result = bare(Path(model_dir), parsed, int(warmup), int(steps), int(params))
        elif "-ddp" in name:
            result = ddp(name, Path(model_dir), parsed, int(warmup), int(steps), int(params), Path(work),
                         variants=[v for v in rest[6].split(",") if v != "-"])
        else:
            result = project(name, Path(model_dir), parsed, int(warmup), int(steps), int(params), Path(work),
                             variants=[v for v in rest[6].split(",") if v != "-"], unpacked_steps=int(rest[7]))
    Path(result_file).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        main()
