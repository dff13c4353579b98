"""Pushing to the Hugging Face Hub with huggingface_hub: create the repo (private by default), upload a folder.

Where a run's push goes follows its promotion (`hub_target`): a promoted adapter (or one that is production already,
or any adapter when promote.enabled is off) goes to `main`, tagged `run-<flow run id>`; one that is not promoted
goes to the branch `candidates/<flow run id>` (created from main), or nowhere with hub.push_candidates false. An
adapter that misses the quality gate, or whose smoke-infer answers were refused, is never pushed.

The token comes from the environment (HF_TOKEN) or the Prefect Secret block `hf-token`; never from a flow
parameter, and it is never logged. HF_ENDPOINT points huggingface_hub at another server: the tests use a local
stand-in that records requests, since no machine here reaches the real Hub.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from loraflow.config import HubSettings
from loraflow.logs import run_logger
from loraflow.outputs import assemble_output
from loraflow.quality import check_quality_gate
from loraflow.store import open_store
from loraflow.summary import RunSummary

HF_TOKEN_BLOCK = "hf-token"


def resolve_hf_token() -> str | None:
    """HF_TOKEN from the environment, else the Prefect Secret block `hf-token`, else None."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from prefect.blocks.system import Secret

    try:
        return Secret.load(HF_TOKEN_BLOCK).get()
    except ValueError:  # no such block
        return None


MAIN = "main"


def hub_target(summary: RunSummary, hub: HubSettings) -> tuple[str, str | None] | None:
    """(revision, tag) the run's push goes to: ("main", "run-<id>") when promoted, kept or promotion is off;
    ("candidates/<id>", None) when not promoted; None when not promoted and hub.push_candidates is false, or when
    this adapter was refused against this champion before (a rerun on unchanged data: it is on its branch already)."""
    promotion = summary.promotion
    if promotion is None or promotion.decision == "off" or promotion.promoted:
        return MAIN, f"run-{summary.flow_run_id}"
    if promotion.repeat:
        return None
    return (f"candidates/{summary.flow_run_id}", None) if hub.push_candidates else None


def push_hub(
    folder: str, hub: HubSettings, token: str | None,
    eval_accuracy: float | None = None, base_eval_accuracy: float | None = None,
    revision: str = MAIN, tag: str | None = None, tag_message: str | None = None,
) -> str | None:
    """Upload `folder` to `hub.repo_id` at `revision` (a branch: created from main unless it is main), then tag the
    commit with `tag`; returns the repo URL, or None when skipped (no repo or no token).

    Raises QualityGateError, before any request, when the accuracies miss the hub.* gate: whoever calls it, an
    adapter that misses the gate is never uploaded."""
    check_quality_gate(hub, eval_accuracy, base_eval_accuracy, folder)
    log = run_logger()
    if not hub.repo_id:
        log.info("push-hub: skipped (hub.repo_id is not set)")
        return None
    if not token:
        log.info("push-hub: skipped (no token: set HF_TOKEN or create the Prefect Secret block '%s')", HF_TOKEN_BLOCK)
        return None
    from huggingface_hub import HfApi

    # Read HF_ENDPOINT now, not when huggingface_hub was imported; None means the public Hub.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    repo_url = api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
    if revision != MAIN:
        api.create_branch(hub.repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=hub.repo_id,
        repo_type="model",
        revision=revision,
        commit_message="loraflow: upload LoRA adapter",
        ignore_patterns=["checkpoints/**", "*.tmp"],
    )
    if tag:
        api.create_tag(hub.repo_id, tag=tag, revision=commit.oid, tag_message=tag_message, repo_type="model",
                       exist_ok=True)
    log.info("push-hub: uploaded %s to %s at %s (commit %s%s)", folder, repo_url, revision, commit.oid,
             f", tag {tag}" if tag else "")
    return str(repo_url)


def push_run(
    summary: RunSummary, model_card: str, loss_curve: bytes, store_uri: str, adapter_key: str, merged_key: str | None,
    hub: HubSettings,
) -> dict[str, str | None]:
    """Upload what the output folder will hold (adapter, tokenizer, card, summary, loss curve, merged/), assembled
    from the store in a temporary folder, where hub_target says; returns the summary's hub fields (hub_url,
    hub_revision, hub_tag), all None when nothing was pushed."""
    target = hub_target(summary, hub)
    if target is None:
        run_logger().info("push-hub: skipped (not promoted, and hub.push_candidates is off or it was pushed before)")
        return {"hub_url": None, "hub_revision": None, "hub_tag": None}
    revision, tag = target
    message = None
    if tag:
        accuracy = "" if summary.eval_accuracy is None else f", eval accuracy {summary.eval_accuracy:.4f}"
        message = f"loraflow run {summary.flow_run_id}{accuracy}"
    with tempfile.TemporaryDirectory(prefix="loraflow-push-") as folder:
        assemble_output(Path(folder), open_store(store_uri), adapter_key, merged_key, model_card, summary, loss_curve)
        url = push_hub(folder, hub, resolve_hf_token(), summary.eval_accuracy, summary.base_eval_accuracy,
                       revision=revision, tag=tag, tag_message=message)
    pushed = url is not None
    return {"hub_url": url, "hub_revision": revision if pushed else None, "hub_tag": tag if pushed else None}
