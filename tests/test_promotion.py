"""Promotion without a full run: McNemar's exact test against known values, the decision rule, the alias store's
compare-and-swap (local folder, S3 with conditional writes, nanio without), the newest object under a folder, the
Hub target (main + tag, or a candidates/ branch), the champion scored on the live base, continued fine-tuning
from a parent adapter, the line's picture, and the `loraflow aliases` / `loraflow promote` commands."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from loraflow.aliases import LineAliases, aliases_key, move_aliases, read_aliases, update_aliases, with_move
from loraflow.config import PromoteSettings, load_config
from loraflow.errors import ConfigError, DatasetError
from loraflow.local_store import LocalStore
from loraflow.promotion import decide
from loraflow.significance import mcnemar_exact_p, paired_test
from tests.conftest import TINY_CONFIG, run_cli
from tests.hub_standin import HubStandIn
from tests.s3_server import free_port, nanio_server, s3_env

# --- McNemar's exact test -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "c", "p"), [
    # Exact binomial values, p = min(1, 2·Σ_{k≤min(b,c)} C(n,k)/2^n), n = b + c. The first is statsmodels'
    # mcnemar([[.., 10], [2, ..]], exact=True).pvalue = 0.03857421875 (79/2048).
    (10, 2, 79 / 2048),
    (2, 10, 79 / 2048),  # two-sided: symmetric in b and c
    (6, 0, 2 / 64),  # 0.03125: the smallest p six one-sided discordant pairs can give
    (5, 0, 2 / 32),  # 0.0625: five are not enough at alpha 0.05
    (6, 1, 2 * 8 / 128),  # 0.125
    (12, 3, 2 * (1 + 15 + 105 + 455) / 2**15),  # 0.03515625
    (3, 3, 1.0),  # capped at 1
    (0, 0, 1.0),  # no discordant pairs: no evidence either way
])
def test_mcnemar_exact_p_matches_known_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact_p(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_p_on_large_counts_and_bad_input() -> None:
    # n = 400: exact rational arithmetic, no overflow; 230 vs 170 is p ≈ 0.00313 (the chi-squared form without correction: 0.0027).
    assert mcnemar_exact_p(230, 170) == pytest.approx(0.003129, abs=5e-6)
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact_p(-1, 3)


def test_paired_test_counts_the_four_cells() -> None:
    challenger = [True, True, True, False, False, True]
    champion = [True, False, False, True, False, False]
    test = paired_test(challenger, champion, alpha=0.05)
    assert (test.both_right, test.challenger_only, test.champion_only, test.both_wrong, test.n) == (1, 3, 1, 1, 6)
    assert test.p_value == pytest.approx(mcnemar_exact_p(3, 1)) and not test.significant
    assert "b=3" in test.describe() and "c=1" in test.describe()
    with pytest.raises(ValueError, match="same examples"):
        paired_test([True], [True, False], alpha=0.05)


# --- the decision rule --------------------------------------------------------------------------------------------


def test_decide_follows_the_rule_in_order() -> None:
    on = PromoteSettings()
    strong = paired_test([True] * 10 + [False] * 0, [False] * 8 + [True] * 2, alpha=0.05)  # b=8, c=0, p=0.0078
    weak = paired_test([True] * 4 + [False], [False] * 2 + [True] * 3, alpha=0.05)  # b=2, c=1
    assert decide(on, ["smoke-infer: 3 of 9 answers are unusable"], None, None, None, True, False)[0] == "refused"
    assert decide(on, [], 0.7, None, None, has_champion=False, is_champion=False) == (
        "promoted", "no champion yet: the quality gate decides alone, and it passed")
    decision, reason = decide(on, [], 0.2, None, None, has_champion=False, is_champion=False, gate_on=False)
    assert decision == "promoted" and "no quality gate checked this adapter" in reason  # never "passed"
    assert decide(on, [], 0.9, 0.9, None, has_champion=True, is_champion=True)[0] == "kept"
    assert "not measured" in decide(on, [], None, None, None, has_champion=True, is_champion=False)[1]
    assert decide(on, [], 1.0, 0.2, strong, True, False)[0] == "promoted"
    decision, reason = decide(on, [], 0.8, 0.6, weak, True, False)
    assert decision == "refused" and "not significant" in reason and "p = " in reason
    assert decide(on.model_copy(update={"require_significance": False}), [], 0.8, 0.6, weak, True, False)[0] == "promoted"
    assert "does not beat" in decide(on, [], 0.6, 0.6, weak, True, False)[1]
    decision, reason = decide(on.model_copy(update={"min_improvement": 0.9}), [], 1.0, 0.2, strong, True, False)
    assert decision == "refused" and "min_improvement 0.9" in reason


def test_the_line_comes_from_the_config() -> None:
    cfg = load_config(TINY_CONFIG)
    assert cfg.line == "loraflow-tiny-llama"
    assert load_config(TINY_CONFIG, [{"hub": {"repo_id": "me/adapter"}}]).line == "me--adapter"
    assert load_config(TINY_CONFIG, [{"promote": {"line": "sentiment-zh"}}]).line == "sentiment-zh"
    with pytest.raises(ConfigError, match="promote.line"):
        load_config(TINY_CONFIG, [{"promote": {"line": "a/b"}}])
    with pytest.raises(ConfigError, match="promote.alias"):
        load_config(TINY_CONFIG, [{"promote": {"alias": "Prod Uction"}}])


# --- the alias store ------------------------------------------------------------------------------------------------


def test_alias_record_format_is_the_agreed_one(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    move_aliases(store, "line-a", {"candidate": "adapters/k1", "production": "adapters/k1"}, flow_run_id="run-1",
                 by="flow run run-1", decision="promoted", reason="first", scores={"challenger_accuracy": 0.9})
    move_aliases(store, "line-a", {"production": "adapters/k2"}, flow_run_id="run-2", decision="promoted")
    raw = json.loads((tmp_path / "aliases" / "line-a.json").read_text())
    assert raw["line"] == "line-a"
    assert raw["aliases"]["production"]["adapter_key"] == "adapters/k2"
    assert raw["aliases"]["candidate"]["adapter_key"] == "adapters/k1"
    assert [(h["alias"], h["adapter_key"], h["flow_run_id"]) for h in raw["history"]] == [
        ("candidate", "adapters/k1", "run-1"), ("production", "adapters/k1", "run-1"),
        ("production", "adapters/k2", "run-2")]
    assert raw["history"][2]["previous_adapter_key"] == "adapters/k1"
    assert isinstance(raw["history"][0]["at"], float) and raw["history"][0]["scores"] == {"challenger_accuracy": 0.9}


def append_moves(root: str, writer: int, count: int) -> None:
    """One writer process: `count` moves of its own alias, each a read-modify-write of the same record."""
    store = LocalStore(root)
    for i in range(count):
        move_aliases(store, "shared", {f"w{writer}": f"adapters/{writer}-{i}"}, flow_run_id=f"{writer}-{i}")


def test_concurrent_local_writers_lose_no_change(tmp_path: Path) -> None:
    writers, count = 6, 8
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=append_moves, args=(str(tmp_path), w, count)) for w in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    record = read_aliases(LocalStore(tmp_path), "shared")
    assert len(record.history) == writers * count
    assert {name: target.adapter_key for name, target in record.aliases.items()} == {
        f"w{w}": f"adapters/{w}-{count - 1}" for w in range(writers)}
    for w in range(writers):  # each writer's moves in its own order
        assert [h.flow_run_id for h in record.history if h.alias == f"w{w}"] == [f"{w}-{i}" for i in range(count)]


def test_a_lost_race_is_retried_not_overwritten(tmp_path: Path) -> None:
    """The writer that read before another wrote must not overwrite it: its put_if_match fails, it reads again."""
    store = LocalStore(tmp_path)
    calls = []

    def change(record: LineAliases) -> LineAliases:
        calls.append(len(record.history))
        if len(calls) == 1:  # someone else writes between our read and our write
            move_aliases(store, "race", {"production": "adapters/theirs"})
        return with_move(record, "candidate", "adapters/ours", time.time())

    update_aliases(store, "race", change)
    record = read_aliases(store, "race")
    assert calls == [0, 1]
    assert record.target("production") == "adapters/theirs" and record.target("candidate") == "adapters/ours"


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[dict[str, Any]]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="lines")
    try:
        yield {"env": env, "client": client}
    finally:
        server.stop()


def test_concurrent_s3_writers_lose_no_change_with_conditional_puts(moto_s3: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow.s3_store import S3Store

    for name, value in moto_s3["env"].items():
        monkeypatch.setenv(name, value)
    assert S3Store("s3://lines/store").conditional_writes()  # moto honours If-Match / If-None-Match

    def writer(w: int) -> None:
        store = S3Store("s3://lines/store")
        for i in range(6):
            move_aliases(store, "shared", {f"w{w}": f"adapters/{w}-{i}"}, flow_run_id=f"{w}-{i}")

    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(writer, range(5)))
    record = read_aliases(S3Store("s3://lines/store"), "shared")
    assert len(record.history) == 30 and len(record.aliases) == 5
    stored = moto_s3["client"].get_object(Bucket="lines", Key=f"store/{aliases_key('shared')}")
    assert json.loads(stored["Body"].read())["line"] == "shared"


def test_nanio_ignores_conditional_puts_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """nanio 0.1.7 accepts a PUT with If-None-Match: * over an existing object: the store detects it once and warns
    that alias updates there are last-writer-wins (the documented limitation)."""
    import boto3

    from loraflow.s3_store import S3Store

    data = tmp_path / "data"
    data.mkdir()
    with nanio_server(data) as endpoint:
        for name, value in s3_env(endpoint).items():
            monkeypatch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="nanio-lines")
        store = S3Store("s3://nanio-lines/x")
        with caplog.at_level("WARNING"):
            assert store.conditional_writes() is False
            move_aliases(store, "l", {"production": "adapters/a"})
        assert read_aliases(store, "l").target("production") == "adapters/a"
    assert any("ignores conditional writes" in r.message for r in caplog.records)


# --- the newest object under a folder -------------------------------------------------------------------------------


def test_newest_local_file_by_mtime_then_key(tmp_path: Path) -> None:
    from loraflow.sources import newest_object

    folder = tmp_path / "drops"
    (folder / "sub").mkdir(parents=True)
    for name, mtime in [("a.jsonl", 100), ("b.jsonl", 300), ("sub/c.json", 300), ("z.txt", 900), (".hidden.json", 900)]:
        (folder / name).write_text("[]")
        os.utime(folder / name, (mtime, mtime))
    found = newest_object(str(folder))
    assert found.uri == str(folder / "sub" / "c.json") and found.source == str(folder) and found.from_folder
    assert newest_object(str(folder / "a.jsonl")).uri == str(folder / "a.jsonl")  # a file is itself
    (folder / "sub" / "c.json").unlink()
    (folder / "b.jsonl").unlink()
    (folder / "a.jsonl").unlink()
    with pytest.raises(DatasetError, match="no data file"):
        newest_object(str(folder))


def test_newest_s3_object_under_a_prefix(moto_s3: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow.sources import newest_object

    for name, value in moto_s3["env"].items():
        monkeypatch.setenv(name, value)
    client = moto_s3["client"]
    for key in ("drops/v1.jsonl", "drops/notes.txt", "drops/v2.jsonl", "other/v9.jsonl"):
        client.put_object(Bucket="lines", Key=key, Body=key.encode())
        time.sleep(1.1)  # S3's LastModified has one-second resolution
    found = newest_object("s3://lines/drops/")
    head = client.head_object(Bucket="lines", Key="drops/v2.jsonl")
    assert found.uri == "s3://lines/drops/v2.jsonl" and found.etag == head["ETag"].strip('"')
    assert found.source == "s3://lines/drops/"
    assert newest_object("s3://lines/drops/v1.jsonl").etag  # one object: itself, with its ETag


# --- where push-hub goes --------------------------------------------------------------------------------------------


def summary_with(decision: str | None) -> Any:
    from loraflow.promotion import Promotion
    from tests.test_tasks import run_summary

    promotion = None if decision is None else Promotion(line="l", alias="production", decision=decision, reason="r",
                                                        challenger_key="adapters/x")
    return run_summary().model_copy(update={"flow_run_id": "0123-run", "promotion": promotion})


def test_hub_target_follows_the_promotion() -> None:
    from loraflow.config import HubSettings
    from loraflow.hub import hub_target

    hub = HubSettings(repo_id="me/adapter")
    assert hub_target(summary_with("promoted"), hub) == ("main", "run-0123-run")
    assert hub_target(summary_with("kept"), hub) == ("main", "run-0123-run")
    assert hub_target(summary_with("off"), hub) == ("main", "run-0123-run")
    assert hub_target(summary_with(None), hub) == ("main", "run-0123-run")
    assert hub_target(summary_with("refused"), hub) == ("candidates/0123-run", None)
    assert hub_target(summary_with("refused"), HubSettings(repo_id="me/adapter", push_candidates=False)) is None
    repeat = summary_with("refused")
    repeat = repeat.model_copy(update={"promotion": repeat.promotion.model_copy(update={"repeat": True})})
    assert hub_target(repeat, hub) is None  # refused before against this champion: on its branch already


def test_push_to_a_candidates_branch_and_a_tag_on_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraflow.config import HubSettings
    from loraflow.hub import push_hub

    (tmp_path / "adapter_config.json").write_text("{}")
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        settings = HubSettings(repo_id="me/adapter")
        push_hub(str(tmp_path), settings, "hf_t", revision="candidates/run-2")
        push_hub(str(tmp_path), settings, "hf_t", revision="main", tag="run-3", tag_message="accuracy 0.9")
    assert hub.record.revisions("me/adapter") == ["candidates/run-2", "main"]
    assert hub.record.branches["me/adapter"] == {"candidates/run-2": "main"}
    main_commit = hub.record.commits[-1]["oid"]
    assert hub.record.tags["me/adapter"] == {"run-3": {"revision": main_commit, "message": "accuracy 0.9"}}


# --- the champion on the live base, and continued fine-tuning --------------------------------------------------------


def random_adapter(cfg: Any, seed: int, folder: Path) -> None:
    """A tiny-model adapter whose lora_B is non-zero (so it changes outputs), saved in PEFT format."""
    from loraflow.backends import attach_lora, load_model

    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in live.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1.0)
    live.model.save_pretrained(folder)
    live.tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("adapters")
    cfg = load_config(TINY_CONFIG, [{"output": {"store": str(work / "store")}}])
    store = LocalStore(work / "store")
    for name, seed in (("challenger", 1), ("champion", 2)):
        random_adapter(cfg, seed, work / name)
        store.put_folder(work / name, f"adapters/{name}")
    return {"cfg": cfg, "store": store, "work": work}


def test_champion_scored_beside_the_challenger_equals_a_fresh_load(two_adapters: dict) -> None:
    """Loading the champion as a second adapter on the challenger's live base gives the champion's own labels (as
    base + champion loaded afresh give them), and leaves the challenger active and unchanged afterwards."""
    from loraflow.backends import load_adapter
    from loraflow.inference import example_labels
    from loraflow.prompts import EvalExample
    from loraflow.promotion import champion_on_live

    cfg, store = two_adapters["cfg"], two_adapters["store"]
    texts = ["今天天气很好", "服务太差了", "会议在三点开始", "这家店不错", "等了一个小时"]
    examples = [EvalExample(f"分类以下文本的情感。\n{t}\n答:", "积极", "分类以下文本的情感。", t) for t in texts]
    labels = ["中性", "消极", "积极"]
    challenger = load_adapter(cfg.model, "transformers", store.uri, "adapters/challenger")
    challenger.model.eval()
    before = example_labels(challenger, examples, labels, cfg.infer)
    started = time.perf_counter()
    on_live = champion_on_live(challenger, store, "adapters/champion", examples, labels, cfg)
    beside = time.perf_counter() - started
    started = time.perf_counter()
    fresh = load_adapter(cfg.model, "transformers", store.uri, "adapters/champion")
    fresh.model.eval()
    alone = example_labels(fresh, examples, labels, cfg.infer)
    loaded = time.perf_counter() - started
    print(f"champion scored beside the challenger in {beside:.2f} s; base + champion loaded afresh {loaded:.2f} s")
    assert on_live == alone
    assert example_labels(challenger, examples, labels, cfg.infer) == before
    assert list(challenger.model.peft_config) == ["default"]


def test_init_adapter_resolves_and_training_starts_from_its_weights(two_adapters: dict) -> None:
    from safetensors.torch import load_file

    from loraflow.backends import attach_lora, load_model
    from loraflow.lineage import resolve_init_adapter

    cfg, store = two_adapters["cfg"], two_adapters["store"]
    assert resolve_init_adapter(cfg) is None  # unset: fresh
    assert resolve_init_adapter(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"init_adapter": "production"})})) is None  # the alias points nowhere yet: fresh
    move_aliases(store, cfg.line, {"production": "adapters/champion"})
    with_parent = load_config(TINY_CONFIG, [{"output": {"store": store.uri}, "model": {"init_adapter": "production"}}])
    parent = resolve_init_adapter(with_parent)
    assert parent.adapter_key == "adapters/champion" and parent.digest == store.digest("adapters/champion")
    with pytest.raises(ConfigError, match="no published adapter"):
        resolve_init_adapter(load_config(TINY_CONFIG, [{"output": {"store": store.uri},
                                                        "model": {"init_adapter": "adapters/nothing"}}]))
    with pytest.raises(ConfigError, match="r=16.*r=8"):
        resolve_init_adapter(load_config(TINY_CONFIG, [{"output": {"store": store.uri}, "lora": {"r": 8},
                                                        "model": {"init_adapter": "production"}}]))
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed,
                       parent)
    expected = load_file(str(two_adapters["work"] / "champion" / "adapter_model.safetensors"))
    state = {name: tensor for name, tensor in live.model.state_dict().items() if "lora_" in name}
    assert len(state) == len(expected)
    for name, tensor in expected.items():
        ours = next(v for k, v in state.items() if k.replace(".default", "") == name)
        assert torch.equal(ours, tensor), name


def test_the_parent_is_part_of_the_train_key(two_adapters: dict) -> None:
    from loraflow.cache_keys import train_key

    cfg = two_adapters["cfg"]
    fresh = train_key(cfg, "data", None, "transformers")
    assert fresh == train_key(cfg, "data", None, "transformers", None)
    assert train_key(cfg, "data", None, "transformers", "store:adapters/a#1") != fresh
    assert train_key(cfg, "data", None, "transformers", "store:adapters/a#1") != train_key(
        cfg, "data", None, "transformers", "store:adapters/a#2")


# --- the line over time ----------------------------------------------------------------------------------------------


def three_runs(store: LocalStore) -> None:
    move_aliases(store, "pic", {"candidate": "adapters/1", "production": "adapters/1"}, flow_run_id="r1",
                 decision="promoted", scores={"challenger_accuracy": 0.9, "champion_accuracy": None})
    move_aliases(store, "pic", {"candidate": "adapters/2"}, flow_run_id="r2", decision="refused",
                 scores={"challenger_accuracy": 0.5, "champion_accuracy": 0.9, "p_value": 1e-6})
    move_aliases(store, "pic", {"candidate": "adapters/3", "production": "adapters/3"}, flow_run_id="r3",
                 decision="promoted", scores={"challenger_accuracy": 1.0, "champion_accuracy": 0.9, "p_value": 0.03})


def test_line_table_and_picture_from_the_history(tmp_path: Path) -> None:
    from loraflow.report import line_history_png, line_markdown, line_table

    store = LocalStore(tmp_path)
    three_runs(store)
    record = read_aliases(store, "pic")
    rows = line_table(record, "production")
    assert [(r["flow run"], r["challenger accuracy"], r["champion accuracy"], r["decision"]) for r in rows] == [
        ("r1", 0.9, None, "promoted"), ("r2", 0.5, 0.9, "refused"), ("r3", 1.0, 0.9, "promoted")]
    assert line_history_png(record, "production").startswith(b"\x89PNG")
    markdown = line_markdown(record, "production")
    assert "| production | `adapters/3` |" in markdown and "data:image/png;base64," in markdown


def test_aliases_and_promote_commands(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    three_runs(store)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    store.put_folder(tmp_path / "adapter", "adapters/1")
    listed = run_cli("aliases", "--store", store.uri, "--line", "pic", "--plot", str(tmp_path / "pic.png"))
    assert listed.returncode == 0, listed.stderr
    assert "production   adapters/3" in listed.stdout and (tmp_path / "pic.png").read_bytes()[:4] == b"\x89PNG"
    assert run_cli("aliases", "--store", store.uri).stdout.split() == ["pic"]
    moved = run_cli("promote", "--store", store.uri, "--line", "pic", "--adapter", "adapters/1", "--reason", "roll back")
    assert moved.returncode == 0 and "production -> adapters/1 (was adapters/3)" in moved.stdout, moved.stderr
    last = read_aliases(store, "pic").history[-1]
    assert (last.alias, last.adapter_key, last.decision, last.reason) == ("production", "adapters/1", "manual", "roll back")
    assert "(loraflow promote)" in last.by
    refused = run_cli("promote", "--store", store.uri, "--line", "pic", "--adapter", "adapters/none")
    assert refused.returncode == 2 and "no published adapter" in refused.stderr
