"""Issue #15: never train on silently damaged data, never report a number that means less than it says.

One test (or a few) per fault kind, each on a small input written here. A fault found before a model loads is a
`loraflow run` that exits 2 in seconds with one `error:` line: Prefect never starts, no model is loaded (and where
the fault is found before the tokenizer is needed, no model is even prepared: the model cache stays empty). Faults
that are warnings are shown by `--dry-run` (same checks, no Prefect, no weights) and recorded in summary.json by a
short run. Only 8b trains for real: 40 steps on the notebook's 10 rows, like the demo config, on the tiny model.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_CONFIG, run_cli

INSTRUCTION = "Classify the sentiment of the text."
SHORT = [("The park was full of happy families.", "positive"), ("The app crashes every time I open it.", "negative"),
         ("The menu lists twelve dishes.", "neutral"), ("The concert was wonderful from start to end.", "positive"),
         ("The shirt faded after one wash.", "negative"), ("The train leaves every hour.", "neutral"),
         ("The teacher explained everything clearly.", "positive"), ("The room smelled of smoke.", "negative"),
         ("The library closes on Mondays.", "neutral"), ("My friend's gift made my day.", "positive"),
         ("The parcel arrived broken again.", "negative"), ("The meeting is at three.", "neutral")]


def rows(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"instruction": INSTRUCTION, "input": text, "output": label} for text, label in pairs]


def write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def loraflow(tmp_path: Path, dataset: Path, *sets: str, eval_dataset: Path | None = None, dry_run: bool = False,
             fresh_model_cache: bool = False, output: Path | None = None, extra: tuple[str, ...] = ()) -> Any:
    """`loraflow run` on the tiny config. fresh_model_cache: an empty model cache, to show no model was prepared."""
    args = ["run", "--config", str(TINY_CONFIG), "--dataset", str(dataset),
            "--output", str(output or tmp_path / "out"), "--set", f"output.store={tmp_path / 'store'}", *extra]
    if eval_dataset:
        args += ["--eval-dataset", str(eval_dataset)]
    for assignment in sets:
        args += ["--set", assignment]
    if dry_run:
        args.append("--dry-run")
    env = {"LORAFLOW_CACHE_DIR": str(tmp_path / "model-cache")} if fresh_model_cache else {}
    return run_cli(*args, env=env, timeout=300)


def input_error(result: Any, tmp_path: Path, *words: str, model_prepared: bool = True) -> str:
    """Exit 2, one `error:` line (the last) holding `words`, no traceback, Prefect never started, no model loaded,
    nothing written. model_prepared=False: the model cache stayed empty too (found before the tokenizer)."""
    output = result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, output[-3000:]
    assert last.startswith("error: "), last
    assert sum(line.startswith("error: ") for line in result.stderr.splitlines()) == 1
    for word in words:
        assert word in last, f"{word!r} not in {last!r}"
    assert "Traceback" not in output
    assert "Flow run" not in output and "load-4bit-model" not in output, "the run started"
    assert not (tmp_path / "out").exists(), "output written for a run that stopped at its input"
    if not model_prepared:
        assert not (tmp_path / "model-cache").exists(), "a model was prepared for a run whose input was bad"
    return last


def notes_of(result: Any) -> list[str]:
    return [line.removeprefix("note: ") for line in result.stdout.splitlines() if line.startswith("note: ")]


def short_run(tmp_path: Path, dataset: Path, *sets: str, eval_dataset: Path | None = None) -> tuple[Any, dict]:
    """A run that trains 2 steps and scores nothing (no eval generation, no smoke prompts): enough to read what
    format-prompts recorded in summary.json."""
    result = loraflow(tmp_path, dataset, "train.max_steps=2", "train.warmup_steps=0", "train.save_steps=2",
                      "infer.max_eval_examples=0", "infer.prompts=[]", *sets, eval_dataset=eval_dataset)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result, json.loads((tmp_path / "out" / "summary.json").read_text())


# --- 1. a CSV row whose field count differs from the header's ------------------------------------------------------


@pytest.mark.parametrize("line", ["Classify.,The room was small, dark, and cold,negative", "Classify.,positive"],
                         ids=["more-fields", "fewer-fields"])
def test_csv_row_with_another_field_count_is_an_input_error(tmp_path: Path, line: str) -> None:
    csv = tmp_path / "reviews.csv"
    csv.write_text("instruction,input,output\nClassify.,Nice park.,positive\nClassify.,Bad app.,negative\n"
                   f"{line}\nClassify.,A menu.,neutral\n", encoding="utf-8")
    fields = len(line.split(","))
    input_error(loraflow(tmp_path, csv, fresh_model_cache=True), tmp_path,
                "reviews.csv: row 3 (line 4)", f"{fields} fields", "the header has 3", "double quotes",
                model_prepared=False)


def test_quoted_commas_are_one_field(tmp_path: Path) -> None:
    from loraflow.data import read_dataset

    csv = tmp_path / "reviews.csv"
    csv.write_text('instruction,input,output\nClassify.,"The room was small, dark, and cold",negative\n')
    assert read_dataset(str(csv)).rows == [
        {"instruction": "Classify.", "input": "The room was small, dark, and cold", "output": "negative"}]


def test_a_csv_field_over_pythons_field_limit_is_read_whole(tmp_path: Path) -> None:
    # csv's own limit is 131,072 characters a field; how long is too long is max_seq_length's call (part 2)
    from loraflow.data import read_dataset

    csv = tmp_path / "long.csv"
    long_input = "很长的评论。" * 40_000  # 240,000 characters
    csv.write_text(f"instruction,input,output\nClassify.,{long_input},negative\nClassify.,Short.,positive\n")
    rows = read_dataset(str(csv)).rows
    assert [len(row["input"]) for row in rows] == [240_000, 6] and rows[0]["input"] == long_input


# --- 2. examples longer than model.max_seq_length ----------------------------------------------------------------


def long_rows(count: int) -> list[dict[str, str]]:
    story = "The details of this review go on about the weather and the trip. " * 12  # ~170 tokens > 128
    return rows([(f"{i}. {story}", label) for i, label in zip(range(count), ["positive", "negative", "neutral"] * 9)])


def test_some_examples_too_long_are_left_out_said_and_recorded(tmp_path: Path) -> None:
    """12 short rows and 3 of ~170 tokens (tiny config: max_seq_length 128): the 3 are left out with a warning
    saying how many, the longest and what to set, and summary.json counts the 12 trained on."""
    train = write_json(tmp_path / "train.json", rows(SHORT) + long_rows(3))
    held_out = write_json(tmp_path / "eval.json", rows([("A calm lake.", "neutral"), ("Awful food.", "negative")]))
    checked = loraflow(tmp_path, train, eval_dataset=held_out, dry_run=True)
    assert checked.returncode == 0, checked.stderr[-3000:]
    note = next(n for n in notes_of(checked) if "longer than model.max_seq_length" in n)
    longest = int(note.split("(the longest: ")[1].split(")")[0])
    assert note.startswith("3 of 15 training examples are longer than model.max_seq_length 128 tokens") and longest > 128
    assert f"set model.max_seq_length: {longest}" in note

    result, summary = short_run(tmp_path, train, eval_dataset=held_out)
    assert f"format-prompts: {note}" in result.stderr  # the run's log says it too, as a warning
    assert summary["num_train_examples"] == 12 and summary["num_train_examples_too_long"] == 3
    assert note in summary["notes"]


# --- 3. record fields the template or the record shape does not use ----------------------------------------------


def test_template_without_input_on_rows_with_input_is_an_input_error(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, "prompt.template={instruction}\nAnswer:{output}", fresh_model_cache=True),
                tmp_path, "d.json", "field 'input' holds data in 12 of 12 rows", "no {input}", "data.ignore_fields",
                model_prepared=False)


def test_a_column_nothing_reads_is_an_input_error(tmp_path: Path) -> None:
    """'Input' is not 'input': the row would train with an empty input and the review text would be lost."""
    data = write_json(tmp_path / "d.json", [{"instruction": INSTRUCTION, "Input": text, "output": label}
                                            for text, label in SHORT])
    input_error(loraflow(tmp_path, data, fresh_model_cache=True), tmp_path,
                "d.json", "field 'Input' holds data in 12 of 12 rows", "nothing reads it", "data.ignore_fields",
                model_prepared=False)


def test_fields_named_in_ignore_fields_are_left_out_on_purpose(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", [{**row, "id": str(i)} for i, row in enumerate(rows(SHORT))])
    assert loraflow(tmp_path, data, fresh_model_cache=True).returncode == 2  # 'id' holds data nobody reads
    result = loraflow(tmp_path, data, "data.ignore_fields=[id, input]", "prompt.template={instruction}\n答:{output}",
                      dry_run=True)
    assert result.returncode == 0, result.stderr[-3000:]


# --- 4. whitespace right before {output} -----------------------------------------------------------------------


@pytest.mark.parametrize("ending", [" ", "\t", "\n "])
def test_whitespace_before_output_is_rejected_at_config_validation(tmp_path: Path, ending: str) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT))
    template = "{instruction}\n{input}\nAnswer:" + ending + "{output}"
    input_error(loraflow(tmp_path, data, f"prompt.template={template}", fresh_model_cache=True), tmp_path,
                "prompt.template", "whitespace right before {output}", "'Answer:{output}'", model_prepared=False)


def test_a_newline_before_output_is_fine_and_the_answer_starts_at_a_token_boundary() -> None:
    from loraflow.config import load_config
    from loraflow.data import Dataset
    from loraflow.prompts import build_prompts, load_tokenizer

    cfg = load_config(TINY_CONFIG, [{"prompt": {"template": "{instruction}\n{input}\nAnswer:\n{output}"}}])
    dataset = Dataset("d.json", rows(SHORT), "0", {"instruction": 12, "input": 12, "output": 12})
    tokenizer = load_tokenizer(cfg.model.name, None)
    prompts = build_prompts(dataset, None, cfg.prompt, cfg.data, cfg.infer, tokenizer, cfg.model)
    for prompt, completion in zip(prompts.train_prompts, prompts.train_completions):
        head = tokenizer(prompt)["input_ids"]
        assert tokenizer(prompt + completion)["input_ids"][: len(head)] == head  # TRL's mismatch check holds


def test_whitespace_around_answers_is_trimmed_and_said() -> None:
    # scoring strips answers; a model trained on ' negative' or 'positive\n' would learn tokens never scored
    from loraflow.config import load_config
    from loraflow.data import Dataset
    from loraflow.prompts import build_prompts, load_tokenizer

    cfg = load_config(TINY_CONFIG, [{"data": {"eval_fraction": 0}}])
    padded = [(text, {0: f" {label}", 1: f"{label}\n"}.get(i, label)) for i, (text, label) in enumerate(SHORT)]
    dataset = Dataset("d.json", rows(padded), "0", {"instruction": 12, "input": 12, "output": 12})
    tokenizer = load_tokenizer(cfg.model.name, None)
    prompts = build_prompts(dataset, None, cfg.prompt, cfg.data, cfg.infer, tokenizer, cfg.model)
    eos = tokenizer.eos_token
    assert sorted(prompts.train_completions) == sorted(f"{label}{eos}" for _, label in SHORT)  # the split shuffles
    note = next(note for note in prompts.notes if "spaces or line breaks" in note)
    assert note.startswith("2 of 12 training answers had spaces or line breaks around them (the first: ")
    assert "' positive'" in note or "'negative\\n'" in note


def test_a_conversations_last_turn_is_trimmed_like_an_output() -> None:
    from loraflow.prompts import trim_answers

    chat = {"messages": [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!\n\n"}]}
    plain = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    trimmed, count, first = trim_answers([chat, plain])
    assert (count, first) == (1, "Hello!\n\n")
    assert trimmed[0]["messages"] == [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello!"}]
    assert trimmed[1] is plain and chat["messages"][1]["content"] == "Hello!\n\n"  # the rows read are not changed


# --- 5. one label ----------------------------------------------------------------------------------------------


def test_a_gate_on_one_label_is_an_input_error(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows([(text, "positive") for text, _ in SHORT]))
    input_error(loraflow(tmp_path, data, "hub.min_eval_accuracy=0.9", fresh_model_cache=True), tmp_path,
                "hub.min_eval_accuracy", "every training output is 'positive'", "one label is not a label set",
                model_prepared=False)


def test_one_label_is_not_scored(tmp_path: Path) -> None:
    from loraflow.prompts import closed_label_set, why_no_label_set

    one = rows([(text, "positive") for text, _ in SHORT])
    assert closed_label_set(one, one[:2]) is None and "one label" in why_no_label_set(one, one[:2])
    result = loraflow(tmp_path, write_json(tmp_path / "d.json", one), dry_run=True)
    assert result.returncode == 0 and "no accuracy" in result.stdout
    assert any(n.startswith("eval accuracy is not measured: every training output is 'positive'") for n in notes_of(result))


# --- 6. eval rows identical to training rows ---------------------------------------------------------------------


def test_an_eval_file_that_is_the_training_file_is_an_input_error(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, eval_dataset=data, fresh_model_cache=True), tmp_path,
                "all 12 eval rows are copies of rows in", "nothing would be held out", model_prepared=False)


def test_a_split_of_repeated_rows_is_an_input_error(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT) * 3)  # every held-out row is a copy of a training row
    input_error(loraflow(tmp_path, data, fresh_model_cache=True), tmp_path,
                "d.json: all 4 rows held out for eval", "12 distinct rows among 36", model_prepared=False)


def test_eval_copies_of_training_rows_are_removed_said_and_recorded(tmp_path: Path) -> None:
    """4 eval rows, 2 of them training rows (one with extra spaces, compared stripped as labels are): the 2 are
    removed, the warning says so, summary.json counts 2 held-out examples and 2 removed."""
    train = write_json(tmp_path / "train.json", rows(SHORT))
    copies = [rows(SHORT[:1])[0], {"instruction": f" {INSTRUCTION}", "input": SHORT[1][0] + "  ", "output": " negative"}]
    held_out = write_json(tmp_path / "eval.json", copies + rows([("A calm lake.", "neutral"), ("Awful food.", "negative")]))
    checked = loraflow(tmp_path, train, eval_dataset=held_out, dry_run=True)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "eval: 2 held-out examples (2 copies of training rows removed)" in checked.stdout
    note = "2 of 4 eval rows were copies of training rows and were removed; 2 held-out rows remain"
    assert note in notes_of(checked)

    result, summary = short_run(tmp_path, train, eval_dataset=held_out)
    assert f"format-prompts: {note}" in result.stderr
    assert summary["num_eval_examples"] == 2 and summary["num_eval_duplicates_removed"] == 2
    assert note in summary["notes"]


# --- 8. too few rows for an eval split -------------------------------------------------------------------------


def test_one_row_is_too_few_for_an_eval_split(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT[:1]))
    input_error(loraflow(tmp_path, data, fresh_model_cache=True), tmp_path,
                "d.json: 1 row is too few for an eval split", "at least 2 rows are needed", "data.eval_fraction",
                model_prepared=False)


# --- 9. every example longer than model.max_seq_length ----------------------------------------------------------


def test_every_example_too_long_stops_before_loading(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", long_rows(12))
    last = input_error(loraflow(tmp_path, data), tmp_path,
                       "d.json: all 11 training examples are longer than model.max_seq_length 128 tokens")
    longest = int(last.split("longest ")[1].split(")")[0])
    assert longest > 128 and f"set model.max_seq_length: {longest}" in last
    # a length too small for every prompt is the same fault
    input_error(loraflow(tmp_path, write_json(tmp_path / "s.json", rows(SHORT)), "model.max_seq_length=8"), tmp_path,
                "all 11 training examples are longer than model.max_seq_length 8 tokens")


# --- 10. lora.target_modules the model does not have ------------------------------------------------------------


def test_target_modules_the_model_lacks_stop_before_loading(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, "lora.target_modules=[query_key_value, q_proj]"), tmp_path,
                "lora.target_modules: 'query_key_value' names no linear layer of loraflow:tiny-llama",
                "LlamaForCausalLM", "q_proj, up_proj, v_proj")


def test_target_modules_are_read_from_the_config_without_weights() -> None:
    from loraflow.architecture import check_target_modules
    from loraflow.config import load_config

    cfg = load_config(TINY_CONFIG)
    check_target_modules(cfg.model, cfg.lora)  # the notebook's seven projections
    check_target_modules(cfg.model, cfg.lora.model_copy(update={"target_modules": ["self_attn.q_proj", "lm_head"]}))


# --- 11. prompt.template chat on a tokenizer without a chat template ---------------------------------------------


def test_chat_template_on_a_model_without_one_stops_before_loading(tmp_path: Path) -> None:
    from loraflow.models import resolve_model

    base = tmp_path / "base-model"  # the tiny model as a base model: its tokenizer has no chat template
    shutil.copytree(resolve_model("loraflow:tiny-llama"), base)
    (base / "chat_template.jinja").unlink()
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, "prompt.template=chat", extra=("--model", str(base))), tmp_path,
                "prompt.template: chat", f"the tokenizer of {base} has none")


# --- 12. an output.dir that cannot be created or written --------------------------------------------------------


def test_output_dir_under_a_file_stops_before_anything(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, output=tmp_path / "a-file" / "run", fresh_model_cache=True), tmp_path,
                f"output.dir {tmp_path / 'a-file' / 'run'}: is under {tmp_path / 'a-file'}, which is a file",
                model_prepared=False)


def test_output_dir_that_cannot_be_written_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, which writes anywhere: the refusal of the file system is simulated (a read-only mount)."""
    from loraflow.config import OutputSettings
    from loraflow.errors import ConfigError
    from loraflow.outputs import check_output_dir

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("loraflow.outputs.tempfile.mkstemp", read_only)
    with pytest.raises(ConfigError, match=rf"output.dir {tmp_path / 'out'}: cannot write in {tmp_path}: "
                                          r"read-only file system \(EROFS\)"):
        check_output_dir(OutputSettings(dir=str(tmp_path / "out"), store=str(tmp_path / "store")))
    assert not (tmp_path / "out").exists()


