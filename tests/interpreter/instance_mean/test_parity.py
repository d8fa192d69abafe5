"""Triton instance_mean against the plain-loop definition, in the interpreter: segment shapes, id types, dtypes,
and the backward (the projection of the gradient)."""
from __future__ import annotations

import pytest
import torch
from support import instance_mean_loop as loop_oracle
from support import check_instance_mean_is_the_float64_mean_rounded_once, rel_err

from fastp2phd.ops import instance_mean

from .cases import CASES, random_inputs


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_loop_oracle(case, poisoned_empty):
    feat, inst = case
    out = instance_mean(feat, inst, impl="triton")
    assert out.shape == feat.shape and out.dtype == feat.dtype
    assert rel_err(out, loop_oracle(feat, inst)) < 1e-6


def test_same_ids_in_different_batch_items_stay_apart():
    feat = torch.stack([torch.full((2, 5, 5), 1.0), torch.full((2, 5, 5), 7.0)])
    inst = torch.full((2, 1, 5, 5), 26001)
    assert torch.equal(instance_mean(feat, inst, impl="triton"), feat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    feat, inst = random_inputs(2, 3, 10, 12, 5, dtype=dtype, seed=2)
    expected = loop_oracle(feat, inst)
    bound = 1e-12 if dtype == torch.float64 else 2 * rel_err(expected.to(dtype), expected) + 1e-12
    assert rel_err(instance_mean(feat, inst, impl="triton"), expected) <= bound


def test_backward_is_the_projection_of_the_gradient():
    feat, inst = random_inputs(2, 3, 9, 11, 4, seed=4)
    grad = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    feat.requires_grad_(True)
    instance_mean(feat, inst, impl="triton").backward(grad)
    assert rel_err(feat.grad, loop_oracle(grad, inst)) < 1e-6
    f64 = feat.detach().double().requires_grad_(True)
    # fast_mode checks random directional derivatives: a few calls instead of one per input element.
    assert torch.autograd.gradcheck(lambda f: instance_mean(f, inst, impl="triton"), (f64,), fast_mode=True)


HARD_PLANES = {
    "constant": lambda g: torch.full((1, 2, 4, 2048), 0.3),
    "large mean, small spread": lambda g: 1e3 + 1e-2 * torch.rand(1, 2, 4, 2048, generator=g),
    "label-like": lambda g: (torch.rand(1, 2, 4, 2048, generator=g) < 0.05).double() * 0.5,
    "near the largest float32": lambda g: 2e38 * (0.5 + torch.rand(1, 1, 4, 2048, generator=g)),
}


@pytest.mark.parametrize("case", HARD_PLANES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_hard_planes_in_every_dtype_are_the_float64_mean_rounded_once(case, dtype):
    """Runs are scanned in float64 too: in float32 a tile of values near 1e3 erred by 65 ulps, and 2e38 overflowed."""
    feat = HARD_PLANES[case](torch.Generator().manual_seed(17))
    if dtype == torch.float16 and case == "near the largest float32":
        feat = feat / 1e34  # (float16's range)
    check_instance_mean_is_the_float64_mean_rounded_once(feat.to(dtype), "triton", split_row=2)
