"""Every shipped config and every prefect.yaml deployment loads and validates; bad configs say where."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraflow.config import FinetuneConfig, deep_merge, load_config, parse_assignment
from loraflow.errors import ConfigError
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "deployments" / "configs").glob("*.yaml"))


def test_the_three_required_configs_ship() -> None:
    names = {path.name for path in CONFIGS}
    assert {"tiny-cpu.yaml", "smollm2-135m-cpu.yaml", "llama3-8b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_opens_with_its_command(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, FinetuneConfig)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ") and "loraflow run" in first_line and path.name in first_line


def test_notebook_config_is_the_notebook_job_exactly() -> None:
    cfg = load_config(ROOT / "deployments" / "configs" / "llama3-8b-qlora.yaml")
    assert cfg.model.name == "unsloth/llama-3-8b-bnb-4bit"
    assert (cfg.model.max_seq_length, cfg.model.load_in_4bit, cfg.model.dtype) == (2048, True, "auto")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias) == (16, 16, 0.0, "none")
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.lora.gradient_checkpointing == "auto"
    t = cfg.train
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (4, 4, 5, 60)
    assert (t.learning_rate, t.save_steps, t.save_total_limit) == (2e-4, 10000, 2)


def test_set_overrides_merge_over_the_file() -> None:
    cfg = load_config(
        ROOT / "deployments" / "configs" / "tiny-cpu.yaml",
        [parse_assignment("train.max_steps=5"), parse_assignment("lora.target_modules=[q_proj, v_proj]")],
    )
    assert cfg.train.max_steps == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.name == "loraflow:tiny-llama"  # untouched keys keep the file's value


def test_a_set_value_that_is_not_yaml_is_taken_as_the_string_it_is() -> None:
    assert parse_assignment("prompt.template={instruction} {input}\n答:{output}") == {
        "prompt": {"template": "{instruction} {input}\n答:{output}"}  # YAML would read "{...} ..." as a broken map
    }
    assert parse_assignment("train.max_steps=5") == {"train": {"max_steps": 5}}  # YAML still types the rest


def test_a_config_file_that_is_not_yaml_is_one_line_naming_the_place(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  uri: x.jsonl\n   eval_uri: y.jsonl\n")
    with pytest.raises(ConfigError) as caught:
        load_config(broken, [])
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{broken}: not valid YAML: ") and "line 3" in message


def test_a_folder_given_as_the_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: a folder, not a config file"):
        load_config(tmp_path, [])


@pytest.mark.parametrize("option", ["--dataset", "--eval-dataset", "--model", "--output"])
def test_an_option_given_empty_is_an_error_not_the_configs_value(option: str) -> None:
    from cli.main import build_parser, overrides_from

    args = build_parser().parse_args(["run", "--config", "x.yaml", option, ""])
    with pytest.raises(ConfigError, match=f"^{option} is empty"):
        overrides_from(args)


def test_deep_merge_keeps_siblings() -> None:
    assert deep_merge({"a": {"x": 1, "y": 2}}, {"a": {"y": 3}}) == {"a": {"x": 1, "y": 3}}


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"model": {"backend": "vllm"}}, "model.backend"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"train": {"max_step": 8}}, "train.max_step: Extra inputs are not permitted; did you mean max_steps?"),
        ({"trian": {"max_steps": 8}}, "trian: Extra inputs are not permitted; did you mean train?"),
        ({"prompt": {"template": "no placeholders"}}, "prompt.template"),
        ({"train": {"max_steps": None, "num_epochs": None}}, "set train.max_steps or train.num_epochs"),
        ({"train": {"num_epochs": 1}}, "are both set, and max_steps would win"),
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction"),
    ],
)
def test_invalid_config_names_the_field(override: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(ROOT / "deployments" / "configs" / "tiny-cpu.yaml", [override])


def test_num_epochs_alone_trains_by_epochs() -> None:
    # without a max_steps anywhere, max_steps' default (60) must not silently win over the epochs asked for
    cfg = load_config(None, [{"data": {"uri": "x.jsonl"}, "model": {"name": "x"}, "train": {"num_epochs": 2}}])
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 2
    assert load_config(None, [{"data": {"uri": "x.jsonl"}, "model": {"name": "x"}}]).train.max_steps == 60


def test_missing_sections_are_named() -> None:
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(None, [{"model": {"name": "x"}}])


def test_custom_template_must_end_with_output() -> None:
    with pytest.raises(ConfigError, match="end with"):
        load_config(ROOT / "deployments" / "configs" / "tiny-cpu.yaml",
                    [{"prompt": {"template": "{output} then {instruction}"}}])


@pytest.mark.parametrize("deployments_file", ["prefect.yaml", "infra/stack/prefect-local.yaml"])
def test_prefect_yaml_deployments_load_their_flow_and_config(deployments_file: str) -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / deployments_file).read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert {"nightly", "manual", "on-upload"} <= set(deployments)
    from flows.finetune import resolve_config

    for deployment in deployments.values():
        if deployment["name"] == "store-gc":
            continue  # another flow: see the test below
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "finetune"
        params = deployment["parameters"]
        # The deployment's default parameters make a valid config (file + partial override, as a run would).
        cfg = resolve_config(params.get("config"), str(ROOT / params["config_file"]))
        assert isinstance(cfg, FinetuneConfig)


def test_store_gc_deployment_runs_the_gc_flow_weekly_with_valid_settings() -> None:
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    from loraflow.store_gc import GcPolicy

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "store-gc"]
    flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
    assert flow.name == "store-gc"
    params = deployment["parameters"]
    assert set(params) <= set(inspect.signature(flow.fn).parameters)
    GcPolicy(**{k: v for k, v in params.items() if k not in ("store", "dry_run")})  # valid, or it raises ConfigError
    [schedule] = deployment["schedules"]
    minute, hour, day, month, weekday = schedule["cron"].split()
    assert (day, month) == ("*", "*") and weekday.isdigit()  # once a week
