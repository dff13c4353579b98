"""`loraflow store gc`: delete what nothing in the store needs any more, safely while runs are writing.

What a pass finds deletable (a "candidate"), by kind:

    kind                     where                                   deletable when
    cut-short upload         a folder without manifest.json, a       last written more than `grace` ago
                             hidden staging folder or temporary
                             file, a file no manifest lists
    orphan blob (S3)         blobs/<sha256>                          no manifest gc keeps lists it, and older than `grace`
    candidate adapter        adapters/<key>/                         published more than `candidate_retention_days` ago,
                                                                     no current alias and no kept summary points at it
    merged model             merged/<key>-<dtype>/                   its adapter goes (or is gone and it is that old)
    superseded checkpoint    checkpoints/<key>/step-N-<attempt>/     adapters/<key> is published; all but the newest
                                                                     `keep_checkpoints`
    checkpoint of an expired adapter                                 adapters/<key> goes
    abandoned checkpoint                                             no adapters/<key>, newest checkpoint older than
                                                                     `candidate_retention_days`
    superseded compile cache compile-cache/<tag>/<digest>/           its tag's latest.json names another folder (each
                                                                     publish is a superset), and older than `grace`
    summary                  summaries/<run>.json, summaries/<run>/  older than `retention_days`
    Prefect result           results/...                             older than `retention_days`
    prompt set               prompts/<sha256>.json                   older than `retention_days` (rewritten by every
                                                                     training on more than one rank that reads it)

Everything else (aliases/, gc/, the compile caches' latest.json pointers, datasets or anything under the store's
prefix that loraflow did not write) is never touched. Aliases are read from aliases/<line>.json ({"line", "aliases": {name: {"adapter_key"}}, "history"});
every adapter a current alias points at is kept, and so is every adapter a kept summary's `adapter_uri` names.

Two phases, so a pass is safe while runs write: a candidate is only *marked* (gc/marks.json, with the time);
a later pass deletes it once it was marked at least `grace` ago, is still a candidate, and was not written since.
An upload in flight is never a candidate long enough: its manifest lands and its files are listed. Deleting goes
folder by folder, manifest first, and blobs last, after the manifests are listed again, so no manifest is left
pointing at a deleted blob; a run that reused a blob in the moment gc deleted it uploads it again
(S3Store.put_folder checks the blobs it reused after writing its manifest). `grace_hours=0` deletes in one pass:
only for a store nothing writes to.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from loraflow.checkpoints import CHECKPOINT_NAME
from loraflow.errors import ConfigError, StoreDataError
from loraflow.manifest import MANIFEST
from loraflow.store import open_store
from loraflow.store_objects import (
    FOLDER_DEPTH, POINTER_NAMES, LocalObjects, ObjectAccess, StoredObject, human_bytes, is_hidden, listed_objects,
    maintenance_logger, object_access, read_manifest,
)

MARKS_KEY = "gc/marks.json"
DAY, HOUR = 86400.0, 3600.0


@dataclass(frozen=True)
class GcPolicy:
    """What gc keeps. Durations are floats, so tests (and the impatient) can use fractions."""

    grace_hours: float = 24.0  # between mark and sweep; also the least age of an orphan or a cut-short upload
    keep_checkpoints: int = 1  # complete checkpoints kept per train key whose adapter is published
    retention_days: float = 30.0  # summaries and Prefect results; a kept summary keeps its adapter
    candidate_retention_days: float = 90.0  # adapters no alias and no kept summary points at

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ConfigError(f"store gc: {name} must be >= 0, got {value}")


@dataclass
class GcItem:
    """One thing gc deletes or marks: a folder (with all its objects) or a single object."""

    kind: str
    key: str  # the folder or object, relative to the store's root
    objects: list[StoredObject]
    reason: str
    folder: str | None = None  # a whole folder goes (local: one rename; S3: every object under it)
    complete: bool = False  # the folder has a manifest: it goes first, so no reader sees half of it
    marked_at: float = 0.0

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def modified(self) -> float:
        return max((o.modified for o in self.objects), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "bytes": self.size, "reason": self.reason,
                "marked_at": self.marked_at}


@dataclass
class GcReport:
    """What a pass did (or, dry, would do): the items deleted and the items marked, with their bytes."""

    store: str
    now: float
    policy: GcPolicy
    dry_run: bool
    deleted: list[GcItem] = field(default_factory=list)  # gone now (dry run: would be)
    marked: list[GcItem] = field(default_factory=list)  # candidates a later pass deletes if still unused

    @property
    def deleted_bytes(self) -> int:
        return sum(item.size for item in self.deleted)

    @property
    def marked_bytes(self) -> int:
        return sum(item.size for item in self.marked)

    def lines(self) -> list[str]:
        """What a person reads: the settings, one line per item (action, kind, key, bytes, why), the totals."""
        p = self.policy
        verb, mark = ("would delete", "would mark") if self.dry_run else ("deleted", "marked")
        out = [f"store gc {self.store}{' (dry run: nothing is deleted or marked)' if self.dry_run else ''}: "
               f"grace {p.grace_hours:g} h, keep {p.keep_checkpoints} checkpoint(s) per published adapter, "
               f"summaries and results {p.retention_days:g} days, candidate adapters {p.candidate_retention_days:g} days"]
        for action, items in ((verb, self.deleted), (mark, self.marked)):
            for item in sorted(items, key=lambda i: (i.kind, i.key)):
                out.append(f"  {action:12} {item.kind:33} {item.key}  {human_bytes(item.size)}  ({item.reason})")
        due = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.now + p.grace_hours * HOUR))
        out.append(f"{verb} {len(self.deleted)} items, {self.deleted_bytes} bytes ({human_bytes(self.deleted_bytes)}); "
                   f"{mark} {len(self.marked)} items, {self.marked_bytes} bytes ({human_bytes(self.marked_bytes)})"
                   + (f", which a gc from {due} on deletes if they are still unused" if self.marked else ""))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"store": self.store, "dry_run": self.dry_run, "policy": asdict(self.policy),
                "deleted": [i.as_dict() for i in self.deleted], "deleted_bytes": self.deleted_bytes,
                "marked": [i.as_dict() for i in self.marked], "marked_bytes": self.marked_bytes}


def adapter_key_of(reference: str) -> str | None:
    """'adapters/<key>', from a store key or any URI or path that ends in .../adapters/<key>[/...]; else None."""
    reference = reference.rstrip("/")
    if reference.startswith("adapters/"):
        tail = reference[len("adapters/"):]
    elif "/adapters/" in reference:
        tail = reference.rsplit("/adapters/", 1)[1]
    else:
        return None
    name = tail.split("/")[0]
    return f"adapters/{name}" if name else None


def read_aliases(access: ObjectAccess) -> dict[str, list[str]]:
    """Adapter key -> the aliases pointing at it now (`<line>:<alias>`), from aliases/<line>.json.

    No aliases/ at all is fine (an empty dict). Raises StoreDataError for a file that is not the documented shape:
    gc must not delete an adapter because it could not read what pointed at it."""
    pointed: dict[str, list[str]] = defaultdict(list)
    for obj in access.list("aliases/"):
        name = obj.key.rsplit("/", 1)[-1]
        if name.startswith(".") or not name.endswith(".json"):
            continue
        try:
            document = json.loads(access.read(obj.key))
            aliases = document["aliases"]
            targets = {alias: entry["adapter_key"] for alias, entry in aliases.items()}
        except FileNotFoundError:
            continue  # the line was removed while we looked
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreDataError(f"{obj.key}: not an alias file of the form "
                                 '{"line": ..., "aliases": {"production": {"adapter_key": "adapters/<key>"}}} '
                                 f"({type(exc).__name__}: {exc}); gc stopped, nothing deleted") from None
        line = document.get("line") or name.removesuffix(".json")
        for alias, target in targets.items():
            key = adapter_key_of(str(target))
            if key is None:
                raise StoreDataError(f"{obj.key}: alias {alias!r} points at {target!r}, not adapters/<key>; "
                                     "gc stopped, nothing deleted")
            pointed[key].append(f"{line}:{alias}")
    return dict(pointed)


@dataclass
class Inventory:
    """The store as gc sees it at one moment."""

    folders: dict[str, list[StoredObject]]  # adapters/<k>, merged/<m>, checkpoints/<k>/<c> -> their objects
    manifests: dict[str, dict]  # complete folder -> its manifest
    leftovers: list[GcItem]  # hidden or manifest-less things: cut-short uploads (age not yet judged)
    blobs: list[StoredObject]
    summaries: dict[str, list[StoredObject]]  # run id -> summaries/<id>.json and summaries/<id>/*
    results: list[StoredObject]  # Prefect results and the prompt sets of multi-rank trainings
    pointers: list[StoredObject] = field(default_factory=list)  # compile-cache/<tag>/latest.json


def take_inventory(access: ObjectAccess) -> Inventory:
    """List the store once and read every manifest."""
    inventory = Inventory({}, {}, [], [], defaultdict(list), [])
    folders: dict[str, list[StoredObject]] = defaultdict(list)
    hidden: dict[str, list[StoredObject]] = defaultdict(list)
    for category, depth in FOLDER_DEPTH.items():
        for obj in access.list(f"{category}/"):
            parts = obj.key.split("/")
            if len(parts) == depth and parts[-1] == POINTER_NAMES.get(category):
                inventory.pointers.append(obj)  # read below; never deleted
                continue
            folder = "/".join(parts[:depth])
            if len(parts) <= depth or is_hidden(folder):  # a temporary file or staging folder where folders live
                hidden[folder if len(parts) > depth else obj.key].append(obj)
            else:
                folders[folder].append(obj)
    for key, objects in hidden.items():
        inventory.leftovers.append(GcItem("cut-short upload", key, objects, "a staging folder or temporary file",
                                          folder=key if len(objects) > 1 or objects[0].key != key else None))
    shared = not isinstance(access, LocalObjects)
    for folder, objects in folders.items():
        try:
            manifest = read_manifest(access, folder) if any(o.key == f"{folder}/{MANIFEST}" for o in objects) else None
        except StoreDataError as exc:
            raise StoreDataError(f"{exc}; gc stopped, nothing deleted: run `loraflow store verify`") from None
        if manifest is None:
            inventory.leftovers.append(GcItem("cut-short upload", folder, objects, f"no {MANIFEST}", folder=folder))
            continue
        inventory.folders[folder] = objects
        inventory.manifests[folder] = manifest
        listed = listed_objects(folder, manifest, shared)
        for obj in objects:
            if obj.key not in listed:  # e.g. nanio's temporary file of a manifest PUT cut short
                inventory.leftovers.append(GcItem("cut-short upload", obj.key, [obj], f"{folder}'s manifest does not list it"))
    for obj in access.list("blobs/"):
        if is_hidden(obj.key):
            inventory.leftovers.append(GcItem("cut-short upload", obj.key, [obj], "a temporary file"))
        else:
            inventory.blobs.append(obj)
    for obj in access.list("summaries/"):
        if is_hidden(obj.key):
            inventory.leftovers.append(GcItem("cut-short upload", obj.key, [obj], "a temporary file"))
        else:
            run_id = obj.key.split("/")[1].removesuffix(".json")
            inventory.summaries[run_id].append(obj)
    inventory.results = access.list("results/") + access.list("prompts/")
    return inventory


def summary_adapter(access: ObjectAccess, objects: list[StoredObject]) -> str | None:
    """The adapter a run summary names, None when it names none or cannot be read (a run that failed early)."""
    for obj in objects:
        if obj.key.count("/") == 1 and obj.key.endswith(".json"):
            try:
                return adapter_key_of(str(json.loads(access.read(obj.key)).get("adapter_uri") or ""))
            except (FileNotFoundError, ValueError, AttributeError):
                maintenance_logger().warning("store gc: %s could not be read; it keeps no adapter", obj.key)
    return None


def compile_caches_named(access: ObjectAccess, pointers: list[StoredObject]) -> set[str]:
    """The compile-cache folders that their tag's latest.json names (loraflow/compile_cache.py): kept. A pointer that
    cannot be read keeps every folder of its tag."""
    named = set()
    for pointer in pointers:
        try:
            named.add(str(json.loads(access.read(pointer.key))["key"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            maintenance_logger().warning("store gc: %s could not be read; its compile caches are kept", pointer.key)
            named.add(pointer.key.rsplit("/", 1)[0] + "/")
    return named


def find_candidates(access: ObjectAccess, inventory: Inventory, policy: GcPolicy, now: float) -> list[GcItem]:
    """Everything the rules in this module's docstring find deletable now (before the two-phase check)."""
    grace = policy.grace_hours * HOUR
    candidates = [item for item in inventory.leftovers if now - item.modified > grace]

    def age_days(obj: StoredObject) -> float:
        return (now - obj.modified) / DAY

    kept_summaries, protected = 0, dict(read_aliases(access))
    for run_id, objects in inventory.summaries.items():
        newest = max(objects, key=lambda o: o.modified)
        if age_days(newest) > policy.retention_days:
            candidates.append(GcItem("summary", f"summaries/{run_id}", objects,
                                     f"{age_days(newest):.1f} days old > {policy.retention_days:g}"))
            continue
        kept_summaries += 1
        adapter = summary_adapter(access, objects)
        if adapter:
            protected.setdefault(adapter, []).append(f"run {run_id}")
    for obj in inventory.results:
        if is_hidden(obj.key) and now - obj.modified > grace:
            candidates.append(GcItem("cut-short upload", obj.key, [obj], "a temporary file"))
        elif not is_hidden(obj.key) and age_days(obj) > policy.retention_days:
            kind = "prompt set" if obj.key.startswith("prompts/") else "Prefect result"
            candidates.append(GcItem(kind, obj.key, [obj], f"{age_days(obj):.1f} days old > {policy.retention_days:g}"))

    def manifest_object(folder: str) -> StoredObject:
        return next(o for o in inventory.folders[folder] if o.key == f"{folder}/{MANIFEST}")

    def folder_item(kind: str, folder: str, reason: str) -> GcItem:
        return GcItem(kind, folder, inventory.folders[folder], reason, folder=folder, complete=True)

    published = {f for f in inventory.folders if f.startswith("adapters/")}
    expiring = set()
    for adapter in sorted(published):
        age = age_days(manifest_object(adapter))
        if adapter in protected or age <= policy.candidate_retention_days:
            continue
        expiring.add(adapter)
        candidates.append(folder_item("candidate adapter", adapter,
                                      f"published {age:.1f} days ago > {policy.candidate_retention_days:g}; no alias "
                                      f"and none of the {kept_summaries} kept summaries points at it"))
    for merged in sorted(f for f in inventory.folders if f.startswith("merged/")):
        adapter = "adapters/" + merged.split("/")[1].rsplit("-", 1)[0]
        if adapter in expiring:
            candidates.append(folder_item("merged model", merged, f"{adapter} goes"))
        elif adapter not in published and age_days(manifest_object(merged)) > policy.candidate_retention_days:
            candidates.append(folder_item("merged model", merged, f"{adapter} is gone"))

    named = compile_caches_named(access, inventory.pointers)
    for folder in sorted(f for f in inventory.folders if f.startswith("compile-cache/")):
        age = now - manifest_object(folder).modified
        kept = folder in named or folder.rsplit("/", 1)[0] + "/" in named
        if not kept and age > grace:  # a publish names its folder just after writing it
            candidates.append(folder_item("superseded compile cache", folder,
                                          f"{folder.rsplit('/', 1)[0]}/latest.json names a newer one"))

    by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for folder in inventory.folders:
        if folder.startswith("checkpoints/"):
            match = CHECKPOINT_NAME.match(folder.split("/")[2])
            if match:  # a name loraflow did not write is not ours to judge
                by_key[folder.split("/")[1]].append((int(match.group(1)), folder))
    for train_key, found in by_key.items():
        found.sort(reverse=True)  # newest (highest step) first, as loraflow.checkpoints orders them
        adapter = f"adapters/{train_key}"
        if adapter in expiring:
            candidates += [folder_item("checkpoint of an expired adapter", f, f"{adapter} goes") for _, f in found]
        elif adapter in published:
            candidates += [folder_item("superseded checkpoint", f, f"{adapter} is published; the newest "
                                       f"{policy.keep_checkpoints} kept") for _, f in found[policy.keep_checkpoints:]]
        else:
            newest = min(age_days(manifest_object(f)) for _, f in found)  # the youngest checkpoint's age
            if newest > policy.candidate_retention_days:
                candidates += [folder_item("abandoned checkpoint", f, f"no {adapter}; newest checkpoint {newest:.1f} "
                                           f"days old > {policy.candidate_retention_days:g}") for _, f in found]

    going = {item.folder for item in candidates if item.complete}
    referenced = set()
    shared = not isinstance(access, LocalObjects)
    for folder, manifest in inventory.manifests.items():
        if folder not in going:
            referenced |= listed_objects(folder, manifest, shared)
    for blob in inventory.blobs:
        if blob.key not in referenced and now - blob.modified > grace:
            candidates.append(GcItem("orphan blob", blob.key, [blob], "no manifest that stays lists it"))
    return candidates


