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


@requires_extension
@pytest.mark.parametrize("channels", [2, 3, 16, 64, 70])  # 70: above the interleaved kernel's 64 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpp_channels_last_rows_with_long_runs(channels, dtype, poisoned_empty):
    """Channels-last rows are summed and written as blocks of interleaved channels: runs from 1 pixel to a
    whole row, so the blocks, their tails and single pixels are all met, forward and backward."""
    g = torch.Generator().manual_seed(channels)
    feat = (10 + torch.randn(2, channels, 7, 150, generator=g)).to(dtype)
    feat = feat.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    inst = torch.zeros(2, 1, 7, 150, dtype=torch.int32)
    inst[:, :, 1, 40:] = 1
    inst[:, :, 2, ::2] = 2  # runs of one pixel
    inst[:, :, 3:, 97:] = 3
    out = instance_mean(feat, inst, impl="cpp")
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = loop_oracle(feat.detach().double(), inst)
    bound = 1e-12 if dtype == torch.float64 else 2 * rel_err(expected.to(dtype), expected) + 1e-12
    assert rel_err(out, expected) <= bound
    grad = torch.randn(feat.shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    (feat_grad,) = torch.autograd.grad(out, feat, grad)
    assert rel_err(feat_grad, loop_oracle(grad.double(), inst)) <= bound


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
