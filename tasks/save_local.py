"""save-local: the adapter (PEFT format), tokenizer, model card and summary.json in output.dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.logs import run_logger
from loraflow.retries import retry_transient
from loraflow.store import open_store


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    path = output_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def save_local(store_uri: str, adapter_key: str, output_dir: str, summary: dict[str, Any], model_card: str) -> str:
    """Copy the published adapter out of the store; it reloads with PeftModel.from_pretrained(base, dir)."""
    folder = Path(output_dir).expanduser().resolve()
    open_store(store_uri).get_folder(adapter_key, folder)
    (folder / "README.md").write_text(model_card, encoding="utf-8")
    write_summary(folder, {**summary, "adapter_dir": str(folder)})
    run_logger().info("save-local: adapter, tokenizer, model card and summary.json in %s", folder)
    return str(folder)


@task(name="save-local", cache_policy=NO_CACHE, persist_result=False,
      retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient)
def save_local_task(store_uri: str, adapter_key: str, output_dir: str, summary: dict[str, Any], model_card: str) -> str:
    """Write the adapter and its summary to the output folder."""
    return save_local(store_uri, adapter_key, output_dir, summary, model_card)
