"""How promote should score the champion when the challenger's model is live in the process: load the champion's
adapter beside it on the same base weights (PEFT load_adapter + set_adapter), or load the base model and the
champion afresh. Both give the same labels (tests/test_promotion.py); this measures time and memory.

    python bench/champion_scoring.py [--model loraflow:smollm2-135m-instruct] [--examples 32] [--repeats 2]

Two adapters with random (non-zero) lora_B on the model, in a temporary store; the eval examples are the demo data's
prompts with its three labels, scored by likelihood as smoke-infer scores them. Prints one line per way.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import psutil
import torch

from loraflow.backends import attach_lora, load_adapter, load_model
from loraflow.config import load_config
from loraflow.inference import example_labels
from loraflow.local_store import LocalStore
from loraflow.prompts import EvalExample
from loraflow.promotion import champion_on_live

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="loraflow:smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(ROOT / "deployments" / "configs" / "tiny-cpu.yaml", [{"model": {"name": args.model}}])
    rows = json.loads((ROOT / "data" / "demo" / "sentiment_zh.json").read_text())[: args.examples]
    examples = [EvalExample(f"{r['instruction']}\n{r['input']}\n答:", r["output"], r["instruction"], r["input"])
                for r in rows]
    labels = sorted({r["output"] for r in rows})
    with tempfile.TemporaryDirectory() as work:
        store = LocalStore(Path(work) / "store")
        for name, seed in (("challenger", 1), ("champion", 2)):
            live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, 0)
            torch.manual_seed(seed)
            with torch.no_grad():
                for key, parameter in live.model.named_parameters():
                    if "lora_B" in key:
                        parameter.normal_(std=0.01)
            live.model.save_pretrained(Path(work) / name)
            live.tokenizer.save_pretrained(Path(work) / name)
            store.put_folder(Path(work) / name, f"adapters/{name}")
            del live
        gc.collect()
        challenger = load_adapter(cfg.model, "transformers", store.uri, "adapters/challenger")
        challenger.model.eval()
        example_labels(challenger, examples, labels, cfg.infer)  # warm up
        timings: dict[str, list[float]] = {"beside": [], "fresh": [], "fresh_load": []}
        for _ in range(args.repeats):  # alternated, so a busy machine slows both ways alike
            before, started = rss_mib(), time.perf_counter()
            beside = champion_on_live(challenger, store, "adapters/champion", examples, labels, cfg)
            timings["beside"].append(time.perf_counter() - started)
            beside_rss = rss_mib() - before
            before, started = rss_mib(), time.perf_counter()
            fresh = load_adapter(cfg.model, "transformers", store.uri, "adapters/champion")
            fresh.model.eval()
            timings["fresh_load"].append(time.perf_counter() - started)
            alone = example_labels(fresh, examples, labels, cfg.infer)
            timings["fresh"].append(time.perf_counter() - started)
            fresh_rss = rss_mib() - before
            del fresh
            gc.collect()
        print(f"{args.model}, {len(examples)} examples x {len(labels)} labels, likelihood scoring, best of {args.repeats}:")
        print(f"  champion beside the challenger (second adapter, same base): {min(timings['beside']):.2f} s, "
              f"+{beside_rss:.0f} MiB RSS")
        print(f"  base + champion loaded afresh: {min(timings['fresh']):.2f} s ({min(timings['fresh_load']):.2f} s "
              f"of it loading), +{fresh_rss:.0f} MiB RSS; same labels: {beside == alone}")

if __name__ == "__main__":
    main()
