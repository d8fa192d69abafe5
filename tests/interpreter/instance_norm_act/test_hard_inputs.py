"""instance_norm_act's Triton kernels on the hard-input suite (tests/hard_inputs.py), in the interpreter."""
from __future__ import annotations

import pytest
from hard_inputs import DTYPES, check_path, parameters


@pytest.mark.parametrize("case, dtype, channels_last, activation, slope", list(parameters(interpreted=True)))
def test_triton_kernels_are_as_accurate_as_the_module_they_replace(case, dtype, channels_last, activation, slope):
    check_path(case, DTYPES[dtype], channels_last, activation, slope, "triton")
