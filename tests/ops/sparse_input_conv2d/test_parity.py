"""sparse_input_conv2d equals F.conv2d (stride 1, no padding): on label-like inputs in every layout, on inputs
that leave the sparse path (dense, non-finite weights, 16-bit), under autograd, forward AD and autocast, and
it is at least as accurate against float64."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from fastp2phd import ops
from fastp2phd.errors import InvalidArgumentError
from tests.support import requires_extension

pytestmark = requires_extension


def label_like(n, c, h, w, *, extra=0, seed=0, dtype=torch.float64):
    """A one-hot map of blocky labels over c - 1 channels, a boundary-like last channel, and ``extra`` more
    nonzero values at a few pixels (beyond the two the kernel keeps beside each pixel's mask)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c - 1, (n, 1, (h + 3) // 4, (w + 3) // 4), generator=g)
    labels = labels.repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :h, :w]
    x = torch.zeros(n, c, h, w, dtype=dtype).scatter_(1, labels, 1.0)
    x[:, -1] = (torch.rand(n, h, w, generator=g) < 0.2).to(dtype) * 0.5
    for k in range(extra):
        x[:, k, ::5, ::3] = torch.randn(n, (h + 4) // 5, (w + 2) // 3, generator=g, dtype=dtype)
    return x


def view_in_sentinels(x, layout):
    """x as a view into a NaN-filled buffer (so reading outside it shows), in ``layout``."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    base = torch.full((n, c + 2, h + 3, 2 * w + 4), float("nan"), dtype=x.dtype)
    if layout == "strided view":
        base[:, 1:c + 1, 2:h + 2, 3:2 * w + 3:2] = x
        return base[:, 1:c + 1, 2:h + 2, 3:2 * w + 3:2]
    base[:, 1:c + 1, 2:h + 2, 3:w + 3] = x
    return base[:, 1:c + 1, 2:h + 2, 3:w + 3]


@pytest.mark.parametrize("channels, outputs, kernel", [
    (36, 32, (7, 7)), (36, 64, (7, 7)), (5, 3, (3, 5)), (70, 16, (3, 3)), (130, 70, (1, 1)), (9, 1, (2, 4))])
@pytest.mark.parametrize("layout", ["nchw view", "channels_last", "strided view"])
@pytest.mark.parametrize("extra", [0, 4])
def test_equals_the_convolution_on_label_maps(channels, outputs, kernel, layout, extra):
    torch.manual_seed(0)
    x = view_in_sentinels(label_like(2, channels, 13, 21, extra=min(extra, channels - 1)), layout)
    weight = torch.randn(outputs, channels, *kernel, dtype=torch.float64)
    bias = torch.randn(outputs, dtype=torch.float64) if outputs % 2 == 0 else None
    expected = F.conv2d(x, weight, bias)
    actual = ops.sparse_input_conv2d(x, weight, bias, impl="cpu")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    for layout in (torch.contiguous_format, torch.channels_last):
        assert actual.is_contiguous(memory_format=layout) == expected.is_contiguous(memory_format=layout)
    actual32 = ops.sparse_input_conv2d(x.float(), weight.float(), None if bias is None else bias.float())
    assert actual32.dtype == torch.float32
    torch.testing.assert_close(actual32.double(), expected, rtol=0, atol=1e-5)


def regions_map(dtype=torch.float64):
    """Large regions of one label (so most 7x7 windows lie inside one), an edge channel of 0.5 along their
    borders, a patch whose pixels have 3 nonzero values (more than the kernel keeps inline) and a NaN."""
    x = torch.zeros(2, 14, 40, 64, dtype=dtype)
    labels = torch.zeros(2, 40, 64, dtype=torch.int64)
    labels[:, :, 25:] = 3
    labels[:, 18:, :40] = 7
    labels[1, 5:12, 50:60] = 1
    x.scatter_(1, labels[:, None], 1.0)
    edges = torch.zeros(2, 40, 64, dtype=torch.bool)
    edges[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    x[:, -1] = edges.to(dtype) * 0.5
    x[0, 11:12, 30:36, 45:52] = 0.25  # three nonzeros in these pixels
    x[1, 4, 33, 10] = float("nan")
    return x


@pytest.mark.parametrize("outputs, kernel", [(32, (7, 7)), (16, (3, 3)), (5, (7, 3)), (64, (1, 1))])
def test_windows_inside_one_region_equal_the_convolution(outputs, kernel):
    """Windows of equal pixels are summed over the taps at once; windows across an edge, tap by tap."""
    torch.manual_seed(1)
    x = regions_map()
    weight, bias = torch.randn(outputs, 14, *kernel, dtype=torch.float64), torch.randn(outputs, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias)
    actual = ops.sparse_input_conv2d(x, weight, bias, impl="cpu")
    assert torch.equal(actual.isnan(), expected.isnan()) and actual.isnan().any()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12, equal_nan=True)
    x32, w32, b32 = x.float(), weight.float(), bias.float()
    exact = F.conv2d(x32.double(), w32.double(), b32.double())
    sparse_error = (ops.sparse_input_conv2d(x32, w32, b32, impl="cpu").double() - exact).nan_to_num().abs().max()
    dense_error = (F.conv2d(x32, w32, b32).double() - exact).nan_to_num().abs().max()
    assert sparse_error <= max(dense_error, torch.finfo(torch.float32).eps * exact.nan_to_num().abs().max())


@pytest.mark.parametrize("case", ["dense input", "infinite weight", "nan input", "bfloat16", "all zeros",
                                  "empty batch", "no input channels"])
def test_inputs_off_the_sparse_path_still_equal_the_convolution(case):
    torch.manual_seed(0)
    x, weight = label_like(1, 12, 10, 14, dtype=torch.float32), torch.randn(4, 12, 3, 3)
    if case == "empty batch":
        x = x[:0]
    elif case == "no input channels":
        x, weight = x[:, :0], weight[:, :0]
    if case == "dense input":
        x = torch.randn(1, 12, 10, 14)
    elif case == "infinite weight":
        weight[1, 3, 0, 0] = float("inf")  # 0 * inf is NaN in the convolution: it must stay so
    elif case == "nan input":
        x[0, 2, 4, 5] = float("nan")
    elif case == "bfloat16":
        x, weight = x.bfloat16(), weight.bfloat16()
    elif case == "all zeros":
        x.zero_()
    expected = F.conv2d(x, weight)
    actual = ops.sparse_input_conv2d(x, weight, impl="cpu")
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5, equal_nan=True)
    assert torch.equal(actual.isnan(), expected.isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_windows_of_equal_infinite_values_give_what_the_convolution_gives(value, dtype):
    """Taps of mixed sign over a window of inf give inf * 2 + inf * -1 = NaN in the convolution, where the weights
    summed over the taps would give inf * (2 - 1) = inf; taps of one sign give inf. Integer weights and values keep
    every finite sum exact."""
    x = torch.zeros(2, 8, 9, 10, dtype=dtype)
    x[:, 0] = 3.0
    x[:, 0, :, :6] = value  # channel 0 is nonzero everywhere, the others nowhere: 1 value in 8
    x[1, 0, 4, 8] = -value
    weight = torch.randint(-3, 4, (5, 8, 3, 2), generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[0, 0] = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    weight[1, 0] = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.0, 1.0]])
    expected = F.conv2d(x, weight)
    actual = ops.sparse_input_conv2d(x, weight, impl="cpu")
    assert expected.isnan().any() and expected.isinf().any() and expected.isfinite().any()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", ["auto", "cpu"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, None), (torch.bfloat16, torch.float32, None),
                                    (torch.float32, torch.float32, torch.bfloat16)], ids=["x", "weight", "bias"])
def test_mixed_dtypes_give_what_the_convolution_gives(dtypes, impl):
    """Under autocast the convolution casts x, weight and bias to the autocast dtype; without it, it refuses them."""
    x_dtype, weight_dtype, bias_dtype = dtypes
    x = label_like(1, 8, 10, 12, dtype=torch.float32).to(x_dtype)
    weight = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0)).to(weight_dtype)
    bias = None if bias_dtype is None else torch.randn(4, generator=torch.Generator().manual_seed(1)).to(bias_dtype)
    with torch.autocast("cpu", torch.bfloat16):
        expected, actual = F.conv2d(x, weight, bias), ops.sparse_input_conv2d(x, weight, bias, impl=impl)
    assert actual.dtype == expected.dtype == torch.bfloat16 and torch.equal(actual, expected)
    with pytest.raises(RuntimeError) as refused:
        F.conv2d(x, weight, bias)
    with pytest.raises(RuntimeError, match=re.escape(str(refused.value))):
        ops.sparse_input_conv2d(x, weight, bias, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "cpu"])
@pytest.mark.parametrize("dtype, autocast_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                   (torch.bfloat16, torch.bfloat16), (torch.float64, torch.bfloat16)],
                         ids=str)
def test_autocast_gives_the_convolutions_dtype_and_values(dtype, autocast_dtype, impl):
    """A 16-bit input under autocast to the other 16-bit type is cast as the convolution casts it (the kernel kept
    the input's type: float16 back from bfloat16 autocast, and bfloat16 under float16 autocast 5.5x less accurate)."""
    x = label_like(1, 8, 10, 12, dtype=torch.float32).to(dtype)
    weight = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.autocast("cpu", autocast_dtype):
        expected, actual = F.conv2d(x, weight), ops.sparse_input_conv2d(x, weight, impl=impl)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_a_weight_with_no_outputs_is_refused_as_the_convolution_refuses_it():
    """A sparse input and nowhere to write: the kernel must not reach its per-pixel loop."""
    x, weight = label_like(1, 12, 10, 14, dtype=torch.float32), torch.randn(0, 12, 3, 3)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        F.conv2d(x, weight)
    with pytest.raises(RuntimeError, match="expected weight to be at least 1 at dimension 0"):
        ops.sparse_input_conv2d(x, weight, impl="cpu")


def test_no_less_accurate_than_the_convolution():
    """float32 against float64: the kernel sums in float64, the convolution in float32 blocks."""
    torch.manual_seed(0)
    x = label_like(1, 36, 40, 60, dtype=torch.float32)
    weight, bias = torch.randn(32, 36, 7, 7) * 0.05, 100 + torch.randn(32)  # a large bias: large outputs
    exact = F.conv2d(x.double(), weight.double(), bias.double())
    sparse_error = (ops.sparse_input_conv2d(x, weight, bias).double() - exact).abs().max()
    dense_error = (F.conv2d(x, weight, bias).double() - exact).abs().max()
    assert sparse_error <= dense_error


HARD = {
    # a scene of one label: every pixel's one nonzero in the same channel
    "constant one-hot plane": lambda g: torch.zeros(1, 8, 40, 60).index_fill_(1, torch.tensor([0]), 1.0),
    # label-like, its nonzero values far from 0 with a small spread
    "large mean, small spread": lambda g: (lambda x: x * (1000 + 0.01 * torch.randn(x.shape, generator=g)))(
        label_like(1, 8, 40, 60, dtype=torch.float32)),
    "huge plane": lambda g: label_like(1, 8, 2048, 2048, dtype=torch.float32),
}


@pytest.mark.parametrize("case", HARD)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_hard_inputs_in_every_dtype(case, dtype):
    """float32 (the sparse kernel) is at least as accurate as the convolution in float32, up to the one rounding of
    its float64 sums; float64 stays within a float64 sum's error bound of the convolution; 16-bit inputs run the
    convolution itself, so they equal it."""
    g = torch.Generator().manual_seed(0)
    x = HARD[case](g).to(dtype)
    weight = (torch.randn(4, 8, 3, 3, generator=g) * 0.1).to(dtype)
    bias = (100 + torch.randn(4, generator=g)).to(dtype)
    expected, actual = F.conv2d(x, weight, bias), ops.sparse_input_conv2d(x, weight, bias, impl="cpu")
    assert actual.dtype == dtype and actual.shape == expected.shape
    if dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(actual, expected)
        return
    if dtype == torch.float64:  # no wider reference here: within the error bound of a float64 sum of its terms
        terms = weight[0].numel() + 1
        bound = terms * torch.finfo(dtype).eps * F.conv2d(x.abs(), weight.abs(), bias.abs()).max()
        assert (actual - expected).abs().max() <= bound
        return
    exact = F.conv2d(x.double(), weight.double(), bias.double())
    one_rounding = torch.finfo(dtype).eps * exact.abs().max()
    assert (actual.double() - exact).abs().max() <= max((expected.double() - exact).abs().max(), one_rounding)


def test_gradients_forward_ad_and_autocast_behave_as_the_convolution():
    torch.manual_seed(0)
    x = label_like(1, 6, 9, 11).requires_grad_(True)
    weight = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, 4, 7, 9, dtype=torch.float64)
    got = torch.autograd.grad(ops.sparse_input_conv2d(x, weight, bias), (x, weight, bias), grad)
    want = torch.autograd.grad(F.conv2d(x, weight, bias), (x, weight, bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        primal = fwAD.make_dual(x.detach(), tangent)
        jvp = fwAD.unpack_dual(ops.sparse_input_conv2d(primal, weight.detach())).tangent
    torch.testing.assert_close(jvp, F.conv2d(tangent, weight.detach()), rtol=0, atol=1e-12)
    x32, w32 = x.detach().float(), weight.detach().float()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        actual, expected = ops.sparse_input_conv2d(x32, w32), F.conv2d(x32, w32)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), F.conv2d(x32, w32), rtol=0.01, atol=0.02)


@pytest.mark.parametrize("x_layout, weight_layout", [(torch.contiguous_format, torch.contiguous_format),
                                                     (torch.channels_last, torch.contiguous_format),
                                                     (torch.contiguous_format, torch.channels_last)])
def test_the_output_layout_and_the_fake_kernel_follow_the_convolution(x_layout, weight_layout):
    """channels_last when the input or the weight is (as an optimized model's weights are), as oneDNN's is."""
    x = label_like(2, 8, 12, 16, dtype=torch.float32).contiguous(memory_format=x_layout)
    weight = torch.randn(5, 8, 3, 7).contiguous(memory_format=weight_layout)
    real, expected = torch.ops.fastp2phd.sparse_input_conv2d(x, weight, None), F.conv2d(x, weight)
    assert real.stride() == expected.stride()
    with FakeTensorMode() as mode:
        fake = torch.ops.fastp2phd.sparse_input_conv2d(mode.from_tensor(x), mode.from_tensor(weight), None)
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


def test_mismatched_channels_are_refused_in_one_sentence():
    with pytest.raises(InvalidArgumentError, match=r"x \(N, C, H, W\) \(1, 3, 8, 8\) and weight .* the same C"):
        ops.sparse_input_conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(2, 4, 3, 3))


def test_compiles_whole_and_vmaps_as_the_convolution():
    """torch.compile(fullgraph=True) traces the operator through its fake kernel and runs the C++ kernel;
    vmap (a torch.func transform) takes the reference."""
    torch.manual_seed(0)
    x = label_like(3, 10, 12, 16, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 10, 3, 3), torch.randn(8)
    compiled = torch.compile(lambda t: ops.sparse_input_conv2d(t, weight, bias) * 2, fullgraph=True,
                             backend="aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), 2 * F.conv2d(x, weight, bias), rtol=0, atol=1e-5)
    batched = torch.func.vmap(lambda t: ops.sparse_input_conv2d(t[None], weight, bias)[0])(x)
    torch.testing.assert_close(batched, F.conv2d(x, weight, bias), rtol=0, atol=1e-5)


def test_opcheck():
    x = label_like(2, 6, 9, 11, dtype=torch.float32)
    for args in ((x, torch.randn(4, 6, 3, 3), torch.randn(4)), (x.double(), torch.randn(2, 6, 1, 5).double(), None)):
        torch.library.opcheck(torch.ops.fastp2phd.sparse_input_conv2d.default, args)
