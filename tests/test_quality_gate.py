"""The quality gate before push (hub.min_eval_accuracy, hub.require_beat_base) and the scores it reads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from loraflow.config import FinetuneConfig, HubSettings, load_config
from loraflow.errors import ConfigError, QualityGateError
from loraflow.backends import LiveModel
from loraflow.quality import (
    accuracy_interval, check_gate_measurable, check_quality_gate, gate_failures, score_answers, wilson_interval,
)
from loraflow.prompts import closed_label_set
from loraflow.hub import push_hub
from tests.conftest import TINY_CONFIG, run_cli
from tests.hub_standin import HubStandIn
from tests.prefect_reads import PrefectReader

REPO = "loraflow-tests/should-not-exist"

# --- config ---------------------------------------------------------------------------------------------------


def test_gate_is_off_by_default() -> None:
    hub = load_config(TINY_CONFIG).hub
    assert hub.min_eval_accuracy is None and hub.require_beat_base is False and not hub.gate_on


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_eval_accuracy_must_be_between_0_and_1(value: float) -> None:
    with pytest.raises(ConfigError, match=r"hub\.min_eval_accuracy"):
        load_config(TINY_CONFIG, [{"hub": {"min_eval_accuracy": value}}])


def test_gate_needs_eval_examples_to_score() -> None:
    with pytest.raises(ConfigError, match="score the eval split"):
        load_config(TINY_CONFIG, [{"hub": {"require_beat_base": True}, "data": {"eval_fraction": 0.0}}])
    with pytest.raises(ConfigError, match="infer.max_eval_examples > 0"):
        load_config(TINY_CONFIG, [{"hub": {"min_eval_accuracy": 0.5}, "infer": {"max_eval_examples": 0}}])


def test_closed_label_set_needs_every_label_at_least_twice() -> None:
    rows = [{"output": label} for label in ["积极", "消极", "中性"] * 2]
    assert closed_label_set(rows, rows[:2]) == ["中性", "消极", "积极"]
    assert closed_label_set(rows + [{"output": "很难说"}], rows[:2]) is None  # one label seen once: not a label set
    assert closed_label_set(rows, [{"output": "很难说"}]) is None  # an eval output outside the set


def test_gate_on_free_text_outputs_is_an_input_error() -> None:
    check_gate_measurable(HubSettings(), None)  # gate off: nothing to measure
    with pytest.raises(ConfigError, match="not a closed label set"):
        check_gate_measurable(HubSettings(min_eval_accuracy=0.5), None)


@pytest.mark.slow
def test_loraflow_run_with_a_gate_on_free_text_exits_2_before_any_model_loads(tmp_path: Path) -> None:
    """Thirty distinct answers are no label set, so hub.min_eval_accuracy cannot be measured: the CLI's preflight
    reads and formats the data, stops with exit 2 before the flow starts, and nothing is trained or published."""
    rows = [{"instruction": "续写这句话。", "input": f"第{i}个句子", "output": f"这是第{i}个不同的回答"} for i in range(30)]
    data = tmp_path / "free_text.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    result = run_cli("run", "--config", str(TINY_CONFIG), "--dataset", str(data), "--set", "hub.min_eval_accuracy=0.5",
                     "--output", str(tmp_path / "out"), "--set", f"output.store={tmp_path / 'store'}")
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hub.min_eval_accuracy" in errors[0] and "not a closed label set" in errors[0]
    assert "Beginning flow run" not in log and "Task run 'load-4bit-model" not in log  # no flow, no model
    assert not (tmp_path / "store" / "adapters").exists() and not (tmp_path / "store" / "checkpoints").exists()
    assert not (tmp_path / "out").exists()


# --- scores and the gate's verdict -------------------------------------------------------------------------------


@pytest.mark.parametrize(("successes", "total", "low", "high"), [
    # R. G. Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven methods",
    # Statistics in Medicine 17 (1998) 857-872, Table II, method 3 (Wilson score interval, no continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0000, 0.1611), (1, 29, 0.0061, 0.1718),
    # by hand from Wilson's formula, z = 1.96: 1 of 2 -> 0.5 ± 0.6711 × sqrt(0.125 + 0.2401) = 0.5 ± 0.4055
    (1, 2, 0.0945, 0.9055), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_matches_published_values(successes: int, total: int, low: float, high: float) -> None:
    assert wilson_interval(successes, total) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) is None and accuracy_interval(None, 5) is None and accuracy_interval(0.5, 0) is None
    assert accuracy_interval(0.5, 2) == wilson_interval(1, 2)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    for total in (1, 7, 30, 1000):  # always inside 0..1, always holding the observed proportion
        for successes in range(0, total + 1, max(1, total // 7)):
            low, high = wilson_interval(successes, total)
            assert 0.0 <= low <= successes / total <= high <= 1.0


def test_one_label_is_no_label_set_and_the_gate_says_why() -> None:
    from loraflow.prompts import why_no_label_set

    one = [{"output": "positive"}] * 6
    assert closed_label_set(one, one[:2]) is None
    with pytest.raises(ConfigError, match="not a closed label set .every training output is 'positive': one label"):
        check_gate_measurable(HubSettings(min_eval_accuracy=0.5), None, why_no_label_set(one, one[:2]))


def test_scores_use_the_first_line_and_count_per_label() -> None:
    labels = ["neg", "pos"]
    answers = ["pos", "pos\nmore text", "neg", " neg ", "positive", "pos"]
    expected = ["pos", "pos", "pos", "neg", "neg", "neg"]
    scores = score_answers(answers, expected, labels)
    assert scores.accuracy == pytest.approx(3 / 6)
    assert scores.per_label["pos"].precision == pytest.approx(2 / 3) and scores.per_label["pos"].recall == pytest.approx(2 / 3)
    assert scores.per_label["neg"].precision == pytest.approx(1 / 2) and scores.per_label["neg"].recall == pytest.approx(1 / 3)
    never_said = score_answers(["x", "x"], ["pos", "neg"], labels)
    assert never_said.per_label["pos"].precision is None and never_said.per_label["pos"].recall == 0.0


def test_gate_failures_name_the_numbers() -> None:
    assert gate_failures(HubSettings(), 0.1, 0.9) == []  # off
    assert gate_failures(HubSettings(min_eval_accuracy=0.8, require_beat_base=True), 0.85, 0.5) == []
    assert gate_failures(HubSettings(min_eval_accuracy=0.8), 0.62, None) == [
        "eval accuracy 0.62 < hub.min_eval_accuracy 0.8"
    ]
    assert gate_failures(HubSettings(require_beat_base=True), 0.5, 0.5) == [
        "eval accuracy 0.5 does not beat the base model's 0.5 (hub.require_beat_base)"
    ]
    assert len(gate_failures(HubSettings(min_eval_accuracy=0.8, require_beat_base=True), 0.4, 0.6)) == 2
    assert "not measured" in gate_failures(HubSettings(min_eval_accuracy=0.8), None, None)[0]


def test_failing_gate_sends_no_request_to_the_hub(tmp_path: Path) -> None:
    hub_settings = HubSettings(repo_id=REPO, min_eval_accuracy=0.8)
    (tmp_path / "adapter_config.json").write_text("{}")
    with HubStandIn() as hub, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        patch.setenv("HF_HUB_OFFLINE", "0")
        with pytest.raises(QualityGateError, match=r"eval accuracy 0\.62 < hub\.min_eval_accuracy 0\.8"):
            push_hub(str(tmp_path), hub_settings, "hf_test_token", eval_accuracy=0.62, base_eval_accuracy=0.3)
    assert hub.record.requests == []
    check_quality_gate(hub_settings, 0.8, 0.3, str(tmp_path))  # at the threshold passes


def adapter_that_changes_outputs(cfg: FinetuneConfig) -> LiveModel:
    """The tiny model with a LoRA adapter whose lora_B is non-zero (a fresh one is all zeros: no change at all)."""
    from loraflow.backends import attach_lora
    from loraflow.backends import load_model

    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in live.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=1.0)
    live.model.eval()
    return live


def test_base_answers_are_the_base_models_answers() -> None:
    """smoke-infer scores the base model with the adapter disabled in place: the same answers as a base model
    that never had an adapter, although the adapter (non-zero lora_B) changes the answers."""
    from loraflow.backends import load_model
    from loraflow.inference import base_model_answers, generate

    cfg = load_config(TINY_CONFIG)
    prompts = [f"分类以下文本的情感。\n{text}\n答:" for text in ("今天天气很好", "服务太差了", "会议在三点开始")]
    plain = load_model(cfg.model, "transformers")
    plain_answers = [text for text, _ in generate(plain, prompts, 8)]
    live = adapter_that_changes_outputs(cfg)
    assert [text for text, _ in generate(live, prompts, 8)] != plain_answers
    assert base_model_answers(live, prompts, 8) == plain_answers


def test_label_likelihoods_match_one_sequence_at_a_time_and_the_base_model() -> None:
    """Batched scoring gives each (prompt, label) the log-probability of the label's tokens and EOS that the
    sequence alone gives, both ways (prompts once with a shared cache, the transformers path; one padded row per
    pair, the Unsloth path); with the adapter disabled, the plain base model's numbers."""
    from loraflow.backends import load_model
    from loraflow.inference import label_log_likelihoods, likeliest_labels
    from loraflow.scoring import whole_row_log_likelihoods

    cfg = load_config(TINY_CONFIG)
    prompts = [f"分类以下文本的情感。\n{text}\n答:" for text in ("今天天气很好", "服务太差了，再也不来", "会议在三点开始")]
    labels = ["消极", "积极", "中性的看法"]  # labels of different token lengths: rows of different widths
    plain = load_model(cfg.model, "transformers")
    plain_scores = label_log_likelihoods(plain, prompts, labels)
    tokenizer = plain.tokenizer
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    completions = [tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for label in labels]
    row_scores = whole_row_log_likelihoods(plain, prompt_ids, completions)
    for ids, shared_row, whole_row in zip(prompt_ids, plain_scores, row_scores):
        for completion, shared, whole in zip(completions, shared_row, whole_row):
            with torch.no_grad():
                logits = plain.model(input_ids=torch.tensor([ids + completion])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            alone = sum(float(log_probs[len(ids) - 1 + i, token]) for i, token in enumerate(completion))
            assert shared == pytest.approx(alone, abs=1e-3) and whole == pytest.approx(alone, abs=1e-3)
    live = adapter_that_changes_outputs(cfg)
    plain_flat = [score for row in plain_scores for score in row]
    adapted = [score for row in label_log_likelihoods(live, prompts, labels) for score in row]
    assert adapted != pytest.approx(plain_flat, abs=1e-3)
    with live.model.disable_adapter():
        disabled = [score for row in label_log_likelihoods(live, prompts, labels) for score in row]
    assert disabled == pytest.approx(plain_flat, abs=1e-4)
    assert likeliest_labels(plain, prompts, labels) == [labels[max(range(3), key=row.__getitem__)] for row in plain_scores]


# --- end to end: a run whose adapter misses the gate ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_run(tiny_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny config reaches ~0.56 eval accuracy; hub.min_eval_accuracy 1.0 stops it. The gate is judged on the
    adapter the session's tiny run trained (a copy of its store: hub.* is not in the train key), reloaded."""
    work = tmp_path_factory.mktemp("gated")
    shutil.copytree(tiny_run["work"] / "store", work / "store")
    with HubStandIn() as hub:
        result = run_cli(
            "run", "--config", str(TINY_CONFIG), "--output", str(work / "out"),
            "--set", f"output.store={work / 'store'}", "--set", f"hub.repo_id={REPO}",
            "--set", "hub.min_eval_accuracy=1.0",
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_sentinel_token_for_tests", "HF_HUB_OFFLINE": "0"},
        )
    summary = json.loads((work / "out" / "summary.json").read_text())
    with PrefectReader() as prefect:
        state, artifacts = prefect.state(summary["flow_run_id"]), prefect.artifacts(summary["flow_run_id"])
    return {"result": result, "summary": summary, "hub": hub.record, "work": work, "state": state, "artifacts": artifacts}


@pytest.mark.slow
def test_failing_gate_fails_the_run_with_the_numbers(gated_run: dict) -> None:
    result, summary = gated_run["result"], gated_run["summary"]
    assert summary["eval_accuracy"] < 1.0, "the tiny model scored 1.0: this test needs an adapter that misses the gate"
    failure = f"eval accuracy {summary['eval_accuracy']:.4g} < hub.min_eval_accuracy 1"
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: flow run Failed: quality gate failed: ")
    assert failure in errors[0]
    assert f"Nothing was pushed to {REPO}" in errors[0] and str(gated_run["work"] / "out") in errors[0]
    state = gated_run["state"]
    assert state.is_failed() and failure in state.message


@pytest.mark.slow
def test_failing_gate_sent_nothing_to_the_hub(gated_run: dict) -> None:
    assert gated_run["hub"].requests == []
    assert gated_run["summary"]["hub_url"] is None


@pytest.mark.slow
def test_failing_gate_keeps_the_adapter_locally_and_in_the_store(gated_run: dict) -> None:
    out = gated_run["work"] / "out"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "summary.json", "loss_curve.png"} <= {
        p.name for p in out.iterdir()
    }
    assert (Path(gated_run["summary"]["adapter_uri"]) / "manifest.json").is_file()


