"""The layout fuzz's own checks (tests/layouts.py): its sentinel guard catches stray writes, and memory_format_of
is PyTorch's rule. Each op's fuzz runs in tests/ops/<op>/test_layouts.py."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, guarded_view

from fastp2phd.ops._common import memory_format_of


@pytest.fixture(autouse=True)
def _poison_new_tensors(poisoned_empty):
    """New tensors start as NaN, so an output element a kernel forgets (or writes elsewhere) shows."""


def test_the_guard_catches_a_write_outside_the_view():
    guarded = guarded_view("channel split", torch.randn(2, 3, 4, 5))
    guarded.check("untouched")
    torch.as_strided(guarded.tensor, (1,), (1,), guarded.tensor.storage_offset() - 1).fill_(0)
    with pytest.raises(AssertionError, match="wrote outside its view"):
        guarded.check("one element before the view")


def test_the_guard_catches_a_write_into_the_input():
    guarded = guarded_view("batch step", torch.randn(2, 3, 4, 5))
    guarded.tensor[1, 2, 3, 4] = 7.0
    with pytest.raises(AssertionError, match="wrote into its input"):
        guarded.check("one element of the view")


def test_memory_format_of_is_pytorchs_rule():
    """memory_format_of names the layout empty_like gives a non-dense tensor (PyTorch's suggest_memory_format)."""
    rng = random.Random(0)
    checked = 0
    for kind in VIEW_KINDS:
        for _ in range(60):
            shape = tuple(rng.randint(1, 4) for _ in range(4))
            view = guarded_view(kind, torch.randn(shape)).tensor
            if view.is_contiguous() or view.is_contiguous(memory_format=torch.channels_last):
                assert memory_format_of(view) == (torch.contiguous_format if view.is_contiguous() else torch.channels_last)
                continue
            if torch.empty_like(view).stride() == view.stride():  # dense: empty_like keeps its strides
                continue
            expected = torch.empty_like(view).stride()
            assert torch.empty(shape, memory_format=memory_format_of(view)).stride() == expected, (kind, view.stride())
            checked += 1
    assert checked > 200
