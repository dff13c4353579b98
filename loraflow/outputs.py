"""The output folder (output.dir): the adapter in PEFT format, its tokenizer, the model card, summary.json, the loss
curve and, with output.save_merged, merged/. Written by one step, last, and whole.

The folder is assembled in a staging folder beside it and swapped in when complete, so a reader (or push-hub, or a
user) never sees half of it, and a rerun leaves no file of an earlier run behind. The run's summary and loss curve
also go to the store, one record per flow run, beside the adapters.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from loraflow.logs import run_logger
from loraflow.store import Store, open_store
from loraflow.summary import LOSS_CURVE_FILE, SUMMARY_FILE, RunSummary

MERGED_FOLDER = "merged"  # inside output.dir
MODEL_CARD_FILE = "README.md"


def run_record_keys(run_id: str) -> dict[str, str]:
    """Where a run's summary and loss curve go in the store."""
    return {"summary": f"summaries/{run_id}.json", "loss_curve": f"summaries/{run_id}/{LOSS_CURVE_FILE}"}


def run_record_uris(store_uri: str, run_id: str) -> dict[str, str]:
    store = open_store(store_uri)
    return {name: store.uri_of(key) for name, key in run_record_keys(run_id).items()}


def assemble_output(
    folder: Path, store: Store, adapter_key: str, merged_key: str | None, model_card: str, summary: RunSummary,
    loss_curve: bytes,
) -> None:
    """Fill `folder` with what a run hands over: the adapter from the store, merged/ when there is one, the card,
    summary.json and the loss curve PNG."""
    store.get_folder(adapter_key, folder)
    if merged_key:
        store.get_folder(merged_key, folder / MERGED_FOLDER)
    (folder / MODEL_CARD_FILE).write_text(model_card, encoding="utf-8")
    (folder / LOSS_CURVE_FILE).write_bytes(loss_curve)
    (folder / SUMMARY_FILE).write_text(summary.to_json(), encoding="utf-8")


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete `staging` folder at `target`: an earlier folder there is renamed aside first, then removed."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def save_local(
    summary: RunSummary, model_card: str, loss_curve: bytes, store_uri: str, adapter_key: str, merged_key: str | None,
    output_dir: str,
) -> RunSummary:
    """Write the output folder whole and the run's record to the store; returns the summary as written.

    The adapter reloads with PeftModel.from_pretrained(base, output_dir). Raises OSError when the folder cannot
    be written (the staging copy is removed)."""
    folder = Path(output_dir).expanduser().resolve()
    summary = summary.model_copy(update={
        "adapter_dir": str(folder), "merged_dir": str(folder / MERGED_FOLDER) if merged_key else None,
    })
    store = open_store(store_uri)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        assemble_output(staging, store, adapter_key, merged_key, model_card, summary, loss_curve)
        swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    keys = run_record_keys(summary.flow_run_id)
    store.put_bytes(loss_curve, keys["loss_curve"])
    store.put_bytes(summary.to_json().encode(), keys["summary"])
    run_logger().info("save-local: adapter, tokenizer, model card, loss curve and summary.json in %s", folder)
    return summary
