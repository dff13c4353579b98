"""fetch-dataset's plain function: every supported format reads the same rows; bad rows are named."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from loraflow.errors import DatasetError
from loraflow.data import read_dataset
from tests.conftest import DEMO_DATA

ROWS = [
    {"instruction": "分类以下文本的情感。", "input": "今天天气真好", "output": "积极"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
]


def write_all_formats(folder: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {suffix: folder / f"data.{suffix}" for suffix in ("json", "jsonl", "csv", "parquet")}
    paths["json"].write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"].write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return paths


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_every_format_gives_the_same_rows(tmp_path: Path, suffix: str) -> None:
    path = write_all_formats(tmp_path)[suffix]
    dataset = read_dataset(str(path))
    assert dataset.rows == ROWS
    assert dataset.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_dataset_is_the_notebook_format() -> None:
    rows = read_dataset(str(DEMO_DATA)).rows
    assert len(rows) >= 60
    assert {r["output"] for r in rows} == {"积极", "中性", "消极"}
    assert {r["instruction"] for r in rows} == {"分类以下文本的情感。"}


def test_missing_input_field_means_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert read_dataset(str(path)).rows == [{"instruction": "a", "input": "", "output": "b"}]


def test_content_hash_changes_with_one_row(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False))
    before = read_dataset(str(path)).sha256
    path.write_text(json.dumps([ROWS[0], {**ROWS[1], "output": "hello"}], ensure_ascii=False))
    assert read_dataset(str(path)).sha256 != before


def test_http_dataset(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{paths['jsonl'].name}"
        assert read_dataset(url).rows == ROWS
        with pytest.raises(DatasetError, match="HTTP 404"):
            read_dataset(f"http://127.0.0.1:{server.server_address[1]}/missing.json")
    finally:
        server.shutdown()


def test_an_http_dataset_nobody_answers_for_is_named_and_retried() -> None:
    from loraflow.retries import is_transient
    from tests.s3_server import free_port

    url = f"http://127.0.0.1:{free_port()}/data.jsonl"  # nothing listens there
    with pytest.raises(ConnectionError, match="cannot reach it") as caught:
        read_dataset(url)
    assert str(caught.value).startswith(f"{url}: ") and is_transient(caught.value)


def test_a_relative_path_that_is_missing_says_where_it_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for path in ("train.jsonl", "data/train.jsonl", "data/more/train.jsonl"):  # the second also looks like a Hub id
        with pytest.raises(DatasetError, match=f"^{path}: no such file \\(relative to {tmp_path}\\)"):
            read_dataset(path)


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match=r"no such file \(relative to .*\), and .* the Hub is offline"):
        read_dataset("someone/some-dataset")


@pytest.mark.parametrize(
    ("raised", "expected_type", "expected"),
    [(FileNotFoundError("Dataset 'data/trian.jsonl' doesn't exist on the Hub"), DatasetError,
      r"no such file \(relative to .*\), and no such dataset on the Hugging Face Hub"),
     (ConnectionError("Couldn't reach 'data/trian.jsonl' on the Hub"), ConnectionError,
      r"no such file \(relative to .*\), and the Hugging Face Hub could not be reached")],
)
def test_a_mistyped_path_that_looks_like_a_hub_id_says_both(
    raised: Exception, expected_type: type, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data/trian.jsonl` is no file, so it is tried as a Hub id: the error must say both. A Hub that cannot be
    reached stays a ConnectionError (the task retries it); a dataset the Hub does not have is bad input."""
    import datasets

    from loraflow.retries import is_transient

    def load_dataset(*args: object, **kwargs: object) -> None:  # the answer the Hub would give (no network here)
        raise raised

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(expected_type, match=expected) as caught:
        read_dataset("data/trian.jsonl")
    assert str(caught.value).startswith("data/trian.jsonl: ")
    assert is_transient(caught.value) == (expected_type is ConnectionError)