def load_marks(access: ObjectAccess) -> dict[str, dict[str, Any]]:
    """Key -> {kind, marked_at} from earlier passes; none when there is no marks file or it cannot be read."""
    try:
        return json.loads(access.read(MARKS_KEY)).get("marks", {})
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError):
        maintenance_logger().warning("store gc: %s is not valid JSON; starting the marks afresh", MARKS_KEY)
        return {}


def newly_listed(access: ObjectAccess, known: set[str]) -> set[str]:
    """Objects listed by manifests written since the inventory (runs go on while gc sweeps)."""
    shared = not isinstance(access, LocalObjects)
    listed = set()
    for category in ("adapters", "merged", "checkpoints"):
        for obj in access.list(f"{category}/"):
            folder = obj.key.removesuffix(f"/{MANIFEST}")
            if obj.key.endswith(f"/{MANIFEST}") and folder not in known and not is_hidden(folder):
                manifest = read_manifest(access, folder)
                if manifest is not None:
                    listed |= listed_objects(folder, manifest, shared)
    return listed


def delete_item(access: ObjectAccess, item: GcItem) -> None:
    """A complete folder loses its manifest first, so readers stop seeing it before any file goes."""
    if isinstance(access, LocalObjects) and item.folder:
        access.delete_folder(item.folder)
        return
    keys = [o.key for o in item.objects]
    if item.complete:
        manifest = f"{item.folder}/{MANIFEST}"
        access.delete([manifest])
        keys = [k for k in keys if k != manifest]
    access.delete(keys)


