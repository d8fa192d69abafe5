"""instance_norm_act's Triton kernels on the hard-input suite (tests/hard_inputs.py), in the interpreter."""
from __future__ import annotations

import pytest
from hard_inputs import DTYPES, EPS_0_SIZES, check_eps_0, check_path, parameters


@pytest.mark.parametrize("case, dtype, channels_last, activation, slope", list(parameters(interpreted=True)))
def test_triton_kernels_are_as_accurate_as_the_module_they_replace(case, dtype, channels_last, activation, slope):
    check_path(case, DTYPES[dtype], channels_last, activation, slope, "triton")


@pytest.mark.parametrize("activation", ["none", "leaky_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", EPS_0_SIZES)
def test_eps_0_on_a_constant_plane_gives_0_as_pytorch_does(size, dtype, activation):
    check_eps_0(size, DTYPES[dtype], activation, "triton")
