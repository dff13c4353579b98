"""push-hub: check the quality gate, create the Hub repo (private by default) and upload the output folder.

The gate (hub.min_eval_accuracy, hub.require_beat_base; off by default) is checked before anything else:
an adapter that misses it fails this task, and the run, with the numbers, and no request reaches the Hub.

The token comes from the environment (HF_TOKEN) or the Prefect Secret block `hf-token`; never from a
flow parameter, and it is never logged. HF_ENDPOINT points huggingface_hub at another server: the
tests use a local stand-in that records requests, since no machine here reaches the real Hub.
"""

from __future__ import annotations

import os

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.config import HubSettings
from loraflow.logs import run_logger
from loraflow.quality import check_quality_gate
from loraflow.retries import retry_transient

HF_TOKEN_BLOCK = "hf-token"


def resolve_hf_token() -> str | None:
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from prefect.blocks.system import Secret

    try:
        return Secret.load(HF_TOKEN_BLOCK).get()
    except ValueError:  # no such block
        return None


def push_hub(
    output_dir: str, hub: HubSettings, token: str | None,
    eval_accuracy: float | None = None, base_eval_accuracy: float | None = None,
) -> str | None:
    """Upload `output_dir` to `hub.repo_id`; returns the repo URL, or None when skipped.

    Raises QualityGateError, before any request, when the accuracies miss the hub.* gate.
    """
    check_quality_gate(hub, eval_accuracy, base_eval_accuracy, output_dir)
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
        folder_path=output_dir,
        repo_id=hub.repo_id,
        repo_type="model",
        commit_message="loraflow: upload LoRA adapter",
        ignore_patterns=["checkpoints/**", "*.tmp"],
    )
    log.info("push-hub: uploaded %s to %s (commit %s)", output_dir, repo_url, commit.oid)
    return str(repo_url)


@task(name="push-hub", retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, persist_result=False)
def push_hub_task(
    output_dir: str, hub: HubSettings, eval_accuracy: float | None = None, base_eval_accuracy: float | None = None
) -> str | None:
    """Push the adapter folder to the Hugging Face Hub when it passes the gate and a repo and a token are set."""
    return push_hub(output_dir, hub, resolve_hf_token(), eval_accuracy, base_eval_accuracy)
