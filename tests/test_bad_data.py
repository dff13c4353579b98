"""Malformed datasets: `loraflow run` exits 2 with one `error:` line naming the file, row and field,
before Prefect starts or any model loads (the model cache stays empty)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY_CONFIG, run_cli

GOOD = {"instruction": "分类以下文本的情感。", "input": "好", "output": "积极"}
CHAT = {"messages": [{"role": "user", "content": "分类：好"}, {"role": "assistant", "content": "积极"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "分类：好"}, {"from": "gpt", "value": "积极"}]}


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def turns(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


CASES = {
    # name: (file name, bytes, words the error must contain)
    "not-json": ("d.json", b'[{"instruction": "a", "output": ', ["d.json", "not valid JSON", "line 1"]),
    "wrong-top-level": ("d.json", json.dumps({"rows": [GOOD]}).encode(), ["d.json", "expected a JSON array", "object"]),
    "missing-field": ("d.json", json.dumps([GOOD, {"instruction": "a", "input": ""}]).encode(), ["row 2", "'output'", "missing"]),
    "wrong-type": ("d.json", json.dumps([GOOD, GOOD, {**GOOD, "output": 3}]).encode(), ["row 3", "'output'", "must be a string", "number"]),
    "empty": ("d.json", b"[]", ["d.json", "no rows"]),
    "blank-output": ("d.jsonl", (json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "output": "  "})).encode(), ["line 2", "'output'", "blank"]),
    "blank-instruction": ("d.json", json.dumps([{**GOOD, "instruction": ""}]).encode(), ["row 1", "'instruction'", "blank"]),
    "not-utf8": ("d.json", '[{"instruction": "情感", "output": "积极"}]'.encode("gbk"), ["d.json", "not UTF-8"]),
    "broken-jsonl-line": ("d.jsonl", (json.dumps(GOOD) + "\n{broken\n").encode(), ["d.jsonl", "line 2", "not valid JSON"]),
    "csv-without-column": ("d.csv", "instruction,input\na,b\n".encode(), ["d.csv", "'output'", "column"]),
    "row-not-object": ("d.json", json.dumps([GOOD, "just a string"]).encode(), ["row 2", "expected an object", "string"]),
    "unsupported-type": ("d.txt", b"hello", ["d.txt", "unsupported file type"]),
    "no-such-file": ("absent.json", None, ["absent.json", "no such file"]),
    # chat records: messages (role/content) and ShareGPT conversations (from/value)
    "chat-turns-out-of-order": ("d.jsonl", jsonl(CHAT, turns(("user", "a"), ("user", "b"), ("assistant", "c"))),
                                ["d.jsonl", "line 2", "'messages[1].role'", "expected 'assistant'"]),
    "chat-ends-with-user": ("d.jsonl", jsonl(turns(("user", "a"), ("assistant", "b"), ("user", "c"))),
                            ["line 1", "'messages[2].role'", "last turn must be from 'assistant'"]),
    "chat-blank-content": ("d.json", json.dumps([CHAT, turns(("system", "s"), ("user", " "), ("assistant", "b"))]).encode(),
                           ["row 2", "'messages[1].content'", "blank"]),
    "chat-content-not-string": ("d.jsonl", jsonl(turns(("user", "a"), ("assistant", ["b"]))),  # type: ignore[arg-type]
                                ["line 1", "'messages[1].content'", "must be a string", "array"]),
    "sharegpt-unknown-speaker": ("d.json", json.dumps([SHAREGPT, {"conversations": [{"from": "bot", "value": "a"}]}]).encode(),
                                 ["row 2", "'conversations[0].from'", "'bot'", "'human'"]),
    "sharegpt-missing-value": ("d.jsonl", jsonl({"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}),
                               ["line 1", "'conversations[0].value'", "missing"]),
    "chat-then-instruction-row": ("d.jsonl", jsonl(CHAT, GOOD), ["line 2", "'messages'", "missing"]),
    "chat-with-instruction-template": ("d.jsonl", jsonl(CHAT), ["d.jsonl", "prompt.template", "chat records"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_dataset_exits_2_with_a_clear_error(case: str, tmp_path: Path) -> None:
    name, content, words = CASES[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    model_cache = tmp_path / "model-cache"
    result = run_cli(
        "run", "--config", str(TINY_CONFIG), "--dataset", str(path), "--output", str(tmp_path / "out"),
        env={"LORAFLOW_CACHE_DIR": str(model_cache)}, timeout=120,
    )
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr
    assert last_line.startswith("error: "), last_line
    for word in words:
        assert word in last_line, f"{word!r} not in {last_line!r}"
    assert "Traceback" not in result.stderr
    assert not model_cache.exists(), "a model was prepared for a run whose data was bad"
    assert not (tmp_path / "out").exists(), "output written for a failed run"


def test_bad_config_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(TINY_CONFIG), "--set", "train.learning_rate=-1",
                     env={"LORAFLOW_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert "train.learning_rate" in result.stderr.strip().splitlines()[-1]


def test_unknown_option_exits_2() -> None:
    result = run_cli("run", "--no-such-option")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
