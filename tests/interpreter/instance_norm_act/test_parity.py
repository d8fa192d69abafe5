"""Triton instance_norm_act (forward and backward) against the float64 definition, in the interpreter: shapes that
take both tilings, every layout, 16-bit within twice PyTorch's error, leaky slopes."""
from __future__ import annotations

import pytest
import torch
from support import instance_norm_act_definition as definition
from support import grad_err, pytorch_errors, rel_err

from fastp2phd.kernels import instance_norm_act as kernels
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

from .cases import make


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


def test_tiling_covers_both_regimes():
    """The cases above really take the split path and the packed path."""
    _, _, _, _, chunks = kernels._tiling(1, 2, 96 * 100, 96 * 100, 1)
    assert chunks > 1
    block_c, _, _, _, chunks = kernels._tiling(4, 40, 32, 32, 1)
    assert block_c > 1 and chunks == 1
