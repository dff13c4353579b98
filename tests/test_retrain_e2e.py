"""The retraining loop on the real local stack, end to end: `make stack`'s script (Prefect server and worker, nanio as
S3, the webhook receiver, the alert automations), the on-upload deployment, a local HTTP endpoint standing in for the
notification target (Slack, a pager) and the Hub stand-in.

    upload v1 (clean)                  -> trains fresh; no champion; gate passes       -> promoted, pushed to main + tag
    upload v2 (a third mislabelled)    -> continues from production; scores below it  -> refused, candidates/<run>,
                                                                                          production unchanged, alert
    nightly on the folder              -> newest is v2, unchanged: a cache hit (no model loads), no second alert
    upload v3 (v1 + more clean rows)   -> continues from production; promoted only if McNemar's test says so
    a forced failure                   -> smoke-infer refuses the answers: Failed, the failure alert

The data is written here: short English sentences whose sentiment is carried by one word ("the food was good"),
labels positive/negative, and a fixed eval file of 96 sentences no training file holds. v2 flips the labels of every
row whose sentiment word is one of four of the twelve (a third of the rows: a labelling batch gone wrong), so a model
trained on it learns those words backwards. The tiny random Llama learns the rest in 60 steps.

Slow by nature (five flow runs through a worker): `pytest -m slow tests/test_retrain_e2e.py`. With
LORAFLOW_E2E_ARTIFACTS=<dir>, the line's alias record and its picture are copied there (the README's come from it).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import boto3
import httpx
import pytest
import yaml

from loraflow.significance import mcnemar_exact_p
from loraflow.webhook import sign
from tests.conftest import TINY_CONFIG
from tests.hub_standin import HubStandIn
from tests.local_stack import read_env_file, set_deployment_parameters, stack_env, stack_script, wait_for_state

pytestmark = pytest.mark.slow

BUCKET = "loraflow-retrain-tests"
LINE = "retrain-e2e"
REPO = "loraflow-tests/retrain-e2e"
INSTRUCTION = "Classify the sentiment."
SUBJECTS = ["the food", "the movie", "the weather", "my phone", "the book", "the room", "the service", "the trip",
            "the class", "the game", "the show", "the coffee", "the hotel", "the car", "the music", "the staff"]
VERBS = ["was", "is", "looks", "seems"]
POSITIVE = ["good", "great", "nice", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "horrible", "boring"]
MISLABELLED = {"good", "great", "bad", "awful"}  # v2: these four words' rows get the other label


def datasets() -> dict[str, list[dict[str, str]]]:
    """eval (96 rows), v1 (192 clean), v2 (v1 with a third of the labels flipped), v3 (v1 + 192 more clean rows)."""
    combos = [(s, v, w, "positive") for s in SUBJECTS for v in VERBS for w in POSITIVE]
    combos += [(s, v, w, "negative") for s in SUBJECTS for v in VERBS for w in NEGATIVE]
    random.Random(7).shuffle(combos)

    def rows(items: list[tuple[str, str, str, str]]) -> list[dict[str, str]]:
        return [{"instruction": INSTRUCTION, "input": f"{s} {v} {w}", "output": label} for s, v, w, label in items]

    held_out, pool = combos[:96], combos[96:]
    flipped = [(s, v, w, ({"positive": "negative", "negative": "positive"}[label] if w in MISLABELLED else label))
               for s, v, w, label in pool[:192]]
    return {"eval": rows(held_out), "v1": rows(pool[:192]), "v2": rows(flipped), "v3": rows(pool[:384])}


class AlertRecorder:
    """The notification target: a local HTTP endpoint recording every POSTed JSON body."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, words: list[str], timeout: float = 90) -> dict[str, Any]:
        """The first alert whose subject and body hold every word."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for alert in self.received:
                text = alert.get("subject", "") + "\n" + alert.get("body", "")
                if all(word in text for word in words):
                    return alert
            time.sleep(1)
        raise AssertionError(f"no alert with {words} within {timeout} s; received: {self.received}")


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The stack with alerts and the Hub stand-in; the on-upload deployment pointed at the test's config."""
    state = tmp_path_factory.mktemp("retrain-stack")
    alerts = AlertRecorder()
    with HubStandIn() as hub:
        env = stack_env(state, BUCKET, LORAFLOW_WEBHOOK_DEBOUNCE="1",
                        LORAFLOW_ALERTS_URL=alerts.url, HF_ENDPOINT=hub.url, HF_TOKEN="hf_e2e_token",
                        HF_HUB_OFFLINE="0")
        started = time.monotonic()
        up = stack_script("up.sh", env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            assert "alerts: block loraflow-alerts" in up.stdout, up.stdout
            api = f"http://127.0.0.1:{env['LORAFLOW_PREFECT_PORT']}/api"
            keys = read_env_file(state / "s3.env")
            s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{env['LORAFLOW_S3_PORT']}", region_name="us-east-1",
                              aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
            data = datasets()
            s3.put_object(Bucket=BUCKET, Key="eval/eval.jsonl", Body=jsonl(data["eval"]))
            config_file = write_config(state)
            deployment_id = set_deployment_parameters(api, "finetune/on-upload",
                                                      {"config_file": str(config_file), "config": {}})
            yield {"state": state, "api": api, "s3": s3, "data": data, "alerts": alerts, "hub": hub.record,
                   "config_file": config_file, "deployment": deployment_id, "started": started,
                   "secret": read_env_file(state / "webhook.env")["LORAFLOW_WEBHOOK_SECRET"],
                   "webhook": f"http://127.0.0.1:{env['LORAFLOW_WEBHOOK_PORT']}/hooks/dataset-upload",
                   "env": {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "prefect-home")},
                   "runs": {}}
        finally:
            stack_script("down.sh", env, timeout=120)