@pytest.mark.slow
def test_failing_gate_still_reports_its_numbers_as_artifacts(gated_run: dict) -> None:
    summary = gated_run["summary"]
    assert summary["quality_gate"]["failures"] == [f"eval accuracy {summary['eval_accuracy']:.4g} < hub.min_eval_accuracy 1"]
    artifacts = gated_run["artifacts"]
    rows = {row["metric"]: row["value"] for row in json.loads(artifacts["finetune-metrics"].data)}
    assert rows["quality gate"] == "failed: " + summary["quality_gate"]["failures"][0]
    assert "Quality gate: failed: eval accuracy" in artifacts["finetune-report"].data


# --- end to end: a run whose smoke-infer answers are unusable -------------------------------------------------------


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One optimizer step leaves the tiny model without the answer format (no EOS within max_new_tokens): smoke-infer
    refuses its answers. The run still writes its output folder, summary and artifacts, pushes and promotes nothing."""
    work = tmp_path_factory.mktemp("refused")
    with HubStandIn() as hub:
        result = run_cli(
            "run", "--config", str(TINY_CONFIG), "--output", str(work / "out"),
            "--set", f"output.store={work / 'store'}", "--set", f"hub.repo_id={REPO}", "--set", "train.max_steps=1",
            env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_sentinel_token_for_tests", "HF_HUB_OFFLINE": "0"},
        )
    summary = json.loads((work / "out" / "summary.json").read_text())
    with PrefectReader() as prefect:
        state, artifacts = prefect.state(summary["flow_run_id"]), prefect.artifacts(summary["flow_run_id"])
    return {"result": result, "summary": summary, "hub": hub.record, "work": work, "state": state, "artifacts": artifacts}


def test_unusable_answers_fail_the_run_naming_the_reason(refused_run: dict) -> None:
    result, summary = refused_run["result"], refused_run["summary"]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: flow run Failed: smoke-infer: ")
    assert "answers are unusable" in errors[0] and "Nothing was pushed or promoted" in errors[0]
    assert refused_run["state"].is_failed() and "answers are unusable" in refused_run["state"].message
    assert summary["smoke_failure"] and summary["smoke_failure"] in errors[0]


def test_unusable_answers_leave_their_evidence(refused_run: dict) -> None:
    summary, out = refused_run["summary"], refused_run["work"] / "out"
    assert {"adapter_model.safetensors", "README.md", "summary.json", "loss_curve.png"} <= {p.name for p in out.iterdir()}
    answers = summary["smoke_answers"]  # every answer is kept, the refused one named in the reason among them
    assert len(answers) == summary["num_eval_examples"] + 1  # the eval split and the one infer.prompts entry
    named = re.search(r"e\.g\. '([^']*)' gave", summary["smoke_failure"]).group(1)
    assert named in [a["input"] or a["instruction"] for a in answers]
    assert summary["eval_accuracy"] is None and summary["promotion"]["decision"] == "refused"
    assert summary["promotion"]["aliases_moved"] == [] and summary["promotion"]["event"] is None
    rows = {row["metric"]: row["value"] for row in json.loads(refused_run["artifacts"]["finetune-metrics"].data)}
    assert rows["smoke-infer"] == summary["smoke_failure"]
    assert "Refused: smoke-infer" in refused_run["artifacts"]["finetune-report"].data
    store = refused_run["work"] / "store"
    assert not (store / "aliases").exists() or json.loads((store / "aliases" / f"{summary['line']}.json").read_text())[
        "aliases"] == {}
    assert refused_run["hub"].requests == [] and summary["hub_url"] is None
