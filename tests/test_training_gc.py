"""train()'s heap freeze (loraflow.training.objects_alive_now_left_out_of_gc): Python's collector leaves what was
alive before training alone, still collects what training creates, and gives everything back afterwards, also when
something had frozen objects before (as Unsloth's stack has by the time training starts)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from loraflow.training import objects_alive_now_left_out_of_gc


class Node:
    """A reference cycle: reference counting never frees it, only the cyclic collector does."""

    def __init__(self) -> None:
        self.me = self


def cycle() -> weakref.ref:
    """A weak reference to a new Node, which nothing else holds: alive until a collection reaches its cycle."""
    return weakref.ref(Node())  # the Node lives on in its cycle until a collection reaches it


@pytest.fixture(autouse=True)
def nothing_frozen() -> Iterator[None]:
    gc.unfreeze()
    gc.collect()
    yield
    gc.unfreeze()


def test_what_lived_before_is_skipped_what_training_makes_is_collected_and_all_is_given_back() -> None:
    node = Node()
    before = weakref.ref(node)
    with objects_alive_now_left_out_of_gc():
        del node  # garbage now, but frozen: a full collection does not reach it
        during = cycle()
        gc.collect()
        assert before() is not None
        assert during() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before() is None


def test_an_earlier_freeze_of_a_few_objects_does_not_stop_the_freeze() -> None:
    gc.freeze()  # someone froze what existed then (Unsloth's stack: 375 objects before training)
    earlier = gc.get_freeze_count()
    node = Node()
    later = weakref.ref(node)  # alive at train() but after that freeze
    with objects_alive_now_left_out_of_gc():
        assert gc.get_freeze_count() > earlier
        del node
        gc.collect()
        assert later() is not None  # frozen by train(), not walked
    assert gc.get_freeze_count() == 0  # Python cannot unfreeze part: the earlier freeze ends too
    gc.collect()
    assert later() is None


def test_the_heap_is_given_back_when_training_raises() -> None:
    with pytest.raises(RuntimeError, match="out of memory"):
        with objects_alive_now_left_out_of_gc():
            raise RuntimeError("CUDA out of memory")
    assert gc.get_freeze_count() == 0


@pytest.mark.slow
def test_the_optimizers_moments_are_freed_when_training_returns(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a collection, though the trainer lives on in a reference cycle (as Unsloth's patched trainer does):
    the next training's freeze would otherwise keep them (one optimizer's state more per training in one process)."""
    import loraflow.training as train_module
    from loraflow.backends import attach_lora, load_model
    from loraflow.config import load_config, parse_assignment
    from loraflow.data import read_dataset
    from loraflow.prompts import format_prompts, load_tokenizer
    from tests.conftest import TINY_CONFIG
    from transformers import TrainerCallback

    cfg = load_config(TINY_CONFIG, [parse_assignment("train.max_steps=2")])
    prompts = format_prompts(read_dataset(cfg.data.uri), None, cfg.prompt, cfg.data, cfg.infer,
                             load_tokenizer(cfg.model.name, None))
    live = attach_lora(load_model(cfg.model, "transformers"), cfg.lora, cfg.model.max_seq_length, cfg.train.seed)
    moments: list[weakref.ref] = []

    class KeepAnEye(TrainerCallback):
        def on_train_end(self, args, state, control, optimizer=None, **kwargs) -> None:  # noqa: ANN001
            moments.extend(weakref.ref(t) for s in optimizer.state.values() for t in s.values() if t.dim() > 0)

    build = train_module.build_trainer

    def build_watched(*args, **kwargs):  # noqa: ANN002, ANN003
        trainer = build(*args, **kwargs)
        trainer.add_callback(KeepAnEye())
        trainer.itself = trainer  # a cycle: reference counting alone never frees this trainer
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", build_watched)
    spec = train_module.TrainSpec(model=cfg.model, lora=cfg.lora, train=cfg.train, backend="transformers",
                                  store_uri=str(tmp_path), prompts_key="prompts/unused.json", adapter_key="adapters/k")
    gc.disable()  # only reference counting may free them
    try:
        assert train_module.train_adapter(live, prompts, spec).metrics.steps == 2
        assert moments, "the optimizer kept no state to watch"
        assert all(ref() is None for ref in moments)
    finally:
        gc.enable()

