"""boundary_map's layouts: non-contiguous and channels_last ids; the layout fuzz of tests/layouts.py on the C++
path (every view kind, sentinel-guarded)."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_boundary_map
from support import requires_extension

from fastp2phd.ops import boundary_map

from .cases import random_ids

SEEDS = range(4)


@requires_extension
def test_cpp_non_contiguous_and_channels_last_inputs():
    base = random_ids((2, 1, 40, 50), torch.int32, num_ids=3, seed=4)
    strided = base[:, :, ::2, 1::3]
    transposed = base.transpose(2, 3)
    channels_last = base.contiguous(memory_format=torch.channels_last)
    for inst in (strided, transposed, channels_last):
        assert torch.equal(boundary_map(inst, impl="cpp"), boundary_map(inst.contiguous(), impl="reference"))


@pytest.mark.usefixtures("poisoned_empty")  # new tensors start as NaN: an element a kernel forgets shows
@requires_extension
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_cpp_boundary_map_on_views(kind, seed):
    check_boundary_map("cpp", "cpu", random.Random(f"boundary_map {kind} {seed}"), kind)