def collect_garbage(store_uri: str, policy: GcPolicy, dry_run: bool = False, now: float | None = None) -> GcReport:
    """One gc pass over the store at `store_uri` (a local folder or s3://bucket/prefix): delete the candidates
    marked at least `policy.grace_hours` ago and unchanged since, mark the new ones; with `dry_run` change nothing.

    Returns the report (its `lines()` are also logged). Raises StoreUnavailableError when the store cannot be
    reached (after the store's retries), StoreConfigError for a missing bucket or refused credentials,
    StoreDataError when a manifest or alias file cannot be read (then nothing is deleted)."""
    store = open_store(store_uri)
    store.check()
    access = object_access(store)
    now = time.time() if now is None else now
    grace = policy.grace_hours * HOUR
    report = GcReport(store.uri, now, policy, dry_run)
    inventory = take_inventory(access)
    marks = load_marks(access)
    for item in find_candidates(access, inventory, policy, now):
        mark = marks.get(item.key)
        # Written again after it was marked: whoever wrote it may still need it, so the clock starts over.
        item.marked_at = mark["marked_at"] if mark and item.modified <= mark["marked_at"] else now
        (report.deleted if item.marked_at <= now - grace else report.marked).append(item)
    # A blob goes only with every manifest that lists it: one of them merely marked (its clock restarted) keeps it.
    going = {item.folder for item in report.deleted if item.complete}
    shared = not isinstance(access, LocalObjects)
    still_listed = set().union(*(listed_objects(f, m, shared) for f, m in inventory.manifests.items() if f not in going))
    for item in [i for i in report.deleted if i.kind == "orphan blob" and i.key in still_listed]:
        report.deleted.remove(item)
        report.marked.append(item)

    if not dry_run:
        order = {True: 0, False: 1}  # folders with a manifest first, blobs last (below)
        blobs = [i for i in report.deleted if i.kind == "orphan blob"]
        for item in sorted((i for i in report.deleted if i.kind != "orphan blob"), key=lambda i: order[i.complete]):
            delete_item(access, item)
        if blobs:
            again = newly_listed(access, set(inventory.manifests))
            for item in [i for i in blobs if i.key in again]:  # a run published a folder that lists it after all
                report.deleted.remove(item)
            access.delete([i.key for i in report.deleted if i.kind == "orphan blob"])
        marks_body = {"written_at": now, "grace_hours": policy.grace_hours,
                      "marks": {i.key: {"kind": i.kind, "marked_at": i.marked_at} for i in report.marked}}
        store.put_bytes(json.dumps(marks_body, indent=1).encode(), MARKS_KEY)
    for line in report.lines():
        maintenance_logger().info("%s", line)
    return report
