"""Layout fuzz of the Triton kernels in the interpreter (see layouts.py): every view kind, forward and
gradient, inputs inside sentinel-filled buffers."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_mean, check_instance_norm_act

SEEDS = range(2)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _poison_new_tensors(poisoned_empty):
    """New tensors start as NaN, so an output element a kernel forgets (or writes elsewhere) shows."""


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_triton_instance_norm_act_on_views(kind, seed):
    check_instance_norm_act("triton", "cpu", random.Random(f"instance_norm_act {kind} {seed}"), kind, FLOATS)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_triton_instance_mean_on_views(kind, seed):
    check_instance_mean("triton", "cpu", random.Random(f"instance_mean {kind} {seed}"), kind, FLOATS)
