"""instance_norm_act's layouts: channels_last in, channels_last out; non-contiguous inputs; the layout fuzz of
tests/layouts.py on the CPU kernel (every view kind, forward and gradient, sentinel-guarded)."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_norm_act
from support import instance_norm_act_definition as definition
from support import rel_err

from fastp2phd.ops import instance_norm_act

from .cases import PATHS, tolerance

SEEDS = range(4)
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_stays_channels_last(dtype):
    x = torch.randn(2, 8, 6, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    out = instance_norm_act(x, "leaky_relu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, definition(x, "leaky_relu")) <= tolerance(definition(x, "leaky_relu"), dtype)


@pytest.mark.parametrize("impl", PATHS)
def test_every_path_gives_the_documented_layout(impl):
    """A permuted input of one-value planes: ``.to(dtype, memory_format=...)`` keeps a tensor whose dtype already
    matches as it is, so the reference handed out the input's strides where the fast path gives NCHW."""
    x = torch.randn(17, 3, 1, 1).permute(1, 0, 2, 3)  # strides (1, 3, 1, 1): not NCHW, nor channels_last
    assert instance_norm_act(x, "relu", impl=impl).is_contiguous()


def test_non_contiguous_input():
    x = torch.randn(2, 6, 10, 12)[:, ::2, 1:, ::3]
    assert rel_err(instance_norm_act(x, "relu"), definition(x, "relu")) < 1e-5


@pytest.mark.usefixtures("poisoned_empty")  # new tensors start as NaN: an element a kernel forgets shows
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_cpu_instance_norm_act_on_views(kind, seed):
    check_instance_norm_act("cpu", "cpu", random.Random(f"instance_norm_act {kind} {seed}"), kind, FLOATS)
