"""The adapter a training starts from (`model.init_adapter`): continued fine-tuning of an existing adapter on new data.

`model.init_adapter` names an alias of the run's model line (`production`, `candidate`), a store key
(`adapters/<key>`), or a Hub repo (`hf://owner/name`, `hf://owner/name@revision`). It is resolved once, when the
run plans its training, to something that cannot move: the store key and the digest of its manifest, or the Hub
repo and the commit sha. That identity is part of the train cache key, so a run whose parent moved (a promotion in
between) trains again, and a rerun with the same parent reuses the adapter. summary.json names the parent.

An alias that points nowhere yet (the first run of a line) starts fresh, and says so. The parent's LoRA shape (r,
alpha, target modules) must be the lora section's: its weights are loaded into the freshly attached LoRA layers, so
the backend (PEFT or Unsloth) attaches exactly as for a fresh start.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.config import ALIAS_NAME, FinetuneConfig, LoraSettings
from loraflow.errors import ConfigError
from loraflow.logs import run_logger
from loraflow.store import open_store

HUB_PREFIX = "hf://"
HUB_REF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class ParentAdapter(BaseModel):
    """A resolved init adapter: where it is, and the identity that pins its bytes."""

    source: str  # model.init_adapter as configured
    store_uri: str | None = None
    adapter_key: str | None = None  # adapters/<train key> in the store
    digest: str | None = None  # of its manifest
    hub_repo: str | None = None
    hub_revision: str | None = None  # the commit sha it resolved to

    @property
    def identity(self) -> str:
        """What the train cache key includes: the bytes it starts from, wherever they are."""
        if self.hub_repo:
            return f"hub:{self.hub_repo}@{self.hub_revision}"
        return f"store:{self.adapter_key}#{self.digest}"


def resolve_init_adapter(cfg: FinetuneConfig) -> ParentAdapter | None:
    """model.init_adapter resolved to a pinned ParentAdapter; None for a fresh start (unset, or an alias with no
    target yet). Raises ConfigError for a store key that holds no adapter, a malformed Hub reference, or a parent
    whose LoRA shape differs from the lora section."""
    source = cfg.model.init_adapter
    if not source:
        return None
    if source.startswith(HUB_PREFIX):
        return resolve_hub(source)
    store = open_store(cfg.output.store)
    key = source
    if ALIAS_NAME.match(source):
        from loraflow.aliases import read_aliases

        key = read_aliases(store, cfg.line).target(source)
        if key is None:
            run_logger().info("init adapter: alias %r of line %s points nowhere yet: LoRA starts fresh", source, cfg.line)
            return None
    if not store.has(key):
        raise ConfigError(f"model.init_adapter: {store.uri_of(key)} holds no published adapter (no manifest.json)")
    check_shape(json.loads(store.read_file(key, ADAPTER_CONFIG)), cfg.lora, source)
    parent = ParentAdapter(source=source, store_uri=store.uri, adapter_key=key, digest=store.digest(key))
    run_logger().info("init adapter: %s -> %s (digest %s)", source, key, parent.digest[:12])
    return parent


def resolve_hub(source: str) -> ParentAdapter:
    """hf://owner/name[@revision] -> the commit sha that revision is now (one call to the Hub)."""
    match = HUB_REF.match(source)
    if not match:
        raise ConfigError(f"model.init_adapter: {source!r} is not hf://owner/name or hf://owner/name@revision")
    from huggingface_hub import HfApi

    from loraflow.hub import resolve_hf_token

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=resolve_hf_token())
    info = api.model_info(match["repo"], revision=match["revision"])
    return ParentAdapter(source=source, hub_repo=match["repo"], hub_revision=info.sha)


def check_shape(adapter_config: dict[str, Any], lora: LoraSettings, source: str) -> None:
    """The parent's r, alpha and target modules must be the lora section's (its weights fill the same layers)."""
    theirs = (adapter_config.get("r"), adapter_config.get("lora_alpha"), sorted(adapter_config.get("target_modules") or []))
    ours = (lora.r, lora.alpha, sorted(lora.target_modules))
    if theirs != ours:
        raise ConfigError(
            f"model.init_adapter: {source} has LoRA r={theirs[0]}, alpha={theirs[1]} on {theirs[2]}, but the lora "
            f"section says r={ours[0]}, alpha={ours[1]} on {ours[2]}: make them the same to continue from it"
        )


def fetch_parent(parent: ParentAdapter, folder: Path) -> Path:
    """The parent's files (adapter weights and config) in `folder`: from the store, or the Hub at its commit."""
    if parent.hub_repo:
        from huggingface_hub import snapshot_download

        from loraflow.hub import resolve_hf_token

        return Path(snapshot_download(parent.hub_repo, revision=parent.hub_revision, local_dir=folder,
                                      allow_patterns=[ADAPTER_WEIGHTS, ADAPTER_CONFIG], token=resolve_hf_token(),
                                      endpoint=os.environ.get("HF_ENDPOINT")))
    return open_store(parent.store_uri).get_folder(parent.adapter_key, folder)


def load_parent_weights(model: Any, parent: ParentAdapter, lora: LoraSettings) -> None:
    """Copy the parent's LoRA weights into `model`'s freshly attached LoRA layers (PEFT's
    set_peft_model_state_dict). Raises ConfigError when the shapes differ or a LoRA tensor finds no place."""
    import tempfile

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="loraflow-parent-") as work:
        folder = fetch_parent(parent, Path(work))
        check_shape(json.loads((folder / ADAPTER_CONFIG).read_text()), lora, parent.source)
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, state)
    unplaced = [k for k in result.unexpected_keys if "lora_" in k]
    if unplaced:
        raise ConfigError(f"model.init_adapter: {len(unplaced)} LoRA tensors of {parent.source} fit no layer of this "
                          f"model (e.g. {unplaced[0]}): was it trained on another base model?")
    run_logger().info("attach-LoRA: starting from %s (%d tensors)", parent.source, len(state))
