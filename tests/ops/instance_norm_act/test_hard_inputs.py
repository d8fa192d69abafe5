"""instance_norm_act's reference, its PyTorch kernels (what runs without the extension and Triton), CPU kernel and
(where there is a GPU) Triton kernels on the hard-input suite (tests/hard_inputs.py)."""
from __future__ import annotations

import pytest
from hard_inputs import (DTYPES, EPS_0_SIZES, TIE_SHAPES, check_eps_0, check_huge_bfloat16, check_path, check_ties,
                         parameters)
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



@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", TIE_SHAPES.values(), ids=TIE_SHAPES.keys())
def test_pixels_at_their_planes_mean_take_pytorchs_branch_of_the_activation(shape, dtype, channels_last, impl):
    check_ties(shape, dtype, channels_last, impl, device="cuda" if impl == "cuda" else "cpu")


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_values_whose_squares_pass_float32s_range(impl):
    check_huge_bfloat16(impl, device="cuda" if impl == "cuda" else "cpu")


@requires_extension
def test_float64_pixels_at_a_mean_with_a_full_mantissa_normalise_to_exactly_0():
    """Planes whose exact mean is a float64 value of 52 bits, which three pixels hold: the CPU kernel's mean is rounded
    once (a compensated sum, then / P, rounded twice: 1 ulp off in 1 of 4 random planes, and xhat +tiny there). (Not
    so F.instance_norm, which the reference runs: its mean errs by an ulp or two.)"""
    from fastp2phd.ops import instance_norm_act

    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        mean = 1 + 0.25 * torch.rand(1, generator=g, dtype=torch.float64).item()
        offsets = torch.randint(1, 3, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).double() * 0.25
        x = torch.cat([mean + offsets, mean - offsets, torch.full((3,), mean, dtype=torch.float64)])
        x = x[torch.randperm(x.numel(), generator=g)].view(1, 1, 1, -1)
        y = instance_norm_act(x, "none", impl="cpu")
        assert torch.equal(y[x == mean], torch.zeros(3, dtype=torch.float64)), seed