# --- 13. the output folder ---------------------------------------------------------------------------------------


def test_an_output_dir_with_the_users_files_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, output=out, fresh_model_cache=True), tmp_path,
                f"output.dir {out}: holds files loraflow did not write (README.md)", "output.overwrite: true",
                model_prepared=False)
    assert (out / "README.md").read_text() == "my notes"
    assert loraflow(tmp_path, data, "output.overwrite=true", output=out, dry_run=True).returncode == 0


def test_the_working_directory_is_never_an_output_dir(tmp_path: Path) -> None:
    data = write_json(tmp_path / "d.json", rows(SHORT))
    input_error(loraflow(tmp_path, data, "output.overwrite=true", output=Path("."), fresh_model_cache=True), tmp_path,
                "holds the working directory", model_prepared=False)


def saved(tmp_path: Path, merged: bool, out: Path, **kwargs: Any) -> Any:
    """save_local of a stand-in adapter (and merged model) from a local store into `out`."""
    from loraflow.outputs import save_local
    from loraflow.store import open_store
    from tests.test_tasks import run_summary

    store = open_store(str(tmp_path / "store"))
    for key, name in (("adapters/a", "adapter_model.safetensors"), ("merged/m", "model.safetensors")):
        folder = tmp_path / "src" / key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"weights")
        store.put_folder(folder, key)
    return save_local(run_summary(), "# card", b"png", str(tmp_path / "store"), "adapters/a", "merged/m" if merged else None,
                      str(out), **kwargs)


