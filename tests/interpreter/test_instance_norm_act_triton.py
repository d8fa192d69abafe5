"""Triton instance_norm_act (forward and backward) against the float64 definition, in the interpreter."""
from __future__ import annotations

import pytest
import torch
from support import instance_norm_act_definition as definition
from support import grad_err, pytorch_errors, rel_err

from fastp2phd.kernels import instance_norm_act as kernels
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

SHAPES = {
    "1x2 plane": (1, 1, 1, 2),
    "2x3 planes": (2, 3, 2, 3),
    "odd": (2, 3, 5, 7),
    "C=1": (1, 1, 13, 17),
    "split plane": (1, 2, 96, 100),  # 9600 pixels: several chunks per plane, merged in phase 2
    "many small planes": (4, 40, 4, 8),  # 160 planes of 32 pixels, packed 16 to a program
}
LAYOUTS = ["contiguous", "channels_last", "strided"]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def make(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a crop of a wider tensor: neither NCHW- nor channels_last-contiguous
        n, c, h, w = shape
        return (torch.randn(n, c, h, w + 3, generator=g) * 2 + 0.5).to(dtype)[..., 1:w + 1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def assert_layout_kept(out, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_and_float64_forward_and_backward(activation, shape, layout, poisoned_empty):
    grad32 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.float64):
        x = make(shape, dtype, layout).requires_grad_(True)
        grad = grad32.to(dtype)
        x64 = x.detach().double().requires_grad_(True)
        expected = definition(x64, activation, 0.1)
        out = instance_norm_act(x, activation, 0.1, impl="triton")
        out.backward(grad)
        expected.backward(grad.double())
        assert out.dtype == dtype and x.grad.dtype == dtype
        assert_layout_kept(out, x)
        # At most twice PyTorch's own error in this dtype, floored where PyTorch happens to be exact.
        floor = 1e-6 if dtype == torch.float32 else 1e-12
        forward_error, backward_error = pytorch_errors(x, grad, activation, 0.1)
        assert rel_err(out, expected) <= max(2 * forward_error, floor)
        assert grad_err(x.grad, x64.grad, x, grad) <= max(2 * backward_error, floor)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_low_precision_within_twice_pytorch_error(activation, layout, dtype):
    for shape in (SHAPES["odd"], SHAPES["split plane"], SHAPES["many small planes"]):
        x = make(shape, dtype, layout, seed=2).requires_grad_(True)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        x64 = x.detach().double().requires_grad_(True)
        expected = definition(x64, activation, 0.2)
        out = instance_norm_act(x, activation, 0.2, impl="triton")
        out.backward(grad)
        expected.backward(grad.double())
        assert out.dtype == dtype and x.grad.dtype == dtype
        forward_error, backward_error = pytorch_errors(x, grad, activation, 0.2)
        assert rel_err(out, expected) <= 2 * forward_error + 1e-12
        assert grad_err(x.grad, x64.grad, x, grad) <= 2 * backward_error + 1e-12


@pytest.mark.parametrize("slope", [0.0, -0.3, 0.2, 1.5])
def test_leaky_slopes(slope):
    x = make((2, 3, 6, 5), torch.float64, "contiguous", seed=5).requires_grad_(True)
    x64 = x.detach().clone().requires_grad_(True)
    instance_norm_act(x, "leaky_relu", slope, impl="triton").sum().backward()
    definition(x64, "leaky_relu", slope).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-10


def test_gradcheck():
    x = make((1, 2, 3, 4), torch.float64, "contiguous", seed=6).requires_grad_(True)
    for activation in ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda t: instance_norm_act(t, activation, 0.3, impl="triton"), (x,))


def test_tiling_covers_both_regimes():
    """The cases above really take the split path and the packed path."""
    _, _, _, _, chunks = kernels._tiling(1, 2, 96 * 100, 96 * 100, 1)
    assert chunks > 1
    block_c, _, _, _, chunks = kernels._tiling(4, 40, 32, 32, 1)
    assert block_c > 1 and chunks == 1


def test_opcheck():
    x = make((2, 3, 5, 4), torch.float32, "contiguous", seed=7).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "leaky_relu", 0.2, 1e-5))
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "relu", 0.2, 1e-5))
