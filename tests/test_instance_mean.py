"""instance_mean: C++ fast path and reference vs a plain-loop oracle, gradients, registration, bad input."""
from __future__ import annotations

import pytest
import torch
from support import cityscapes_like, rel_err, requires_extension
from support import instance_mean_loop as loop_oracle

from fastp2phd.nn import InstanceMeanPool
from fastp2phd.ops import instance_mean, instance_mean_reference
from fastp2phd.ops.instance_mean import segment_index

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


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_empty_inputs_give_empty_outputs_that_backward_flows_through(impl, shape, layout):
    # PyTorch's own modules keep empty batches in the graph; before, the op returned a tensor outside it.
    feat = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    inst = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int64)
    for module in (lambda f: instance_mean(f, inst, impl=impl), lambda f: InstanceMeanPool(impl)(f, inst)):
        out = module(feat)
        assert out.shape == shape and out.dtype == feat.dtype and out.requires_grad
        assert out.is_contiguous(memory_format=layout)
        out.sum().backward()
        assert feat.grad.shape == shape
        feat.grad = None


@pytest.mark.parametrize("impl", IMPLS)
def test_a_large_segment_is_accurate_in_float32(impl):
    # One million values in [0.9, 1]: float32 sums (the reference before) were off by 1.7e-3.
    feat = 0.9 + 0.1 * torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(15))
    inst = torch.zeros(1, 1, 1024, 1024, dtype=torch.int64)
    exact = feat.double().mean()
    assert rel_err(instance_mean(feat, inst, impl=impl), exact.expand(feat.shape)) < 1e-6


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.uint8, torch.float32])
def test_vmap_with_batched_ids(impl, id_dtype):
    # Before, the reference's torch.unique could not be vmapped ("vmap over aten::_unique2").
    g = torch.Generator().manual_seed(16)
    feat = torch.randn(3, 2, 2, 5, 7, generator=g, dtype=torch.float64)
    inst = (torch.randint(0, 4, (3, 2, 1, 5, 7), generator=g) * 60).to(id_dtype)
    out = torch.func.vmap(lambda f, i: instance_mean(f, i, impl=impl))(feat, inst)
    assert rel_err(out, torch.stack([loop_oracle(f, i) for f, i in zip(feat, inst)])) < 1e-12
    shared_feat = torch.func.vmap(lambda i: instance_mean(feat[0], i, impl=impl))(inst)  # only the ids batched
    assert rel_err(shared_feat, torch.stack([loop_oracle(feat[0], i) for i in inst])) < 1e-12


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_vmap_refuses_bad_float_ids_in_any_item(impl):
    inst = torch.zeros(3, 1, 1, 4, 4)
    inst[2, 0, 0, 1, 1] = 0.5
    with pytest.raises(ValueError, match="not whole numbers"):
        torch.func.vmap(lambda f, i: instance_mean(f, i, impl=impl))(torch.zeros(3, 1, 2, 4, 4), inst)


def test_segment_index_numbers_ids_in_order_within_each_item():
    inst = torch.tensor([[[[26001, 7], [7, -3]]], [[[5, 5], [5, 5]]]])
    assert segment_index(inst).tolist() == [[2, 1, 1, 0], [0, 0, 0, 0]]
    assert segment_index(torch.zeros(2, 1, 0, 3, dtype=torch.int64)).shape == (2, 0)


def test_reference_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    feat, inst = make_inputs(2, 3, 8, 12, seed=17)
    compiled = torch.compile(lambda f, i: instance_mean(f, i, impl="reference"), fullgraph=True)
    assert rel_err(compiled(feat, inst), loop_oracle(feat, inst)) < 1e-6


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
        *[(torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), value, dtype=dtype), ValueError, "NaN, inf")
          for dtype in (torch.float16, torch.bfloat16) for value in (float("-inf"), float("inf"), float("nan"))],
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, device="meta"), ValueError, "one device"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", *IMPLS])
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
