"""The output folder (output.dir): the adapter in PEFT format, its tokenizer, the model card, summary.json, the loss
curve and, with output.save_merged, merged/. Written by one step, last, and whole.

The folder is assembled in a staging folder beside it and swapped in when complete, so a reader (or push-hub, or a
user) never sees half of it, and a rerun leaves no file of an earlier run behind. The run's summary and loss curve
also go to the store, one record per flow run, beside the adapters.

loraflow replaces only what it wrote: the folder's marker (`.loraflow-output.json`) lists every file it wrote, with
size and modification time. A folder holding anything else (the user's files, or a file of ours they changed) is
refused before anything loads, unless output.overwrite is set. A write that fails (no space, no permission) removes
its staging copy, leaves the folder as it was, and says so in one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from loraflow.config import DataConfig, OutputSettings
from loraflow.errors import ConfigError, OutputWriteError
from loraflow.logs import run_logger
from loraflow.store import Store, open_store
from loraflow.summary import LOSS_CURVE_FILE, SUMMARY_FILE, RunSummary

MERGED_FOLDER = "merged"  # inside output.dir
MODEL_CARD_FILE = "README.md"
MARKER_FILE = ".loraflow-output.json"  # what loraflow wrote in the folder; written last


# --- what is in the folder ---------------------------------------------------------------------------------------


def file_stamps(folder: Path) -> dict[str, list[int]]:
    """Every file under `folder` (relative POSIX path) -> [size in bytes, modification time in ns]; the marker left out."""
    stamps = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            relative = path.relative_to(folder).as_posix()
            if relative != MARKER_FILE:
                info = path.lstat()
                stamps[relative] = [info.st_size, info.st_mtime_ns]
    return stamps


def write_marker(folder: Path, run_id: str) -> None:
    """Record what loraflow wrote in `folder` (every file but the marker, as it is now)."""
    marker = {"written_by": "loraflow", "flow_run_id": run_id, "files": file_stamps(folder)}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that loraflow did not write, or that changed since it did (relative paths, sorted); every
    file when there is no marker. Empty for a folder that does not exist or is empty."""
    if not folder.is_dir():
        return []
    try:
        written = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))["files"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # no marker, or not one we can read
        written = {}
    return [name for name, stamp in file_stamps(folder).items() if written.get(name) != stamp]


def reason_of(exc: OSError) -> str:
    """An OSError's cause in words with its errno name ('no space left on device (ENOSPC)'). shutil.Error (a
    copytree that failed) carries one message per file and no errno: the first message's is used."""
    code = exc.errno
    if code is None and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        found = re.search(r"\[Errno (\d+)\]", str(exc.args[0][0][-1]))
        code = int(found.group(1)) if found else None
    if code is None:
        return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(output: OutputSettings, data: DataConfig | None = None) -> Path:
    """Before anything loads: output.dir can be created and written, and holds nothing loraflow would destroy.

    Refused always: a folder that is (or contains) the working directory, the home folder or the store; with
    `data`, an output.dir or a local output.store inside a local data folder (data.uri or data.eval_uri naming a
    folder: the next run would take the newest file there, our summary.json, for its dataset). Refused unless
    output.overwrite: a folder with files loraflow did not write (see foreign_files). Creates nothing.
    Returns the folder, resolved. Raises ConfigError naming output.dir (or output.store) and what is wrong."""
    folder = Path(output.dir).expanduser().resolve()
    if data is not None:
        check_outside_data_folders(output, data)
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            where = "is a file" if ancestor == folder else f"is under {ancestor}, which is a file"
            raise ConfigError(f"output.dir {folder}: {where}, not a folder; choose another output.dir")
    precious = {"the working directory": Path.cwd().resolve(), "your home folder": Path.home().resolve()}
    if "://" not in output.store:
        precious["output.store"] = Path(output.store).expanduser().resolve()
    for what, path in precious.items():
        if path == folder or folder in path.parents:
            raise ConfigError(f"output.dir {folder}: holds {what} ({path}), and a run replaces the whole folder; "
                              "choose a folder of its own, e.g. outputs/run")
    # The output is staged beside the folder and renamed into place: its parent (or the nearest existing ancestor,
    # where the missing folders will be made) must take a new file.
    probe_in = nearest_existing(folder.parent)
    try:
        handle, probe = tempfile.mkstemp(prefix=".loraflow-probe-", dir=probe_in)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output.dir {folder}: cannot write in {probe_in}: {reason_of(exc)}; choose a folder "
                          "you can write, or fix its permissions") from None
    foreign = foreign_files(folder)
    if foreign and not output.overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"output.dir {folder}: holds files loraflow did not write ({shown}), and a run replaces the whole folder; "
            "choose an empty or new folder, or set output.overwrite: true to replace it, those files included"
        )
    return folder



def check_outside_data_folders(output: OutputSettings, data: DataConfig) -> None:
    """Raises ConfigError when output.dir or a local output.store is inside a local folder data.uri or
    data.eval_uri names: what a run writes there (summary.json, manifests) would become the newest data file."""
    from loraflow.sources import is_folder

    written = {"output.dir": output.dir} | ({"output.store": output.store} if "://" not in output.store else {})
    for setting, uri in (("data.uri", data.uri), ("data.eval_uri", data.eval_uri)):
        if not uri or uri.startswith("s3://") or not is_folder(uri):
            continue
        data_folder = Path(uri).expanduser().resolve()
        for what, path in written.items():
            resolved = Path(path).expanduser().resolve()
            if resolved == data_folder or data_folder in resolved.parents:
                raise ConfigError(f"{what} {resolved}: is inside the data folder {setting} {data_folder}, so the next "
                                  "run would read what this one writes there (a summary.json, a manifest) as the "
                                  f"newest data file; put {what} outside it")


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
    """Put the complete `staging` folder at `target`: an earlier folder there is renamed aside first, then removed;
    when the second rename fails, the earlier folder is put back."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_local(
    summary: RunSummary, model_card: str, loss_curve: bytes, store_uri: str, adapter_key: str, merged_key: str | None,
    output_dir: str, overwrite: bool = False,
) -> RunSummary:
    """Write the output folder whole and the run's record to the store; returns the summary as written.

    The adapter reloads with PeftModel.from_pretrained(base, output_dir). Raises ConfigError when the folder holds
    files loraflow did not write (unless `overwrite`), OutputWriteError when it cannot be written (no space, no
    permission: one line naming the folder and the reason; the staging copy is removed, the folder left as it was)."""
    folder = check_output_dir(OutputSettings(dir=output_dir, store=store_uri, overwrite=overwrite))
    summary = summary.model_copy(update={
        "adapter_dir": str(folder), "merged_dir": str(folder / MERGED_FOLDER) if merged_key else None,
    })
    store = open_store(store_uri)
    staging: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
        assemble_output(staging, store, adapter_key, merged_key, model_card, summary, loss_curve)
        write_marker(staging, summary.flow_run_id)
        swap_in(staging, folder)
    except OSError as exc:
        raise OutputWriteError(
            f"save-local: could not write output.dir {folder}: {reason_of(exc)}; the partial copy was removed and "
            f"{'the folder is as it was' if folder.exists() else 'nothing was written there'}"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    keys = run_record_keys(summary.flow_run_id)
    store.put_bytes(loss_curve, keys["loss_curve"])
    store.put_bytes(summary.to_json().encode(), keys["summary"])
    run_logger().info("save-local: adapter, tokenizer, model card, loss curve and summary.json in %s", folder)
    return summary
