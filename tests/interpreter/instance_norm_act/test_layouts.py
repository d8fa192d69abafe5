"""Layout fuzz of the Triton instance_norm_act kernels in the interpreter (see tests/layouts.py): every view kind,
forward and gradient, inputs inside sentinel-filled buffers."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_norm_act


SEEDS = range(2)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.usefixtures("poisoned_empty")  # new tensors start as NaN: an element a kernel forgets shows
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_triton_instance_norm_act_on_views(kind, seed):
    check_instance_norm_act("triton", "cpu", random.Random(f"instance_norm_act {kind} {seed}"), kind, FLOATS)
