"""One training in two processes (train.num_devices: 2), on a CPU with the gloo backend: the launcher path that
runs one rank per GPU on a GPU host, launched by accelerate exactly as there.

The same spec in 1 process and in 2 ranks trains on the same examples per optimizer step (the effective batch is
the config's), so the losses match; rank 0 alone writes to the store; a 2-rank run stopped after a checkpoint
resumes on the next attempt and continues the loss curve; a rank that dies fails the step instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from loraflow.backends import attach_lora, load_model
from loraflow.checkpoints import stored_checkpoints
from loraflow.config import FinetuneConfig, load_config, parse_assignment
from loraflow.data import read_dataset
from loraflow.launcher import launch_training
from loraflow.prompts import Prompts, format_prompts, load_tokenizer
from loraflow.store import LocalStore
from loraflow.training import TrainSpec, plan_training, train_adapter
from tests.conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow

STEPS = 9  # checkpoints at 3, 6 and 9


def tiny(store: Path, *assignments: str) -> FinetuneConfig:
    return load_config(TINY_CONFIG, [parse_assignment(a) for a in (
        f"train.max_steps={STEPS}", "train.save_steps=3", f"output.store={store}", *assignments)])


@pytest.fixture(scope="module")
def prompts() -> Prompts:
    cfg = tiny(Path("unused"))
    return format_prompts(read_dataset(cfg.data.uri), None, cfg.prompt, cfg.data, cfg.infer,
                          load_tokenizer(cfg.model.name, None))


def spec_for(cfg: FinetuneConfig, prompts: Prompts, world_size: int) -> TrainSpec:
    spec = plan_training(cfg, "transformers", read_dataset(cfg.data.uri), None, prompts)
    return spec.model_copy(update={"world_size": world_size})


@pytest.fixture(scope="module")
def runs(prompts: Prompts, tmp_path_factory: pytest.TempPathFactory) -> dict:
    one_store, two_store = tmp_path_factory.mktemp("one-rank"), tmp_path_factory.mktemp("two-ranks")
    cfg = tiny(one_store)
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    one = train_adapter(live, prompts, spec_for(cfg, prompts, 1))
    two_spec = spec_for(tiny(two_store), prompts, 2)
    two = launch_training(two_spec, prompts)
    return {"one": one, "two": two, "two_spec": two_spec, "two_store": two_store}


def test_both_ranks_trained_their_share_of_every_step(runs: dict) -> None:
    one, two = runs["one"].metrics, runs["two"].metrics
    assert two.world_size == 2 and two.steps == one.steps == STEPS
    assert two.layout == "4 examples × 1 micro-batches × 2 rank(s)"  # 8 × 1 configured = 4 on each of 2 ranks
    # every step saw the same examples: the tokens both ranks counted add up to the single process's
    assert two.step_tokens == one.step_tokens


def test_the_losses_match_the_single_process_run(runs: dict) -> None:
    one, two = runs["one"].metrics.losses, runs["two"].metrics.losses
    assert [step for step, _ in two] == [step for step, _ in one] == list(range(1, STEPS + 1))
    for (_, alone), (_, shared) in zip(one, two):
        assert shared == pytest.approx(alone, rel=2e-3)  # float sums in another order, nothing else
    assert two[-1][1] < two[0][1]


def test_only_rank_zero_wrote_to_the_store(runs: dict) -> None:
    store = LocalStore(runs["two_store"])
    spec = runs["two_spec"]
    assert store.has(spec.adapter_key) and runs["two"].key == spec.adapter_key
    checkpoints = stored_checkpoints(store, spec.checkpoints_prefix)
    assert [c.step for c in checkpoints] == [9, 6]  # save_total_limit 2
    assert len({c.key.rsplit("-", 1)[-1] for c in checkpoints}) == 1  # one writer: one attempt id


def rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if "loraflow.training" in " ".join(p.cmdline())]


def start_ranks(spec: TrainSpec, prompts: Prompts, work: Path) -> subprocess.Popen:
    """The launcher as the train step starts it, in a session of its own so a test can signal its group."""
    from loraflow.prompts import store_prompts

    store_prompts(LocalStore(spec.store_uri), prompts)
    (work / "spec.json").write_text(spec.model_dump_json())
    from loraflow.launcher import launch_command

    return subprocess.Popen(launch_command(work / "spec.json", work, spec.world_size), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_stopped_two_rank_run_resumes_and_continues_the_losses(runs: dict, prompts: Prompts, tmp_path: Path) -> None:
    spec = spec_for(tiny(tmp_path / "store"), prompts, 2)
    store = LocalStore(tmp_path / "store")
    launcher = start_ranks(spec, prompts, tmp_path)
    wait_for(lambda: stored_checkpoints(store, spec.checkpoints_prefix), 300, "the first checkpoint")
    ranks = rank_processes(psutil.Process(launcher.pid))
    assert len(ranks) == 2
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher dies at once, as with a crashed worker
    launcher.wait(timeout=30)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "a rank outlived its launcher"  # they run in sessions of their own: the kernel ends them
    assert not store.has(spec.adapter_key)
    resumed = launch_training(spec, prompts).metrics
    assert resumed.resumed_from_step >= 3
    assert [step for step, _ in resumed.losses] == list(range(1, STEPS + 1)), (resumed.losses, resumed.resumed_from_step)
    for (_, before), (_, again) in zip(runs["two"].metrics.losses, resumed.losses):
        assert again == pytest.approx(before, rel=2e-3)


def test_a_rank_that_dies_fails_the_step_without_hanging(prompts: Prompts, tmp_path: Path) -> None:
    spec = spec_for(tiny(tmp_path / "store", "train.max_steps=200"), prompts, 2)
    launcher = start_ranks(spec, prompts, tmp_path)
    parent = psutil.Process(launcher.pid)
    wait_for(lambda: len(rank_processes(parent)) == 2, 120, "two ranks")
    victim = rank_processes(parent)[1]
    wait_for(lambda: victim.cpu_times().user > 5, 180, "the rank to be training")
    victim.kill()
    started = time.monotonic()
    code = launcher.wait(timeout=120)
    assert code != 0 and time.monotonic() - started < 60  # the launcher ended the other rank; nobody waited on it
    assert not rank_processes(parent) if parent.is_running() else True
    from loraflow.launcher import TrainingRankError, rank_failure

    assert isinstance(rank_failure(tmp_path, code), TrainingRankError)


def test_cancelling_a_two_rank_run_stops_every_rank(prompts: Prompts, tmp_path: Path) -> None:
    """What a cancel sends: SIGTERM to the run's process group, which holds the launcher the train step started.
    The ranks run in sessions of their own (torch elastic starts them so), so the signal reaches the launcher,
    which ends them; none is left 30 s later."""
    spec = spec_for(tiny(tmp_path / "store", "train.max_steps=400"), prompts, 2)
    launcher = start_ranks(spec, prompts, tmp_path)
    parent = psutil.Process(launcher.pid)
    wait_for(lambda: len(rank_processes(parent)) == 2, 300, "two ranks")
    ranks = rank_processes(parent)
    wait_for(lambda: all(rank.cpu_times().user > 5 for rank in ranks), 300, "the ranks to be training")
    stopped_at = time.monotonic()
    os.killpg(launcher.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, "a rank outlived the cancelled run by 30 s"
    assert launcher.wait(timeout=60) != 0  # the launcher says the training did not finish
    assert time.monotonic() - stopped_at < 60
    assert not LocalStore(tmp_path / "store").has(spec.adapter_key)
