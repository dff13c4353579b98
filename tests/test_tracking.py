"""train.report_to and train.trainer_args (issue #19): trackers read back through their own readers (MLflow's client
on a file store, TensorBoard's event reader) from one real run, a passthrough key that changes training changes the
cache key and the result, and bad passthrough keys stop `loraflow run` before any model loads."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

from loraflow import tracking
from loraflow.cache_keys import train_key, train_settings_excluded
from loraflow.config import load_config, parse_assignment
from loraflow.errors import ConfigError
from tests.conftest import DEMO_DATA, TINY_CONFIG, run_cli
from tests.prefect_reads import PrefectReader

STEPS = 14  # on one-label data the tiny model answers with EOS after ~12 steps (smoke-infer fails a run that never does)
SENTINEL = "mlflow_sentinel_token_for_tests"


def tiny(*assignments: str):
    return load_config(TINY_CONFIG, [parse_assignment(a) for a in assignments])


# --- the config: names, owned keys, types ------------------------------------------------------------------------


def test_trackers_are_transformers_integrations() -> None:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(tracking.TRACKERS) == set(INTEGRATION_TO_CALLBACK)


def test_every_owned_key_is_an_sftconfig_argument() -> None:
    from trl import SFTConfig

    assert set(tracking.OWNED_TRAINER_ARGS) <= {f.name for f in dataclasses.fields(SFTConfig)}


@pytest.mark.parametrize(("value", "expected"), [("mlflow", ["mlflow"]), ("none", []), (None, []),
                                                 (["tensorboard", "mlflow"], ["tensorboard", "mlflow"])])
def test_report_to_spellings(value: object, expected: list[str]) -> None:
    cfg = load_config(TINY_CONFIG, [{"train": {"report_to": value}}])
    assert cfg.train.report_to == expected
    assert tiny().train.report_to == []  # default: no tracker


@pytest.mark.parametrize("value", ["all", "mlflw", "[mlflow, mlflow]"])
def test_unknown_or_repeated_tracker_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.report_to"):
        tiny(f"train.report_to={value}")


@pytest.mark.parametrize(("key", "reason"), [
    ("output_dir", "set output.dir"), ("save_steps", "train.save_steps"), ("packing", "train.packing"),
    ("loss_type", "loss for the backend"), ("learning_rate", "train.learning_rate"), ("report_to", "train.report_to"),
    ("hub_token", "HF_TOKEN"),
])
def test_an_owned_key_is_refused_with_the_reason(key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny(f"train.trainer_args.{key}=1")
    assert "train.trainer_args" in str(caught.value) and key in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize(("args", "words"), [
    ({"max_grad_nrom": 0.5}, ["train.trainer_args.max_grad_nrom", "not an argument", "did you mean max_grad_norm"]),
    ({"max_grad_norm": "big"}, ["train.trainer_args.max_grad_norm", "expected a number", "str 'big'"]),
    ({"neftune_noise_alpha": True}, ["neftune_noise_alpha", "expected a number or null", "bool"]),
    ({"torch_empty_cache_steps": 2.5}, ["torch_empty_cache_steps", "expected an integer or null"]),
    ({"lr_scheduler_kwargs": [1]}, ["lr_scheduler_kwargs", "expected a mapping or a string or null"]),
    ({"truncation_mode": "keep_middle"}, ["truncation_mode", "'keep_middle' is not one of 'keep_end', 'keep_start'"]),
    ({"debug": ["no_such_option"]}, ["train.trainer_args.debug", "a list of one of 'underflow_overflow'"]),
    ({"parallelism_config": {"dp_shard_size": 2}}, ["parallelism_config", "a config cannot hold one"]),
])
def test_an_unknown_key_or_a_wrong_type_names_the_key(args: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        tracking.check_trainer_args(args)
    for word in words:
        assert word in str(caught.value)


def test_values_that_fit_pass() -> None:
    tracking.check_trainer_args({
        "max_grad_norm": 1, "neftune_noise_alpha": 5.0, "lr_scheduler_kwargs": {"num_cycles": 2},
        "torch_empty_cache_steps": None, "include_for_metrics": ["loss"], "debug": ["underflow_overflow"],
        "dataloader_num_workers": 0, "torch_compile_mode": "max-autotune", "adam_beta2": 0.95,
    })


def test_an_enum_field_takes_its_values_only() -> None:
    from transformers.trainer_utils import SchedulerType

    assert tracking.fits("cosine", SchedulerType | str)
    assert not tracking.fits("cosinus", SchedulerType | str)
    assert tracking.describe(SchedulerType | str).startswith("one of 'linear', 'cosine'")


def test_a_tracker_that_is_not_installed_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.report_to: clearml is not available here"):
        tracking.check_report_to(["clearml"])


def test_sft_config_gets_the_passthrough_after_loraflows_settings(tmp_path: Path) -> None:
    import torch

    from loraflow.batching import batch_layout
    from loraflow.builders import build_sft_config

    cfg = tiny("train.report_to=[tensorboard]", "train.trainer_args={max_grad_norm: 0.3, dataloader_num_workers: 1}")
    layout = batch_layout(cfg.train, cfg.model, [], packing=False)
    args = build_sft_config(cfg.train, layout, False, torch.float32, "nll", False, tmp_path, run_name="crafty-beaver")
    assert (args.max_grad_norm, args.dataloader_num_workers) == (0.3, 1)  # 1 overrides loraflow's 0
    assert args.report_to == ["tensorboard"] and args.run_name == "crafty-beaver"
    plain = build_sft_config(tiny().train, layout, False, torch.float32, "nll", False, tmp_path)
    assert plain.report_to in ([], "none")


def test_passthrough_keys_are_in_the_train_key_and_trackers_are_not() -> None:
    base = tiny()
    key = train_key(base, "data", None, "transformers")
    assert train_key(tiny("train.report_to=[mlflow, tensorboard]"), "data", None, "transformers") == key
    assert train_key(tiny("train.trainer_args.max_grad_norm=0.5"), "data", None, "transformers") != key
    assert train_key(tiny("train.trainer_args.max_grad_norm=0.5"), "data", None, "transformers") != \
        train_key(tiny("train.trainer_args.max_grad_norm=0.25"), "data", None, "transformers")
    # without trainer_args the key covers the same settings as before the two fields existed (adapters still found)
    assert not {"report_to", "trainer_args"} & set(base.train.model_dump(exclude=train_settings_excluded(base)))


def test_uris_are_redacted_for_summaries_and_artifacts() -> None:
    assert tracking.redact_uri("https://alice:s3cret@mlflow.example.com/x?token=abc&experiment=3") == \
        "https://***@mlflow.example.com/x?token=***&experiment=3"
    assert tracking.redact_uri("file:///tmp/mlruns/0/abc") == "file:///tmp/mlruns/0/abc"
    runs = [{"tracker": "mlflow", "run_name": "r", "run_id": "1", "log_dir": None,
             "url": "https://alice:s3cret@mlflow.example.com/#/experiments/0/runs/1"}]
    assert "s3cret" not in json.dumps(tracking.runs_for_summary(runs, "out"))


def test_mlflow_run_urls() -> None:
    assert tracking.mlflow_run_url("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert tracking.mlflow_run_url("file:/tmp/mlruns", "0", "abc") == "file:///tmp/mlruns/0/abc"
    assert tracking.mlflow_run_url("sqlite:///mlflow.db", "0", "abc") == "sqlite:///mlflow.db"


def test_the_flow_checks_trainer_args_at_its_door() -> None:
    """A deployment's run never passes the CLI's preflight: the flow itself refuses the key before any task."""
    from flows.finetune import finetune

    config = tiny().model_dump(mode="json")
    config["train"]["trainer_args"] = {"max_grad_nrom": 0.5}
    with pytest.raises(ConfigError, match="train.trainer_args.max_grad_nrom"):
        finetune.fn(config=config)


@pytest.mark.parametrize(("optimizer", "scheduler", "words"), [
    ("adamw_torh", "linear", ["train.optimizer", "'adamw_torh'", "did you mean adamw_torch"]),
    ("auto", "warmup_cosine", ["train.lr_scheduler", "'warmup_cosine'"]),
])
def test_an_unknown_optimizer_or_scheduler_names_the_key(optimizer: str, scheduler: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        tracking.check_optimizer_and_scheduler(optimizer, scheduler)
    assert all(word in str(caught.value) for word in words), caught.value


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_an_optimizer_whose_package_is_missing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.optimizer: 'adamw_8bit': You need to install `bitsandbytes`"):
        tracking.check_optimizer_and_scheduler("adamw_8bit", "linear")


def test_built_in_optimizers_and_schedulers_pass() -> None:
    for optimizer, scheduler in (("auto", "linear"), ("adamw_torch", "cosine"), ("adafactor", "constant_with_warmup")):
        tracking.check_optimizer_and_scheduler(optimizer, scheduler)


def test_the_optimizers_passed_unchecked_are_transformers_names() -> None:
    from transformers.training_args import OptimizerNames

    assert tracking.OPTIMIZERS_OF_TORCH - {"auto"} <= {name.value for name in OptimizerNames}


# --- through `loraflow run`: bad keys stop before anything loads -----------------------------------------------


@pytest.mark.parametrize(("assignment", "words"), [
    ("train.trainer_args.max_grad_nrom=0.5", ["train.trainer_args.max_grad_nrom", "did you mean max_grad_norm"]),
    ("train.trainer_args.output_dir=/tmp/elsewhere", ["train.trainer_args", "output_dir", "set output.dir"]),
    ("train.lr_scheduler=cosin", ["train.lr_scheduler", "'cosin'", "did you mean cosine"]),
])
def test_a_bad_trainer_arg_exits_2_before_any_model_loads(assignment: str, words: list[str], tmp_path: Path) -> None:
    model_cache = tmp_path / "model-cache"
    started = time.monotonic()
    result = run_cli("run", "--config", str(TINY_CONFIG), "--output", str(tmp_path / "out"),
                     "--set", f"output.store={tmp_path / 'store'}", "--set", assignment,
                     env={"LORAFLOW_CACHE_DIR": str(model_cache)}, timeout=180)
    elapsed = time.monotonic() - started
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last_line.startswith("error: ") and all(word in last_line for word in words), last_line
    assert "load-4bit-model" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not model_cache.exists(), "the tiny model was prepared for a run whose config was bad"
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
    assert elapsed < 120, f"took {elapsed:.0f} s: more than a config check"


# --- real trackers, read back with their own readers, from one run ----------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run A reports to MLflow (a file store) and TensorBoard, and clips gradients at trainer_args.max_grad_norm 0.3
    (loraflow leaves the trainer's 1.0); run B, in the same store, is the same config without either. Both on the
    demo rows with one label, which the tiny model learns in a dozen steps. Then both flow runs' names and artifacts
    through Prefect's client."""
    work = tmp_path_factory.mktemp("tracking")
    data = work / "one_label.json"
    rows = json.loads(DEMO_DATA.read_text(encoding="utf-8"))
    data.write_text(json.dumps([{**row, "output": "好"} for row in rows], ensure_ascii=False), encoding="utf-8")
    env = {"MLFLOW_TRACKING_URI": (work / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "MLFLOW_TRACKING_TOKEN": SENTINEL}
    runs = {}
    for name, extra in (("a", ["train.report_to=[mlflow, tensorboard]", "train.trainer_args.max_grad_norm=0.3"]),
                        ("b", [])):
        result = run_cli(
            "run", "--config", str(TINY_CONFIG), "--dataset", str(data), "--output", str(work / name),
            "--set", f"output.store={work / 'store'}", "--set", f"train.max_steps={STEPS}",
            *[arg for assignment in extra for arg in ("--set", assignment)], env=env,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = {"result": result, "summary": json.loads((work / name / "summary.json").read_text())}
    with PrefectReader() as prefect, prefect.client() as client:
        from uuid import UUID

        for run in runs.values():
            run_id = run["summary"]["flow_run_id"]
            run["flow_run_name"] = client.read_flow_run(UUID(run_id)).name
            run["artifacts"] = prefect.artifacts(run_id)
    return {"work": work, **runs}


def mlflow_client(work: Path):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3.17 keeps its file store behind this switch
    from mlflow import MlflowClient

    return MlflowClient((work / "mlruns").as_uri())


@pytest.mark.slow
def test_mlflow_has_the_run_its_losses_and_the_lora_rank(tracked: dict) -> None:
    summary = tracked["a"]["summary"]
    (entry,) = [r for r in summary["tracker_runs"] if r["tracker"] == "mlflow"]
    client = mlflow_client(tracked["work"])
    run = client.get_run(entry["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == entry["run_name"] == tracked["a"]["flow_run_name"]  # the Prefect flow run's name
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [step for step, _ in history] == [step for step, _ in summary["train_losses"]] == list(range(1, STEPS + 1))
    assert [value for _, value in history] == pytest.approx([loss for _, loss in summary["train_losses"]], rel=1e-6)
    params = run.data.params
    assert params["peft.r"] == "16" and params["peft.lora_alpha"] == "16"  # the LoRA rank, logged by loraflow
    assert params["max_grad_norm"] == "0.3" and params["run_name"] == tracked["a"]["flow_run_name"]
    assert run.data.tags["loraflow.flow_run_id"] == summary["flow_run_id"]
    assert entry["url"] == (tracked["work"] / "mlruns" / run.info.experiment_id / run.info.run_id).as_uri()
    # only run A reported: B had no trackers
    assert len(client.search_runs([run.info.experiment_id])) == 1 and tracked["b"]["summary"]["tracker_runs"] == []


@pytest.mark.slow
def test_tensorboard_events_hold_the_losses(tracked: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = tracked["a"]["summary"]
    (entry,) = [r for r in summary["tracker_runs"] if r["tracker"] == "tensorboard"]
    log_dir = tracked["work"] / "a" / "runs" / tracked["a"]["flow_run_name"]  # in output.dir, named as the flow run
    assert entry["log_dir"] == str(log_dir) and entry["url"] == log_dir.as_uri()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in scalars] == list(range(1, STEPS + 1))
    assert [value for _, value in scalars] == pytest.approx([loss for _, loss in summary["train_losses"]], rel=1e-6)
    assert '"peft.r": "16"' in str(events.Tensors("peft_config/text_summary")[0].tensor_proto.string_val[0], "utf-8")


@pytest.mark.slow
def test_each_tracker_run_is_a_prefect_link_artifact(tracked: dict) -> None:
    artifacts = tracked["a"]["artifacts"]
    for entry in tracked["a"]["summary"]["tracker_runs"]:
        link = artifacts[f"finetune-tracker-{entry['tracker']}"]
        # Prefect stores a link artifact as markdown: [text](link)
        assert link.type == "markdown" and link.data == f"[{entry['tracker']} run {entry['run_name']}]({entry['url']})"
    assert not any(key.startswith("finetune-tracker-") for key in tracked["b"]["artifacts"])


@pytest.mark.slow
def test_a_passthrough_key_changes_the_cache_key_and_the_result(tracked: dict) -> None:
    a, b = tracked["a"]["summary"], tracked["b"]["summary"]
    assert "train" not in b["cached_tasks"], "max_grad_norm changed, yet train was served from the cache"
    assert a["adapter_uri"] != b["adapter_uri"]  # adapters/<train key>
    assert a["train_losses"][0] == b["train_losses"][0]  # same start: clipping acts on the updates only
    assert a["train_losses"][-1][1] != pytest.approx(b["train_losses"][-1][1], rel=1e-3)
    from safetensors.torch import load_file

    weights_a = load_file(str(tracked["work"] / "a" / "adapter_model.safetensors"))
    weights_b = load_file(str(tracked["work"] / "b" / "adapter_model.safetensors"))
    assert any(not (weights_a[name] == weights_b[name]).all() for name in weights_a)


@pytest.mark.slow
def test_the_tracker_credential_is_nowhere(tracked: dict) -> None:
    for run in (tracked["a"], tracked["b"]):
        assert SENTINEL not in run["result"].stdout + run["result"].stderr
        assert all(SENTINEL not in str(artifact.data) for artifact in run["artifacts"].values())
    for path in tracked["work"].rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_a_tracker_credential_comes_from_its_secret_block_and_is_not_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect.events.worker import EventsWorker

    secret = "wandb_sentinel_key_from_a_block"
    monkeypatch.setenv("WANDB_API_KEY", "")  # unset as far as loraflow goes; undone after the test
    with PrefectReader() as prefect, temporary_settings({PREFECT_API_URL: prefect.server.api_url}):
        Secret(value=secret).save("wandb-api-key", overwrite=True)
        with caplog.at_level("DEBUG"):
            tracking.load_tracker_credentials(["wandb"])
        EventsWorker.drain_all(timeout=30)  # the block's events, sent while the server is still there
    assert os.environ["WANDB_API_KEY"] == secret
    assert "wandb-api-key" in caplog.text and secret not in caplog.text