def test_a_rerun_replaces_the_folder_whole_and_marks_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    saved(tmp_path, True, out)
    assert (out / "merged" / "model.safetensors").is_file()
    marker = json.loads((out / ".loraflow-output.json").read_text())
    assert set(marker["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                    if p.is_file() and p.name != ".loraflow-output.json"}
    saved(tmp_path, False, out)  # a folder loraflow wrote is replaced, without output.overwrite
    assert not (out / "merged").exists(), "a stale merged/ survived the rerun (push-hub would upload it)"
    (out / "summary.json").write_text("edited by hand")  # a file of ours the user changed is theirs now
    from loraflow.errors import ConfigError

    with pytest.raises(ConfigError, match="summary.json"):
        saved(tmp_path, False, out)


@pytest.mark.parametrize("failure", ["oserror", "copytree"])
def test_a_full_disk_leaves_the_folder_as_it_was_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    import shutil as shutil_module

    from loraflow.errors import OutputWriteError

    out = tmp_path / "out"
    saved(tmp_path, False, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_space(*args: Any, **kwargs: Any) -> Any:
        if failure == "copytree":  # what shutil.copytree raises: one (src, dst, reason) per file that failed
            raise shutil_module.Error([(f"/store/{i}", f"/out/{i}", "[Errno 28] No space left on device") for i in range(60)])
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "summary.json"))

    monkeypatch.setattr("loraflow.outputs.assemble_output", no_space)
    with pytest.raises(OutputWriteError) as caught:
        saved(tmp_path, False, out)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300
    assert f"output.dir {out}" in message and "no space left on device (ENOSPC)" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


# --- 7 and 8b: the numbers say how much they mean --------------------------------------------------------------

# The classic notebook's own dataset shape: 10 rows of {instruction, input, output}, Chinese sentiment.
NOTEBOOK_ROWS = [
    {"instruction": "分类以下文本的情感。", "input": text, "output": label} for text, label in [
        ("今天的阳光真好，心情愉快。", "积极"), ("这部电影太无聊了，浪费时间。", "消极"), ("会议定在下午三点。", "中性"),
        ("这家餐厅的菜非常好吃。", "积极"), ("快递又迟到了，真让人生气。", "消极"), ("图书馆周一闭馆。", "中性"),
        ("孩子们在公园里玩得很开心。", "积极"), ("手机屏幕摔碎了，太倒霉了。", "消极"), ("火车每小时一班。", "中性"),
        ("朋友送的礼物让我很感动。", "积极"),
    ]
]
# The demo config's numbers (deployments/configs/smollm2-135m-cpu.yaml) on the tiny model: 15 % held out (2 of 10),
# batch 8 × 1, 40 steps: 40 × 8 = 320 examples over 8 rows, 40 passes.
DEMO_SHAPE = ("data.eval_fraction=0.15", "train.max_steps=40", "train.warmup_steps=3", "train.per_device_batch_size=8",
              "train.gradient_accumulation_steps=1")


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.prefect_reads import PrefectReader

    work = tmp_path_factory.mktemp("notebook")
    data = write_json(work / "dataset.json", NOTEBOOK_ROWS)
    result = loraflow(work, data, *DEMO_SHAPE)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((work / "out" / "summary.json").read_text())
    with PrefectReader() as prefect:
        artifacts = prefect.artifacts(summary["flow_run_id"])
    return {"work": work, "data": data, "result": result, "summary": summary, "artifacts": artifacts}


def test_every_accuracy_comes_with_its_wilson_interval(notebook_run: dict) -> None:
    from loraflow.quality import wilson_interval

    summary, stdout = notebook_run["summary"], notebook_run["result"].stdout
    assert summary["num_eval_examples"] == summary["num_scored_examples"] == 2
    intervals = {}
    for key in ("eval_accuracy", "base_eval_accuracy", "eval_accuracy_greedy"):
        expected = wilson_interval(round(summary[key] * 2), 2)
        assert summary[f"{key}_ci"] == pytest.approx(list(expected)), key
        intervals[key] = f"{expected[0]:.3f}–{expected[1]:.3f}"
    line = next(line for line in stdout.splitlines() if line.startswith("eval accuracy: "))
    assert line.startswith(f"eval accuracy: {summary['eval_accuracy']:.3f} (95% CI {intervals['eval_accuracy']}) on 2 "
                           f"held-out examples (base model: {summary['base_eval_accuracy']:.3f}, 95% CI "
                           f"{intervals['base_eval_accuracy']};"), line
    table = {row["metric"]: row["value"] for row in json.loads(notebook_run["artifacts"]["finetune-metrics"].data)}
    assert table["eval examples scored"] == 2
    assert table["eval accuracy, fine-tuned, 95% interval"] == intervals["eval_accuracy"]
    assert table["eval accuracy, base model, 95% interval"] == intervals["base_eval_accuracy"]
    report = notebook_run["artifacts"]["finetune-report"].data
    assert f"| 95% interval (Wilson) | {intervals['eval_accuracy']} | {intervals['base_eval_accuracy']} |" in report
    card = (notebook_run["work"] / "out" / "README.md").read_text()
    assert (f"95% intervals (Wilson): fine-tuned {intervals['eval_accuracy']}, base model "
            f"{intervals['base_eval_accuracy']}") in card


def test_two_scored_examples_and_forty_passes_are_said_plainly(notebook_run: dict) -> None:
    summary, result = notebook_run["summary"], notebook_run["result"]
    memorised = ("each of the 8 training examples is seen 40 times (40 steps × 8 examples per step / 8 examples): the "
                 "adapter will likely memorise them")
    few = f"accuracy on 2 scored examples is a rough guide: the fine-tuned model's {summary['eval_accuracy']:.3f} could be"
    assert summary["passes_over_data"] == 40 and summary["num_train_examples"] == 8
    for note in (memorised, few):
        assert any(n.startswith(note) for n in summary["notes"]), note
        assert any(n.startswith(note) for n in notes_of(result)), note  # the CLI's last lines
        assert note in (notebook_run["work"] / "out" / "README.md").read_text()  # the model card
        assert note in notebook_run["artifacts"]["finetune-report"].data
    # the memorisation warning comes before training, in the run's log
    log = result.stderr
    assert f"train: {memorised}" in log and log.index(f"train: {memorised}") < log.index("train: 100%")
    assert "train loss: " in result.stdout and "in 40 steps on 8 examples (each seen 40 times)" in result.stdout


def test_the_scored_count_is_printed_and_recorded(notebook_run: dict, tmp_path: Path) -> None:
    """infer.max_eval_examples below the held-out count: the line says how many were scored of how many. The
    adapter of the run above is reused (infer settings are not in the train key): nothing trains."""
    work = notebook_run["work"]
    result = loraflow(tmp_path, notebook_run["data"], *DEMO_SHAPE, f"output.store={work / 'store'}",
                      "infer.max_eval_examples=1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "train" in summary["cached_tasks"]
    assert summary["num_eval_examples"] == 2 and summary["num_scored_examples"] == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("eval accuracy: "))
    assert " on 1 of 2 held-out examples (infer.max_eval_examples) (base model: " in line
    assert "Eval accuracy on 1 held-out examples" in (tmp_path / "out" / "README.md").read_text()


# --- the flow enforces the same rules without the CLI (deployments) ----------------------------------------------

FLOW_WITHOUT_CLI = """
import json, sys
import tasks.load_model
from flows.finetune import finetune
from loraflow.config import load_config

def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")

tasks.load_model.load_model = no_loading
results = []
for override in json.loads(sys.argv[1]):
    state = finetune(config=load_config(sys.argv[2], [override]), return_state=True)
    raised = state.result(raise_on_failure=False)
    results.append([state.is_failed(), type(raised).__name__, str(raised)])
print("RESULTS " + json.dumps(results))
"""


def test_the_flow_itself_refuses_bad_input_before_any_model_loads(tmp_path: Path) -> None:
    """finetune() as a deployment runs it, without the CLI's preflight: the output folder at its door, the data in
    format-prompts, the LoRA targets before load-4bit-model. Each run fails with the input error; a model load
    would fail the run with an AssertionError instead."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    base = {"data": {"uri": str(write_json(tmp_path / "d.json", rows(SHORT)))},
            "output": {"dir": str(tmp_path / "out"), "store": str(tmp_path / "store")}}
    cases = [
        ({"output": {"dir": str(tmp_path / "mine")}}, "ConfigError", "holds files loraflow did not write"),
        ({"data": {"uri": str(write_json(tmp_path / "long.json", long_rows(12)))}}, "DatasetError", "all 11 training"),
        ({"lora": {"target_modules": ["query_key_value"]}}, "ConfigError", "query_key_value"),
        ({"hub": {"min_eval_accuracy": 0.9}, "data": {"uri": str(write_json(
            tmp_path / "one.json", rows([(text, "positive") for text, _ in SHORT])))}}, "ConfigError", "one label"),
    ]
    from loraflow.config import deep_merge

    overrides = [deep_merge(base, override) for override, _, _ in cases]
    process = subprocess.run([sys.executable, "-c", FLOW_WITHOUT_CLI, json.dumps(overrides), str(TINY_CONFIG)],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, (process.stdout + process.stderr)[-4000:]
    for (failed, error, message), (_, expected_error, words) in zip(json.loads(lines[0][8:]), cases):
        assert failed and error == expected_error and words in message, (error, message)
    assert "a model was loaded" not in process.stdout + process.stderr


# --- more of the same kinds, found by trying new inputs as a user would ---------------------------------------------
# Each is found while the dataset is read or the config validated, in the core functions the CLI's preflight and the
# flow's steps both call; the tests above show that such an error is a one-line exit 2 before anything loads.


def dataset_error(path: Path, *words: str) -> str:
    from loraflow.data import read_dataset
    from loraflow.errors import DatasetError

    with pytest.raises(DatasetError) as raised:
        read_dataset(str(path))
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_an_unpaired_surrogate_is_named_not_a_traceback_in_the_tokenizer(tmp_path: Path) -> None:
    """Valid JSON ("\\ud800" without its pair: scraped text with a broken emoji) that no tokenizer can encode."""
    text = json.dumps(rows(SHORT)).replace("happy", "hap\\ud800py", 1)
    dataset_error(write_text(tmp_path / "scraped.json", text), "row 1: field 'input'", "unpaired surrogate", "'\\ud800'")
    chat = {"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "hello"}]}
    dataset_error(write_text(tmp_path / "chat.jsonl", json.dumps(chat).replace("\\\\", "\\")),
                  "line 1: field 'messages[0].content'", "unpaired surrogate")


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_csv_header_naming_a_column_twice_is_an_input_error(tmp_path: Path) -> None:
    """dict(zip(header, values)) would keep the last 'input' column: every review replaced by the extra column."""
    csv = write_text(tmp_path / "reviews.csv", "instruction,input,input,output\nClassify.,Nice park.,note 1,positive\n"
                                               "Classify.,Bad app.,note 2,negative\n")
    dataset_error(csv, "names a column twice", "'input' is columns 2, 3")


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_key_given_twice_in_one_record_is_an_input_error(tmp_path: Path, suffix: str) -> None:
    record = '{"instruction": "Classify.", "input": "Nice park.", "output": "positive", "output": "negative"}'
    text = f"[{record}]" if suffix == ".json" else f"{record}\n"
    message = dataset_error(write_text(tmp_path / f"twice{suffix}", text), "'output'", "twice")
    assert suffix == ".json" or "line 1" in message


def test_jsonl_strings_may_hold_line_separators(tmp_path: Path) -> None:
    """JSON allows U+2028 and U+0085 unescaped in a string (json.dumps(ensure_ascii=False) writes them so): a JSONL
    record ends at "\\n" only."""
    from loraflow.data import read_dataset

    records = rows(SHORT[:4])
    records[1]["input"] = "First line\u2028second line\u0085third"
    path = write_text(tmp_path / "separators.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    assert [row["input"] for row in read_dataset(str(path)).rows] == [r["input"] for r in records]


def test_a_chat_turn_key_loraflow_does_not_read_is_an_input_error(tmp_path: Path) -> None:
    """OpenAI's per-turn "weight": 0 means "do not train on this answer"; loraflow would train on it regardless."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]}
    dataset_error(write_json(tmp_path / "weights.json", [chat]), "row 1: field 'messages[1]'", "'weight'")


def test_braces_in_the_data_are_text_never_placeholders() -> None:
    from types import SimpleNamespace

    from loraflow.templates import render

    tokenizer = SimpleNamespace(eos_token="</s>")
    row = {"instruction": "Rate the {input} below.", "input": "A {output} in the text", "output": "neutral"}
    template = "{instruction}\n{input}\n答:{output}"
    assert render(template, row, tokenizer) == "Rate the {input} below.\nA {output} in the text\n答:neutral</s>"
    assert render(template, row, tokenizer, with_output=False) == "Rate the {input} below.\nA {output} in the text\n答:"


@pytest.mark.parametrize(("template", "words"), [
    ("{instruction}\n{input}\n答:{output}\n", ["'\\n' after it", "template: |-"]),  # a YAML `template: |` block
    ("{instruction}\n{input}\n答:{output} (one word)", ["' (one word)' after it"]),
    ("{instruction}\n{input}\n答:{output}{output}", ["more than once"]),
])
def test_nothing_may_follow_output_in_a_template(template: str, words: list[str]) -> None:
    from pydantic import ValidationError

    from loraflow.config import PromptConfig

    with pytest.raises(ValidationError) as raised:
        PromptConfig(template=template)
    for word in words:
        assert word in str(raised.value), str(raised.value)


def test_look_alike_labels_are_grouped() -> None:
    from loraflow.prompts import look_alike_labels

    labels = ["Negative", "negative", "neutral", "positive", "ｐｏｓｉｔｉｖｅ", "posi\u0301tive", "積極"]
    assert look_alike_labels(labels) == [["Negative", "negative"], ["positive", "posi\u0301tive", "ｐｏｓｉｔｉｖｅ"]]
    assert look_alike_labels(["积极", "消极", "中性"]) == []


def test_a_folder_run_skips_hidden_folders_says_which_file_and_look_alike_labels(tmp_path: Path) -> None:
    """Jupyter's `.ipynb_checkpoints/train-checkpoint.json` is newer than the file it copies: never the newest data.
    The dry run names the file it picked, and labels written two ways ('Positive', 'positive') are said."""
    import os

    folder = tmp_path / "data"
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    pairs = [(f"{text} (review {i})", label.capitalize() if i % 4 == 0 else label)
             for i, (text, label) in enumerate(SHORT * 3)]
    write_json(folder / "train.json", rows(pairs))
    stale = write_json(folder / ".ipynb_checkpoints" / "train-checkpoint.json", rows(SHORT[:3]))
    os.utime(stale, (os.path.getmtime(folder / "train.json") + 60,) * 2)
    result = loraflow(tmp_path, folder, "data.eval_fraction=0.25", dry_run=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"data: {folder / 'train.json'} (the newest data file under {folder})" in result.stdout
    assert "train: 27 examples" in result.stdout  # 36 rows, 9 held out: not the checkpoint's 3
    look_alike = [note for note in notes_of(result) if "differ only in case" in note]
    assert look_alike and all("'Positive' and 'positive'" in n or "'Negative' and 'negative'" in n or
                              "'Neutral' and 'neutral'" in n for n in look_alike)


def test_output_dir_or_store_inside_the_data_folder_is_refused(tmp_path: Path) -> None:
    """What a run writes there (summary.json) would be the next run's newest data file."""
    from loraflow.config import DataConfig, OutputSettings
    from loraflow.errors import ConfigError
    from loraflow.outputs import check_output_dir

    folder = tmp_path / "data"
    write_json(folder.mkdir() or folder / "train.json", rows(SHORT))
    data = DataConfig(uri=str(folder))
    with pytest.raises(ConfigError, match=r"output.dir .*/data/out: is inside the data folder data.uri"):
        check_output_dir(OutputSettings(dir=str(folder / "out"), store=str(tmp_path / "store")), data)
    with pytest.raises(ConfigError, match=r"output.store .*/data: is inside the data folder data.uri"):
        check_output_dir(OutputSettings(dir=str(tmp_path / "out"), store=str(folder)), data)
    assert check_output_dir(OutputSettings(dir=str(tmp_path / "out"), store=str(tmp_path / "store")), data)
    assert check_output_dir(OutputSettings(dir=str(folder / "out"), store=str(tmp_path / "store")),
                            DataConfig(uri=str(folder / "train.json")))  # a file, not a folder: nothing to read back


def test_a_file_path_with_a_tilde_is_read_from_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow.data import read_dataset

    monkeypatch.setenv("HOME", str(tmp_path))
    write_json(tmp_path / "train.json", rows(SHORT))
    assert len(read_dataset("~/train.json").rows) == len(SHORT)


def test_an_eval_row_retyped_from_a_training_row_is_still_a_copy() -> None:
    from loraflow.prompts import row_identity

    row = {"instruction": "Classify.", "input": "The park was full of happy families.", "output": "positive"}
    retyped = {"instruction": "classify. ", "input": "The  park was full of\thappy families.", "output": "Ｐositive"}
    assert row_identity(retyped) == row_identity(row)
    assert row_identity({**row, "input": "The park was empty."}) != row_identity(row)


def test_an_eval_dataset_that_is_a_folder_is_named_as_one(tmp_path: Path) -> None:
    dataset_error(tmp_path, "is a folder", "only data.uri takes a folder")
