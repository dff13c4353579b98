"""From `prefect deployment run` to the first training step and to Completed, phase by phase, on a GPU machine.

On this machine: a Prefect server, a process work pool, a deployment of flows/finetune.py, and one process worker
started as infra/stack/up.sh starts it (PREFECT_WORKER_QUERY_SECONDS=2), with the warm pool beside it
(`loraflow warm-pool`, loraflow/warm.py). Two deployments of the same flow: `notebook`, whose command hands each run
to the pool's spare (python -m loraflow.warm_start, as the project's deployments do), and `notebook-cold`, Prefect's
default command (a new `python -m prefect.engine` per run). The notebook workload (8B shape, NF4, 960 examples,
batch 4 × 4, 60 steps; bench/train_throughput.py's `notebook_config`) is run through `prefect deployment run`,
one run after the other: `--cold-runs` cold ones first, then `--runs` warm ones, each warm run submitted once the
pool's spare is ready (the wait is reported). For each run: the phases summary.json records (seconds from the run's
scheduled start, which `deployment run` sets to now: process_started, flow_started, backend_imported,
model_loaded, lora_attached, first_step, trained, scored) and the flow run's end from Prefect's API.

    source bench/gpu_env.sh && python bench/deployment_phases.py --runs 3 --cold-runs 1 --out "$OUT"

Writes deployment_phases.json and deployment_phases.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import train_throughput as throughput  # noqa: E402  (bench/ is not a package)

POOL, WARM, COLD = "bench-gpu", "notebook", "notebook-cold"
PHASES = ("process_started", "flow_started", "backend_imported", "model_loaded", "lora_attached", "first_step",
          "trained", "scored")


def wait_healthy(api: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no Prefect server at {api} within {timeout} s")


def prefect(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def deploy(env: dict[str, str], name: str, job_variables: dict[str, str]) -> None:
    """The flow from this checkout on the process pool, as `prefect deploy` makes it from a local source."""
    code = ("from flows.finetune import finetune\n"
            f"finetune.from_source(source={str(ROOT)!r}, entrypoint='flows/finetune.py:finetune')"
            f".deploy(name={name!r}, work_pool_name={POOL!r}, job_variables={job_variables!r}, print_next_steps=False)")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"deploy: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def timestamp(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def spare_ready(pool_log: Path, timeout: float = 300) -> float:
    """Seconds waited until the warm pool has an idle spare (more spares ready than taken, by its log)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        lines = pool_log.read_text(errors="replace").splitlines() if pool_log.exists() else []
        said = [line.split()[5] for line in lines if len(line.split()) > 5 and line.split()[2] == "warm-pool:"]
        if said.count("ready") > said.count("taken"):
            return round(time.monotonic() - started, 1)
        time.sleep(0.5)
    raise RuntimeError(f"the warm pool had no spare ready within {timeout} s; see {pool_log}")


def one_run(env: dict[str, str], api: str, deployment: str, config: dict[str, Any], timeout: float) -> dict[str, Any]:
    submitted = time.time()
    printed = prefect(env, "deployment", "run", f"finetune/{deployment}", "--param", f"config={json.dumps(config)}")
    run_id = next(line.split("UUID:")[1].strip() for line in printed.splitlines() if "UUID:" in line)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=30).json()
        if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            break
        time.sleep(0.5)
    result: dict[str, Any] = {"run_id": run_id, "deployment": deployment, "state": run["state"]["type"]}
    summary_file = Path(config["output"]["dir"]) / "summary.json"
    if run["state"]["type"] != "COMPLETED" or not summary_file.exists():
        result["message"] = run["state"].get("message")
        return result
    summary = json.loads(summary_file.read_text())
    scheduled = summary["phases"]["submitted_at"]
    result.update(
        phases={name: summary["phases"].get(name) for name in PHASES},
        warm_process_ready=summary["phases"].get("warm_process_ready"),
        completed=round(timestamp(run["end_time"]) - scheduled, 2),
        submitted_vs_command=round(scheduled - submitted, 2),  # the CLI's own start, before the run existed
        train_runtime_s=summary["train_runtime_seconds"], train_steps=summary["train_steps"],
        gradient_checkpointing=summary.get("gradient_checkpointing"), backend=summary["backend"],
    )
    return result