def jsonl(rows: list[dict[str, str]]) -> bytes:
    return ("\n".join(json.dumps(row) for row in rows) + "\n").encode()


def write_config(state: Path) -> Path:
    """The tiny model on this data: the prompt ends where the sentiment word is one token back, 60 steps, the fixed
    eval file, continued fine-tuning from production, the gate (beat the base model), the Hub stand-in."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["data"] = {"uri": f"s3://{BUCKET}/datasets/", "eval_uri": f"s3://{BUCKET}/eval/eval.jsonl"}
    config["prompt"] = {"template": "{instruction}\n{input}\n{output}"}
    config["model"].update(max_seq_length=64, init_adapter="production")
    config["train"].update(max_steps=60, save_steps=1000)
    config["infer"] = {"prompts": [], "max_new_tokens": 8, "max_eval_examples": 96}
    config["output"] = {"dir": str(state / "out"), "store": f"s3://{BUCKET}/runs"}
    config["hub"] = {"repo_id": REPO, "require_beat_base": True}
    config["promote"] = {"line": LINE}
    path = state / "retrain-tiny.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def upload(loop: dict, name: str) -> str:
    """Put dataset `name` under datasets/ and notify the stack's receiver, signed, as any uploader would."""
    key = f"datasets/{name}.jsonl"
    etag = loop["s3"].put_object(Bucket=BUCKET, Key=key, Body=jsonl(loop["data"][name]))["ETag"].strip('"')
    uri = f"s3://{BUCKET}/{key}"
    body = json.dumps({"dataset_uri": uri, "etag": etag}).encode()
    timestamp = str(int(time.time()))
    answer = httpx.post(loop["webhook"], content=body, timeout=30, headers={
        "X-Loraflow-Timestamp": timestamp, "X-Loraflow-Signature": sign(loop["secret"], timestamp, body)})
    assert answer.status_code == 202, answer.text
    return uri


