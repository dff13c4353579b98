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
    node = Node()
    later = weakref.ref(node)  # alive at train() but after that freeze
    with objects_alive_now_left_out_of_gc():
        assert gc.get_freeze_count() > 0
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