def table(runs: list[dict[str, Any]]) -> str:
    rows = ["| run | process | " + " | ".join(PHASES) + " | Completed |", "|---|---|" + "---:|" * (len(PHASES) + 1)]
    for number, run in enumerate(runs, 1):
        process = "warm spare" if run.get("warm_process_ready") is not None else "new (cold)"
        if "phases" not in run:
            rows.append(f"| {number} | {run['deployment']} | {run['state']}: {run.get('message')} |")
            continue
        cells = [f"{run['phases'][name]:.1f}" if run["phases"].get(name) is not None else "" for name in PHASES]
        rows.append(f"| {number} | {process} | " + " | ".join(cells) + f" | {run['completed']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    parser.add_argument("--work", default="/tmp/loraflow-bench")
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--model", default=None, help="a model folder or loraflow: name instead of the built shape")
    parser.add_argument("--backend", default="unsloth")
    parser.add_argument("--runs", type=int, default=3, help="runs started in the warm pool's spare")
    parser.add_argument("--cold-runs", type=int, default=1, help="runs in a new process each (Prefect's default)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--port", type=int, default=4377)
    parser.add_argument("--query-seconds", default="2", help="the worker's PREFECT_WORKER_QUERY_SECONDS")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else work / f"llama-{args.shape}-bf16"
    if not args.model and not (model_dir / "config.json").exists():
        built = throughput.run_worker("build", [args.shape, str(model_dir)], out / "build.log")
        (work / f"llama-{args.shape}.params").write_text(str(built["params"]))  # as train_throughput.py keeps it

    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(work / "prefect-home-deployments"),
           "LORAFLOW_WARM_SOCKET": str(work / "warm.sock")}
    logs: list[Any] = []
    processes: list[subprocess.Popen] = []
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "gpu": throughput.gpu_name(),
                               "versions": throughput.versions(), "command": " ".join(sys.argv), "runs": []}
    try:
        logs.append((out / "server.log").open("w"))
        processes.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                           "--port", str(args.port)], env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        wait_healthy(api)
        prefect(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
        deploy(env, WARM, {"command": f"{sys.executable} -m loraflow.warm_start"})
        deploy(env, COLD, {})
        logs.append((out / "warm-pool.log").open("w"))
        processes.append(subprocess.Popen([sys.executable, "-m", "cli", "warm-pool", "--backend", args.backend],
                                          env=env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
        logs.append((out / "worker.log").open("w"))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": args.query_seconds}, cwd=ROOT,
            stdout=logs[-1], stderr=subprocess.STDOUT))
        for number, deployment in enumerate([COLD] * args.cold_runs + [WARM] * args.runs):
            config = throughput.notebook_config(model_dir, work, args.backend, args.steps, args.devices)
            config["model"]["load_in_4bit"] = throughput.device() == "cuda"  # bitsandbytes' NF4 needs CUDA
            config["output"]["dir"] = str(work / f"deployment-out-{number}")
            waited = spare_ready(out / "warm-pool.log") if deployment == WARM else None
            run = {**one_run(env, api, deployment, config, timeout=900), "waited_for_spare_s": waited}
            results["runs"].append(run)
            throughput.log(f"deployment run {number + 1}: {json.dumps(run)}")
            (out / "deployment_phases.json").write_text(json.dumps(results, indent=1))
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs:
            handle.close()
    results["table"] = table(results["runs"])
    (out / "deployment_phases.json").write_text(json.dumps(results, indent=1))
    (out / "deployment_phases.md").write_text(results["table"] + "\n")
    print(f"{results['date']}, {results['gpu']}, " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    print(results["table"])


if __name__ == "__main__":
    main()
