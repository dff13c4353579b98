"""TRL's two losses side by side on a CPU: "nll" (the model's own, logits for every position) against
"chunked_nll" (TRL's chunked head, only labelled tokens reach the vocabulary, recomputed under checkpointing).

Each training runs in a fresh process (load, attach, train_adapter: the train step's core), alternating the two,
with the backend's choice overridden. Prints one JSON line per training and the medians:

    .venv/bin/python bench/cpu_loss.py --config deployments/configs/tiny-cpu.yaml --steps 40 --repeats 3
    .venv/bin/python bench/cpu_loss.py --config deployments/configs/smollm2-135m-cpu.yaml --steps 6 --repeats 2

Results: docs/benchmarks.md, "The loss on a CPU".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_TYPES = ("nll", "chunked_nll")


def train_once(config: str, loss_type: str, steps: int, store: Path) -> dict:
    """One training in this process: seconds of train_adapter and its losses."""
    import loraflow.backend_transformers as backend
    from loraflow.backends import attach_lora, load_model
    from loraflow.config import load_config, parse_assignment
    from loraflow.data import read_dataset
    from loraflow.prompts import format_prompts, load_tokenizer, store_prompts
    from loraflow.store import LocalStore
    from loraflow.training import plan_training, train_adapter

    backend.loss_type = lambda live, completion_only_loss: loss_type
    cfg = load_config(config, [parse_assignment(f"train.max_steps={steps}"), parse_assignment("train.save_steps=100000"),
                               parse_assignment(f"output.store={store}")])
    dataset = read_dataset(cfg.data.uri)
    prompts = format_prompts(dataset, None, cfg.prompt, cfg.data, cfg.infer, load_tokenizer(cfg.model.name, None))
    spec = plan_training(cfg, "transformers", dataset, None, prompts)
    store_prompts(LocalStore(cfg.output.store), prompts)
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    began = time.perf_counter()
    metrics = train_adapter(live, prompts, spec).metrics
    return {"loss_type": loss_type, "train_s": round(time.perf_counter() - began, 2),
            "completion_only_loss": cfg.train.completion_only_loss, "loss_first": metrics.loss_first,
            "loss_last": metrics.loss_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=LOSS_TYPES, help=argparse.SUPPRESS)  # a child: one training
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as store:
            print(json.dumps(train_once(args.config, args.one, args.steps, Path(store))))
        return
    seconds: dict[str, list[float]] = {name: [] for name in LOSS_TYPES}
    for _ in range(args.repeats):
        for name in LOSS_TYPES:
            child = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                    "--one", name], capture_output=True, text=True, check=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            seconds[name].append(row["train_s"])
            print(json.dumps(row), flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({"median_train_s": medians, "nll_over_chunked": round(medians["nll"] / medians["chunked_nll"], 2)}))


if __name__ == "__main__":
    main()
