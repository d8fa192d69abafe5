"""instance_mean: C++ fast path and reference vs a plain-loop oracle, gradients, registration, bad input."""
from __future__ import annotations

import pytest
import torch
from support import cityscapes_like, rel_err, requires_extension
from support import instance_mean_loop as loop_oracle

from fastp2phd.ops import instance_mean, instance_mean_reference

IMPLS = ["reference", pytest.param("cpp", marks=requires_extension)]
# (dtype, tolerance of the result against the float64 oracle)
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, None), (torch.bfloat16, None)]


def make_inputs(n, c, h, w, num_ids=5, dtype=torch.float32, id_dtype=torch.int64, seed=0, offset=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, c, h, w, generator=g).to(dtype)
    inst = (torch.randint(0, num_ids, (n, 1, h, w), generator=g) + offset).to(id_dtype)
    return feat, inst


def low_precision_bound(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice PyTorch's own error for this dtype: rounding the exact result to it."""
    return 2 * rel_err(oracle.to(dtype), oracle) + 1e-12


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


def test_reference_keeps_channels_last():
    feat, inst = make_inputs(2, 3, 5, 6, seed=7)
    assert instance_mean(feat.contiguous(memory_format=torch.channels_last), inst, impl="reference").is_contiguous(
        memory_format=torch.channels_last
    )


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
def test_gradcheck(impl):
    feat, inst = make_inputs(2, 2, 5, 4, num_ids=3, dtype=torch.float64, seed=9)
    feat.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: instance_mean(f, inst, impl=impl), (feat,))
    assert torch.autograd.gradgradcheck(lambda f: instance_mean(f, inst, impl=impl), (feat,))


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


@requires_extension
def test_opcheck():
    feat, inst = make_inputs(2, 3, 6, 7, seed=12)
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.requires_grad_(True), inst))
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.detach().double(), inst.int()))


@requires_extension
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    feat, inst = make_inputs(2, 3, 8, 12, seed=13)

    def step(f, i):
        return (instance_mean(f, i) * f).sum()

    compiled = torch.compile(step, fullgraph=True)
    f1 = feat.clone().requires_grad_(True)
    f2 = feat.clone().requires_grad_(True)
    compiled(f1, inst).backward()
    step(f2, inst).backward()
    assert rel_err(f1.grad, f2.grad) < 1e-6


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_empty_batch_returns_empty(impl):
    out = instance_mean(torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4, dtype=torch.int64), impl=impl)
    assert out.shape == (0, 3, 4, 4)


@pytest.mark.parametrize(
    "feat, inst, error, message",
    [
        (torch.zeros(3, 4, 4), torch.zeros(1, 1, 4, 4), ValueError, "feat must be an \\(N, C, H, W\\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 1, 4, 4), TypeError, "floating point"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), ValueError, "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5), ValueError, "share batch size, height and width"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(1, 1, 4, 4), ValueError, "share batch size"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), 1.5), ValueError, "not whole numbers"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), 1e20), ValueError, "within int64.s range"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), float("-inf")), ValueError, "NaN, inf"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, device="meta"), ValueError, "one device"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_bad_input(feat, inst, error, message, impl):
    with pytest.raises(error, match=message):
        instance_mean(feat, inst, impl=impl)


def test_the_operator_on_cpu_with_autograd_and_compile():
    """One operator for every device: on the CPU its kernel is C++ (or the reference without the extension)."""
    feat, inst = make_inputs(2, 3, 6, 7, seed=14)
    feat.requires_grad_(True)
    out = torch.ops.fastp2phd.instance_mean(feat, inst)
    assert rel_err(out, loop_oracle(feat.detach(), inst)) < 1e-6
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, i: torch.ops.fastp2phd.instance_mean(f, i).sum(), fullgraph=True)
    compiled(feat, inst).backward()
    assert rel_err(feat.grad, loop_oracle(torch.ones_like(feat), inst)) < 1e-6
    assert not hasattr(torch.ops.fastp2phd, "instance_mean_triton")
