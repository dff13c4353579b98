"""The compile cache through the store (loraflow/compile_cache.py): what one machine compiled, a fresh one
restores before its first step, in a local store and in S3 (nanio on 127.0.0.1). The kernels' effect on the first
step is a GPU figure (docs/benchmarks.md); here, that the right files travel and nothing is replaced or lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from loraflow.compile_cache import cached_files, latest_pointer, publish_compile_cache, restore_compile_cache
from loraflow.store import Store, open_store
from tests.s3_server import nanio_server, use_s3_here

TAG = "2.11.0_cu130-5.17.0-2026.10.9-2026.10.9-py3.12-sm90"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"))
        return
    data = tmp_path / "nanio"
    data.mkdir()
    with nanio_server(data) as endpoint:
        use_s3_here(endpoint, monkeypatch).create_bucket(Bucket="kernels")
        yield open_store("s3://kernels/runs")


def compiled(root: Path, files: dict[str, bytes]) -> Path:
    """A compile cache as Unsloth, Inductor and Triton leave one: finished files, plus a lock and a file in the making."""
    in_the_making = {"triton/abc123/__grp__k.json.tmp.pid_7_1": b"half", "inductor/locks/x.lock": b"",
                     "inductor/fxgraph/.71.140.tmp": b"half", "unsloth/__pycache__/m.cpython-312.pyc": b"pyc"}
    for name, data in {**files, **in_the_making}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_fresh_machine_restores_what_another_compiled_and_adds_its_own(store: Store, tmp_path: Path) -> None:
    first = compiled(tmp_path / "a" / "compile", {
        "unsloth/unsloth_compiled_module_llama.py": b"# generated", "triton/abc123/kernel.cubin": b"\x7fELF cubin",
        "inductor/fxgraph/ab/entry": b"graph", "triton/blocked/triton_blocked_lock_free.cubin": b"a name with lock in it"})
    assert publish_compile_cache(store, TAG, first) == 4  # the finished files, not the lock or the half-written one
    assert publish_compile_cache(store, TAG, first) == 0  # nothing new: nothing published again

    fresh = tmp_path / "b" / "compile"
    assert restore_compile_cache(store, TAG, fresh) == 4
    assert cached_files(fresh) == cached_files(first) == sorted(
        ["inductor/fxgraph/ab/entry", "triton/abc123/kernel.cubin", "triton/blocked/triton_blocked_lock_free.cubin",
         "unsloth/unsloth_compiled_module_llama.py"])
    assert (fresh / "triton/abc123/kernel.cubin").read_bytes() == b"\x7fELF cubin"
    assert not (fresh / "inductor/locks").exists() and not list(fresh.rglob("*.tmp*")) and not list(fresh.rglob("*.pyc"))
    assert [p.name for p in fresh.parent.iterdir()] == ["compile"]  # no staging folder left beside it
    assert restore_compile_cache(store, TAG, fresh) == 0  # all here already

    # The fresh machine compiles a kernel of another shape: its publish is the union, and the first machine gets it.
    (fresh / "triton/def456").mkdir()
    (fresh / "triton/def456/kernel.cubin").write_bytes(b"\x7fELF other shape")
    assert publish_compile_cache(store, TAG, fresh) == 1
    assert len(latest_pointer(store, TAG)["files"]) == 5
    assert restore_compile_cache(store, TAG, first) == 1
    assert (first / "triton/def456/kernel.cubin").read_bytes() == b"\x7fELF other shape"


def test_a_file_already_here_is_never_replaced_and_other_kinds_see_nothing(store: Store, tmp_path: Path) -> None:
    publish_compile_cache(store, TAG, compiled(tmp_path / "a", {"triton/k/kernel.cubin": b"from the store",
                                                                "triton/k/kernel.json": b"{}"}))
    here = compiled(tmp_path / "b", {"triton/k/kernel.cubin": b"being read by a run here"})
    assert restore_compile_cache(store, TAG, here) == 1  # only the missing file
    assert (here / "triton/k/kernel.cubin").read_bytes() == b"being read by a run here"
    other_gpu = TAG.replace("sm90", "sm80")  # Triton's cubins are per architecture
    assert latest_pointer(store, other_gpu) is None
    assert restore_compile_cache(store, other_gpu, tmp_path / "c") == 0 and not (tmp_path / "c").exists()
    pointer = latest_pointer(store, TAG)
    assert pointer["key"].startswith(f"compile-cache/{TAG}/") and store.has(pointer["key"])
    assert json.loads(store.read_bytes(f"compile-cache/{TAG}/latest.json")) == pointer
