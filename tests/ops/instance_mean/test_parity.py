"""instance_mean's parity: the C++ fast path and the reference against a plain-loop oracle, every dtype, id type
and shape, forward and backward, Cityscapes maps at full resolution, the same result on any thread count.
(The Triton path: tests/interpreter/instance_mean/ and test_cuda.py.)"""
from __future__ import annotations

import pytest
import torch
from support import (check_instance_mean_is_the_float64_mean_rounded_once, cityscapes_like, rel_err,
                     requires_extension)
from support import instance_mean_loop as loop_oracle

from fastp2phd.ops import instance_mean, instance_mean_reference

from .cases import IMPLS, low_precision_bound, make_inputs


# (dtype, tolerance of the result against the float64 oracle)
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, None), (torch.bfloat16, None)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 17), (2, 3, 13, 1), (3, 5, 9, 11), (2, 1, 32, 48)])
def test_matches_loop_oracle(impl, dtype, tol, shape, poisoned_empty):
    feat, inst = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    expected = loop_oracle(feat, inst)
    out = instance_mean(feat, inst, impl=impl)
    assert out.dtype == dtype and out.shape == feat.shape
    bound = tol if tol is not None else low_precision_bound(expected, dtype)
    assert rel_err(out, expected) <= bound


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64])
def test_id_dtypes(impl, id_dtype):
    feat, inst = make_inputs(2, 3, 10, 12, num_ids=7, id_dtype=id_dtype, seed=1)
    assert rel_err(instance_mean(feat, inst, impl=impl), loop_oracle(feat, inst)) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [26000, -3, 2**40, -(2**62)])
def test_sparse_and_extreme_ids(impl, offset):
    feat, inst = make_inputs(2, 3, 11, 9, num_ids=6, seed=2, offset=offset)
    assert rel_err(instance_mean(feat, inst, impl=impl), loop_oracle(feat, inst)) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_segments_are_per_batch_item(impl):
    # The same id in two batch items is two segments with different means.
    feat = torch.stack([torch.full((2, 4, 4), 1.0), torch.full((2, 4, 4), 5.0)])
    inst = torch.full((2, 1, 4, 4), 26001)
    out = instance_mean(feat, inst, impl=impl)
    assert torch.equal(out, feat)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_instance_one_pixel_instances_and_hundreds_of_instances(impl):
    feat, _ = make_inputs(2, 4, 30, 40, dtype=torch.float64, seed=3)
    single = torch.full((2, 1, 30, 40), 7)
    assert rel_err(instance_mean(feat, single, impl=impl), feat.mean((2, 3), keepdim=True).expand_as(feat)) < 1e-12
    every_pixel = torch.arange(2 * 30 * 40).view(2, 1, 30, 40)  # each pixel its own instance: identity
    assert torch.equal(instance_mean(feat, every_pixel, impl=impl), feat)
    g = torch.Generator().manual_seed(4)
    hundreds = torch.randint(0, 400, (2, 1, 30, 40), generator=g) * 1000 + 26000
    assert rel_err(instance_mean(feat, hundreds, impl=impl), loop_oracle(feat, hundreds)) < 1e-12


@requires_extension
def test_cpp_matches_reference_on_cityscapes_maps_at_full_resolution():
    inst = cityscapes_like(1, 1024, 2048, seed=5)
    feat = torch.randn(1, 3, 1024, 2048, generator=torch.Generator().manual_seed(5))
    out = instance_mean(feat, inst, impl="cpp")
    ref = instance_mean_reference(feat.double(), inst)
    assert rel_err(out, ref) < 1e-6


@requires_extension
def test_cpp_independent_of_thread_count():
    inst = cityscapes_like(2, 96, 160, seed=8)
    feat = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = instance_mean(feat, inst, impl="cpp")
    finally:
        torch.set_num_threads(threads)
    assert rel_err(single, instance_mean(feat, inst, impl="cpp")) < 1e-7


@pytest.mark.parametrize("impl", IMPLS)
def test_a_large_segment_is_accurate_in_float32(impl):
    # One million values in [0.9, 1]: float32 sums (the reference before) were off by 1.7e-3.
    feat = 0.9 + 0.1 * torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(15))
    inst = torch.zeros(1, 1, 1024, 1024, dtype=torch.int64)
    exact = feat.double().mean()
    assert rel_err(instance_mean(feat, inst, impl=impl), exact.expand(feat.shape)) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_segments_far_from_zero_are_the_float64_mean_rounded_once(impl):
    """Rows of 1e4 + noise in two segments: float64 sums give the exact mean rounded to float32 once. (Sums of
    runs in float32, as the C++ kernel did before, were off by hundreds of ulps.)"""
    g = torch.Generator().manual_seed(16)
    feat = 1e4 + torch.rand(1, 2, 256, 2048, generator=g)
    inst = torch.zeros(1, 1, 256, 2048, dtype=torch.int32)
    inst[..., 100:, 300:] = 7
    expected = instance_mean(feat.double(), inst, impl="reference").float()
    assert torch.equal(instance_mean(feat, inst, impl=impl), expected)


HARD_PLANES = {
    "constant": lambda g: torch.full((1, 2, 64, 2048), 0.3),
    "large mean, small spread": lambda g: 1e3 + 1e-2 * torch.rand(1, 2, 64, 2048, generator=g),
    "label-like": lambda g: (torch.rand(1, 2, 64, 2048, generator=g) < 0.05).double() * 0.5,
    "huge plane": lambda g: torch.randn(1, 1, 2048, 2048, generator=g),
}


@requires_extension
@pytest.mark.parametrize("case", HARD_PLANES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cpp_hard_planes_in_every_dtype(case, dtype):
    """Sums in float64 on every dtype: the result is the float64 mean rounded once to the dtype."""
    feat = HARD_PLANES[case](torch.Generator().manual_seed(17)).to(dtype)
    check_instance_mean_is_the_float64_mean_rounded_once(feat, "cpp", split_row=20)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_backward_matches_reference(dtype):
    feat, inst = make_inputs(2, 3, 17, 23, num_ids=6, dtype=dtype, seed=10)
    grad = torch.randn(2, 3, 17, 23, generator=torch.Generator().manual_seed(11)).to(dtype)
    grads = []
    for impl in ("cpp", "reference"):
        f = feat.clone().requires_grad_(True)
        instance_mean(f, inst, impl=impl).backward(grad)
        grads.append(f.grad)
    expected = loop_oracle(grad, inst)  # the backward is the same projection of the gradient
    bound = 1e-6 if dtype == torch.float32 else low_precision_bound(expected, dtype)
    assert rel_err(grads[0], expected) <= bound
    assert rel_err(grads[1], expected) <= bound
