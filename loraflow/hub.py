"""Pushing to the Hugging Face Hub with huggingface_hub: create the repo (private by default), upload a folder.

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


def push_hub(
    folder: str, hub: HubSettings, token: str | None,
    eval_accuracy: float | None = None, base_eval_accuracy: float | None = None,
) -> str | None:
    """Upload `folder` to `hub.repo_id`; returns the repo URL, or None when skipped (no repo or no token).

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
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=hub.repo_id,
        repo_type="model",
        commit_message="loraflow: upload LoRA adapter",
        ignore_patterns=["checkpoints/**", "*.tmp"],
    )
    log.info("push-hub: uploaded %s to %s (commit %s)", folder, repo_url, commit.oid)
    return str(repo_url)


def push_run(
    summary: RunSummary, model_card: str, loss_curve: bytes, store_uri: str, adapter_key: str, merged_key: str | None,
    hub: HubSettings,
) -> str | None:
    """Upload what the output folder will hold (adapter, tokenizer, card, summary, loss curve, merged/), assembled
    from the store in a temporary folder; returns the repo URL, or None when skipped."""
    with tempfile.TemporaryDirectory(prefix="loraflow-push-") as folder:
        assemble_output(Path(folder), open_store(store_uri), adapter_key, merged_key, model_card, summary, loss_curve)
        return push_hub(folder, hub, resolve_hf_token(), summary.eval_accuracy, summary.base_eval_accuracy)
