"""instance_mean's layouts: channels_last kept, strided and broadcast inputs; the layout fuzz of tests/layouts.py
on the C++ path (every view kind, forward and gradient, sentinel-guarded)."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_mean
from support import instance_mean_loop as loop_oracle
from support import rel_err, requires_extension

from fastp2phd.ops import instance_mean

from .cases import make_inputs

SEEDS = range(4)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@requires_extension
def test_cpp_layouts_keep_format(poisoned_empty):
    feat, inst = make_inputs(2, 6, 14, 18, seed=6)
    expected = loop_oracle(feat, inst)
    channels_last = feat.contiguous(memory_format=torch.channels_last)
    out = instance_mean(channels_last, inst, impl="cpp")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) < 1e-6
    wide = torch.randn(2, 12, 14, 36)
    strided = wide[:, ::2, :, ::2]  # non-contiguous channels and columns
    strided_inst = inst.expand(2, 1, 14, 18)
    assert rel_err(instance_mean(strided, strided_inst, impl="cpp"), loop_oracle(strided, strided_inst)) < 1e-6
    broadcast = torch.randn(1, 1, 1, 1).expand(2, 6, 14, 18)  # stride-0, like a gradient of .sum()
    assert rel_err(instance_mean(broadcast, inst, impl="cpp"), broadcast) < 1e-6


def test_reference_keeps_channels_last():
    feat, inst = make_inputs(2, 3, 5, 6, seed=7)
    assert instance_mean(feat.contiguous(memory_format=torch.channels_last), inst, impl="reference").is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.usefixtures("poisoned_empty")  # new tensors start as NaN: an element a kernel forgets shows
@requires_extension
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_cpp_instance_mean_on_views(kind, seed):
    check_instance_mean("cpp", "cpu", random.Random(f"instance_mean {kind} {seed}"), kind, FLOATS)
