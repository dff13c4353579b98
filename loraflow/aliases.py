"""Named aliases of a model line (`production`, `candidate`, ...), each pointing at an adapter in the store, with
the history of every change.

One JSON object per line, at store key `aliases/<line>.json`:

    {"line": "<line>",
     "aliases": {"production": {"adapter_key": "adapters/<train key>", "at": <epoch s>, "flow_run_id": ..., "by": ...,
                                "scores": {...}}, "candidate": {...}},
     "history": [{"alias": ..., "adapter_key": ..., "previous_adapter_key": ..., "at": <epoch s>, "flow_run_id": ...,
                  "by": ..., "decision": ..., "reason": ..., "scores": {...}, "details": {...}}, ...]}

The history only grows: every move is appended, oldest first. Updates are compare-and-swap (read the record and its
version, change it, write it only if the version is unchanged, else read again), so a concurrent writer's change
is never lost: locally by a lock file and a rename, on S3 by a conditional PUT (If-Match on the ETag; see
`S3Store.put_if_match` for servers that ignore it). Other tools read this file (a garbage collector keeps every
adapter an alias or the history names): keys are only ever added.
"""

from __future__ import annotations

import getpass
import json
import random
import socket
import time
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from loraflow.errors import ConfigError
from loraflow.store import Store

ALIASES_PREFIX = "aliases"
CAS_ATTEMPTS = 50


class AliasTarget(BaseModel):
    """Where an alias points now, and the move that put it there."""

    model_config = ConfigDict(extra="allow")

    adapter_key: str  # adapters/<train key>
    at: float  # epoch seconds
    flow_run_id: str | None = None
    by: str = ""
    scores: dict[str, Any] = Field(default_factory=dict)


class HistoryEntry(BaseModel):
    """One move of one alias."""

    model_config = ConfigDict(extra="allow")

    alias: str
    adapter_key: str
    previous_adapter_key: str | None = None
    at: float
    flow_run_id: str | None = None
    by: str = ""
    decision: str | None = None  # promoted | refused | manual
    reason: str = ""
    scores: dict[str, Any] = Field(default_factory=dict)  # accuracies (0..1), the paired test's numbers
    details: dict[str, Any] = Field(default_factory=dict)  # dataset, eval set, parent adapter, run link


class LineAliases(BaseModel):
    model_config = ConfigDict(extra="allow")

    line: str
    aliases: dict[str, AliasTarget] = Field(default_factory=dict)
    history: list[HistoryEntry] = Field(default_factory=list)

    def target(self, alias: str) -> str | None:
        """The adapter key `alias` points at, or None."""
        found = self.aliases.get(alias)
        return found.adapter_key if found else None

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n").encode()


def aliases_key(line: str) -> str:
    """The store key of a line's record: `aliases/<line>.json`."""
    return f"{ALIASES_PREFIX}/{line}.json"


def read_aliases(store: Store, line: str) -> LineAliases:
    """The line's aliases and history; an empty record when the line has none yet."""
    data, _ = store.read_versioned(aliases_key(line))
    return LineAliases.model_validate_json(data) if data else LineAliases(line=line)


def update_aliases(store: Store, line: str, change: Callable[[LineAliases], LineAliases | None]) -> LineAliases:
    """Apply `change` to the line's current record and write it by compare-and-swap, retrying on a concurrent
    writer's change (at most CAS_ATTEMPTS times, with a short random back-off); `change` returning None writes
    nothing. Returns the record as written (or as read, when nothing changed). Raises RuntimeError when every
    attempt lost to another writer."""
    key = aliases_key(line)
    store.conditional_writes()  # warns once where the S3 server ignores If-Match
    for attempt in range(CAS_ATTEMPTS):
        data, version = store.read_versioned(key)
        current = LineAliases.model_validate_json(data) if data else LineAliases(line=line)
        changed = change(current.model_copy(deep=True))
        if changed is None:
            return current
        if store.put_if_match(key, changed.to_json(), version):
            return changed
        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    raise RuntimeError(f"{store.uri_of(key)}: gave up after {CAS_ATTEMPTS} concurrent updates")


def with_move(record: LineAliases, alias: str, adapter_key: str, at: float, **entry: Any) -> LineAliases:
    """`record` with `alias` pointing at `adapter_key` and the move appended to the history (pure)."""
    previous = record.target(alias)
    fields = {k: v for k, v in entry.items() if k in AliasTarget.model_fields}
    record.aliases[alias] = AliasTarget(adapter_key=adapter_key, at=at, **fields)
    record.history.append(HistoryEntry(alias=alias, adapter_key=adapter_key, previous_adapter_key=previous, at=at,
                                       **entry))
    return record


def move_aliases(store: Store, line: str, moves: dict[str, str], **entry: Any) -> LineAliases:
    """Point each alias in `moves` ({alias: adapter key}) at its adapter in one write, with one history entry per
    alias; `entry` fills the entries (flow_run_id, by, decision, reason, scores, details)."""
    at = time.time()

    def change(record: LineAliases) -> LineAliases:
        for alias, adapter_key in moves.items():
            with_move(record, alias, adapter_key, at, **entry)
        return record

    return update_aliases(store, line, change)


def who() -> str:
    """`user@host`, for moves made by hand."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name (a container without a passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def promote_by_hand(store: Store, line: str, alias: str, adapter_key: str, reason: str = "") -> LineAliases:
    """`loraflow promote`: point `alias` at a published adapter, recorded as a manual move by `user@host`.

    Raises ConfigError when `adapter_key` is no complete adapter in the store."""
    if not store.has(adapter_key):
        raise ConfigError(f"{store.uri_of(adapter_key)}: no published adapter there (no manifest.json)")
    return move_aliases(store, line, {alias: adapter_key}, by=f"{who()} (loraflow promote)", decision="manual",
                        reason=reason or "moved by hand")
