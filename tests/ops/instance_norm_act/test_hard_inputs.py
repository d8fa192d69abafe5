"""instance_norm_act's reference, its PyTorch kernels (what runs without the extension and Triton), CPU kernel and
(where there is a GPU) Triton kernels on the hard-input suite (tests/hard_inputs.py)."""
from __future__ import annotations

import pytest
from hard_inputs import DTYPES, EPS_0_SIZES, check_eps_0, check_path, parameters
import torch
from support import requires_extension

IMPLS = ["reference", "python kernels", pytest.param("cpu", marks=requires_extension),
         pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, dtype, channels_last, activation, slope", list(parameters()))
def test_instance_norm_act_is_as_accurate_as_the_module_it_replaces(case, dtype, channels_last, activation, slope,
                                                                      impl):
    check_path(case, DTYPES[dtype], channels_last, activation, slope, impl, device="cuda" if impl == "cuda" else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", EPS_0_SIZES)
def test_eps_0_on_a_constant_plane_gives_0_as_pytorch_does(size, dtype, activation, impl):
    check_eps_0(size, DTYPES[dtype], activation, impl, device="cuda" if impl == "cuda" else "cpu")
