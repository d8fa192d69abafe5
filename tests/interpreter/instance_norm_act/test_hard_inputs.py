"""instance_norm_act's Triton kernels on the hard-input suite (tests/hard_inputs.py), in the interpreter."""
from __future__ import annotations

import pytest
import torch
from hard_inputs import (DTYPES, EPS_0_SIZES, TIE_SHAPES, check_eps_0, check_huge_bfloat16, check_path, check_ties,
                         parameters)


@pytest.mark.parametrize("case, dtype, channels_last, activation, slope", list(parameters(interpreted=True)))
def test_triton_kernels_are_as_accurate_as_the_module_they_replace(case, dtype, channels_last, activation, slope):
    check_path(case, DTYPES[dtype], channels_last, activation, slope, "triton")


@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", EPS_0_SIZES)
def test_eps_0_on_a_constant_plane_gives_0_as_pytorch_does(size, dtype, activation):
    check_eps_0(size, DTYPES[dtype], activation, "triton")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", TIE_SHAPES.values(), ids=TIE_SHAPES.keys())
def test_pixels_at_their_planes_mean_take_pytorchs_branch_of_the_activation(shape, dtype, channels_last):
    check_ties(shape, dtype, channels_last, "triton")


def test_bfloat16_values_whose_squares_pass_float32s_range():
    check_huge_bfloat16("triton")
