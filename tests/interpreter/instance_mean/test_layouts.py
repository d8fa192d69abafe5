"""Triton instance_mean's layouts in the interpreter: channels_last kept, crops; the layout fuzz of tests/layouts.py
(every view kind, forward and gradient, inputs inside sentinel-filled buffers)."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_mean
from support import instance_mean_loop as loop_oracle
from support import rel_err

from fastp2phd.ops import instance_mean

from .cases import random_inputs


SEEDS = range(2)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def test_layouts_are_kept():
    feat, inst = random_inputs(2, 6, 8, 10, 4, seed=3)
    expected = loop_oracle(feat, inst)
    out = instance_mean(feat.contiguous(memory_format=torch.channels_last), inst, impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last) and rel_err(out, expected) < 1e-6
    wide = torch.randn(2, 6, 8, 13)[..., 2:12]  # a crop: copied to contiguous inside
    assert rel_err(instance_mean(wide, inst, impl="triton"), loop_oracle(wide, inst)) < 1e-6


@pytest.mark.usefixtures("poisoned_empty")  # new tensors start as NaN: an element a kernel forgets shows
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_triton_instance_mean_on_views(kind, seed):
    check_instance_mean("triton", "cpu", random.Random(f"instance_mean {kind} {seed}"), kind, FLOATS)