def run_for(loop: dict, uri: str, timeout: float = 120) -> str:
    """The id of the on-upload run started for `uri`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.post(f"{loop['api']}/flow_runs/filter", timeout=30,
                          json={"deployments": {"id": {"any_": [loop["deployment"]]}}}).json()
        found = [r["id"] for r in runs if ((r["parameters"].get("config") or {}).get("data") or {}).get("uri") == uri]
        if found:
            return found[0]
        time.sleep(1)
    raise AssertionError(f"no on-upload run for {uri} within {timeout} s")


def deployment_run(loop: dict, deployment: str, config: dict[str, Any]) -> str:
    printed = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "deployment", "run", deployment,
         "--param", f"config_file={loop['config_file']}", "--param", f"config={json.dumps(config)}"],
        env=loop["env"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stdout + printed.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", printed.stdout).group(1)


def finished(loop: dict, name: str, run_id: str, started: float, wanted: str = "COMPLETED") -> dict[str, Any]:
    """Wait for the run; returns its summary from the store (each run's own: summaries/<flow run id>.json)."""
    state = wait_for_state(loop["api"], run_id, {wanted}, timeout=900)
    wall = time.monotonic() - started
    worker_log = (loop["state"] / "logs" / "worker.log").read_text(errors="replace")
    assert state == wanted, f"{name}: {state}\n{worker_log[-6000:]}"
    summary = json.loads(loop["s3"].get_object(Bucket=BUCKET, Key=f"runs/summaries/{run_id}.json")["Body"].read())
    loop["runs"][name] = {"id": run_id, "wall": wall, "summary": summary}
    promotion = summary["promotion"] or {}
    print(f"{name}: {state} in {wall:.0f} s; challenger {promotion.get('challenger_accuracy')}, champion "
          f"{promotion.get('champion_accuracy')}, p {((promotion.get('test') or {}).get('p_value'))}: "
          f"{promotion.get('decision')} ({promotion.get('reason')})")
    return summary


def aliases(loop: dict) -> dict[str, Any]:
    return json.loads(loop["s3"].get_object(Bucket=BUCKET, Key=f"runs/aliases/{LINE}.json")["Body"].read())


def task_names(loop: dict, run_id: str) -> set[str]:
    runs = httpx.post(f"{loop['api']}/task_runs/filter", timeout=30,
                      json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    return {r["name"].rsplit("-", 1)[0] for r in runs}


def test_the_retraining_loop(loop: dict) -> None:
    hub = loop["hub"]

    # v1: no champion yet; the gate (beat the base model) decides alone.
    started = time.monotonic()
    v1_uri = upload(loop, "v1")
    v1 = finished(loop, "v1", run_for(loop, v1_uri), started)
    p1 = v1["promotion"]
    assert v1["dataset_uri"] == v1_uri and v1["dataset_etag"] and v1["parent_adapter"] is None
    assert v1["quality_gate"]["failures"] == [] and p1["champion_key"] is None
    assert p1["decision"] == "promoted" and set(p1["aliases_moved"]) == {"candidate", "production"}
    v1_key = p1["challenger_key"]
    assert aliases(loop)["aliases"]["production"]["adapter_key"] == v1_key
    assert hub.revisions(REPO) == ["main"] and f"run-{v1['flow_run_id']}" in hub.tags[REPO]
    made = loop["alerts"].wait_for([f"{LINE}: promoted", v1_key])

    # v2: a third of the labels wrong. It continues from production (v1) and must score below it.
    started = time.monotonic()
    v2_uri = upload(loop, "v2")
    v2 = finished(loop, "v2", run_for(loop, v2_uri), started)
    p2 = v2["promotion"]
    assert v2["parent_adapter"]["adapter_key"] == v1_key and v2["parent_adapter"]["source"] == "production"
    assert p2["champion_key"] == v1_key and p2["champion_accuracy"] == pytest.approx(p1["challenger_accuracy"])
    assert p2["challenger_accuracy"] < p2["champion_accuracy"], p2
    assert p2["decision"] == "refused" and p2["aliases_moved"] == ["candidate"]
    assert p2["eval_examples"] == 96 and p2["eval_source"] == f"data.eval_uri s3://{BUCKET}/eval/eval.jsonl"
    assert p2["champion_scored_by"] == "second adapter on the live base"
    record = aliases(loop)
    assert record["aliases"]["production"]["adapter_key"] == v1_key  # production unchanged
    assert record["aliases"]["candidate"]["adapter_key"] == p2["challenger_key"]
    assert hub.revisions(REPO) == ["main", f"candidates/{v2['flow_run_id']}"]  # never main
    assert f"run-{v2['flow_run_id']}" not in hub.tags[REPO]
    refused = loop["alerts"].wait_for([f"{LINE}: not promoted", f"challenger accuracy {round(p2['challenger_accuracy'], 4)}",
                                       f"champion accuracy {round(p2['champion_accuracy'], 4)}"])
    p_shown = float(f"{p2['test']['p_value']:.4g}")  # the payload's p: 4 significant figures
    assert f"p = {p_shown}" in refused["body"] and v2["flow_run_id"] in refused["body"]

    # The nightly run on the folder: its newest file is v2, unchanged, so nothing loads and nobody is told again.
    started = time.monotonic()
    nightly = finished(loop, "nightly", deployment_run(loop, "finetune/nightly", {}), started)
    head = loop["s3"].head_object(Bucket=BUCKET, Key="datasets/v2.jsonl")
    assert nightly["dataset_uri"] == v2_uri and nightly["dataset_source"] == f"s3://{BUCKET}/datasets/"
    assert nightly["dataset_etag"] == head["ETag"].strip('"') and nightly["dataset_sha256"] == v2["dataset_sha256"]
    assert {"train", "smoke-infer"} <= set(nightly["cached_tasks"])
    assert not {"load-4bit-model", "attach-LoRA", "train"} & task_names(loop, nightly["flow_run_id"])
    assert nightly["promotion"]["champion_scored_by"] == "stored comparison (no model loaded)"
    assert nightly["promotion"]["decision"] == "refused" and nightly["promotion"]["event"] is None
    assert nightly["promotion"]["repeat"] and nightly["hub_revision"] is None  # on its candidates branch already
    assert len(aliases(loop)["history"]) == len(record["history"]) and len(hub.revisions(REPO)) == 2

    # v3: v1 plus more clean rows, from production (v1). Promoted exactly when the numbers say so.
    started = time.monotonic()
    v3_uri = upload(loop, "v3")
    v3 = finished(loop, "v3", run_for(loop, v3_uri), started)
    p3, test = v3["promotion"], v3["promotion"]["test"]
    assert v3["parent_adapter"]["adapter_key"] == v1_key
    assert test["p_value"] == pytest.approx(mcnemar_exact_p(test["challenger_only"], test["champion_only"]))
    improvement = p3["challenger_accuracy"] - p3["champion_accuracy"]
    should_promote = improvement > 0 and test["p_value"] < 0.05
    assert p3["decision"] == ("promoted" if should_promote else "refused"), p3
    production = aliases(loop)["aliases"]["production"]["adapter_key"]
    assert production == (p3["challenger_key"] if should_promote else v1_key)
    assert hub.revisions(REPO)[-1] == ("main" if should_promote else f"candidates/{v3['flow_run_id']}")
    loop["alerts"].wait_for([f"{LINE}: {'promoted' if should_promote else 'not promoted'}", p3["challenger_key"]])

    # A forced failure: one token of answer cannot end with EOS, so smoke-infer refuses the answers.
    started = time.monotonic()
    failed = finished(loop, "forced failure", deployment_run(loop, "finetune/manual", {
        "data": {"uri": v1_uri}, "model": {"init_adapter": None}, "train": {"max_steps": 1},
        "infer": {"max_new_tokens": 1}}), started, wanted="FAILED")
    assert failed["smoke_failure"] and "answers are unusable" in failed["smoke_failure"]
    assert len(hub.revisions(REPO)) == 3  # nothing pushed
    alert = loop["alerts"].wait_for(["Failed", failed["flow_run_id"], "answers are unusable"])
    assert "/runs/flow-run/" in alert["body"] and aliases(loop)["aliases"]["production"]["adapter_key"] == production

    # The line over time: a table and a picture artifact, one row per scored challenger.
    artifacts = httpx.post(f"{loop['api']}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": [f"line-{LINE}-history", f"line-{LINE}"]}}}).json()
    latest = {a["key"]: a for a in sorted(artifacts, key=lambda a: a["created"])}
    rows = json.loads(latest[f"line-{LINE}-history"]["data"])
    assert [row["decision"] for row in rows] == ["promoted", "refused", p3["decision"]]
    assert "data:image/png;base64," in latest[f"line-{LINE}"]["data"]
    keep_for_the_readme(loop)
    total = time.monotonic() - loop["started"]
    print(f"retraining loop end to end: {total:.0f} s (stack up included); made alert: {made['subject']!r}")


def keep_for_the_readme(loop: dict) -> None:
    target = os.environ.get("LORAFLOW_E2E_ARTIFACTS")
    if not target:
        return
    from loraflow.aliases import LineAliases
    from loraflow.report import line_history_png, line_table

    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    record = LineAliases.model_validate(aliases(loop))
    (folder / f"{LINE}.json").write_bytes(record.to_json())
    (folder / "line-history.png").write_bytes(line_history_png(record, "production"))
    (folder / "line-history.json").write_text(json.dumps(line_table(record, "production"), indent=1))
    (folder / "alerts.json").write_text(json.dumps(loop["alerts"].received, indent=1))
    (folder / "runs.json").write_text(json.dumps({name: {"wall_s": round(run["wall"]), "promotion": run["summary"][
        "promotion"], "smoke_failure": run["summary"]["smoke_failure"]} for name, run in loop["runs"].items()}, indent=1))
