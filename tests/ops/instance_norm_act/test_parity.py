"""instance_norm_act's parity: the reference and the C++ CPU kernel against a float64 definition, every activation,
dtype and shape, forward and backward; the operator's Python kernels against the compiled ones; the same bits on
any thread count. (Hard inputs: test_hard_inputs.py; the Triton kernels: tests/interpreter/instance_norm_act/ and
test_cuda.py.)"""
from __future__ import annotations

import pytest
import torch
from support import grad_err, pytorch_errors, rel_err, requires_extension
from support import instance_norm_act_definition as definition

from fastp2phd.ops import ACTIVATIONS, instance_norm_act

from .cases import DTYPES, PATHS, tolerance


SHAPES = [(1, 1, 2, 3), (2, 3, 1, 1), (2, 5, 7, 9), (1, 4, 33, 17), (3, 2, 1, 64)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_definition(activation, dtype, shape):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3 + 1).to(dtype)
    expected = definition(x, activation, 0.1)
    out = instance_norm_act(x, activation, 0.1)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) <= tolerance(expected, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 40, 56), (2, 3, 40, 56)])
def test_16_bit_cpu_kernel_on_planes_far_from_zero(activation, dtype, shape):
    # Its statistics come from sums of squares: a mean 100 standard deviations away must not matter.
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.5 + 50).to(dtype)
    expected = definition(x, activation, 0.1)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = instance_norm_act(x.contiguous(memory_format=layout), activation, 0.1, impl="cpu")
        assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
        assert rel_err(out, expected) <= tolerance(expected, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_matches_definition(activation, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 13, generator=g).to(dtype)
    grad = torch.randn(2, 3, 9, 13, generator=g).to(dtype)
    x64 = x.double().requires_grad_(True)
    definition(x64, activation).backward(grad.double())
    xd = x.clone().requires_grad_(True)
    instance_norm_act(xd, activation).backward(grad)
    assert xd.grad.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(x64.grad.to(dtype), x64.grad) + 1e-12
    assert rel_err(xd.grad, x64.grad) <= bound


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("slope", [1e-8, 1e-3])
def test_16_bit_leaky_relu_with_a_tiny_slope_gets_the_right_gradient(slope, impl):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)).half().requires_grad_(True)
    grad = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10)).half()
    instance_norm_act(x, "leaky_relu", slope, impl=impl).backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    definition(x64, "leaky_relu", slope).backward(grad.double())
    _, backward_error = pytorch_errors(x, grad, "leaky_relu", slope)
    assert grad_err(x.grad, x64.grad, x, grad) <= 2 * backward_error + 1e-6


@pytest.mark.parametrize("case", ["constant -2.3", "1000 + 0.001 randn", "label-like small", "regions", "one pixel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_python_kernels_of_the_operator_match_the_compiled_ones(case, dtype):
    # Where neither the extension nor Triton is there, the operator runs these: the same numerics.
    import importlib

    from hard_inputs import make_input, oracle

    module = importlib.import_module("fastp2phd.ops.instance_norm_act")
    x = make_input(case, dtype, channels_last=False)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y, mean, rstd = module._forward_reference_kernel(x, "leaky_relu", 0.01, 1e-5)
    dx = module._backward_formula(dy, x, mean, rstd, "leaky_relu", 0.01)
    expected_y, expected_dx, expected_rstd = (torch.from_numpy(a.astype("float64"))  # (its bounds are far looser)
                                              for a in oracle(x, dy, "leaky_relu", 0.01))
    bound = 1e-10 if dtype == torch.float64 else 4 * hard_inputs_roundoff(dtype)
    assert (y.double() - expected_y).abs().max() <= bound * max(1.0, expected_y.abs().max().item())
    assert (dx.double() - expected_dx).abs().max() <= bound * (expected_rstd.max() * dy.abs().max()).item()
    if hasattr(torch.ops.fastp2phd.instance_norm_act.default, "_op"):  # the compiled kernel, where there is one
        y_c, mean_c, rstd_c = torch.ops.fastp2phd.instance_norm_act(x, "leaky_relu", 0.01, 1e-5)
        if x.element_size() >= 4:  # float64 sums on both sides: equal to summation order; float32 rstd: a rounding
            assert rel_err(mean, mean_c) <= 1e-12
            assert rel_err(rstd, rstd_c) <= (1e-12 if rstd.dtype == torch.float64 else
                                             4 * hard_inputs_roundoff(rstd.dtype))
        else:  # the C++ kernel sums a 2048-value block of 16-bit input in float32 (16 lanes of 128 additions)
            block_sums = 256 * hard_inputs_roundoff(torch.float32)  # 1.5e-5: 1/256 of bfloat16's rounding of y
            spread = (x.double() - x.flatten(2)[:, :, :1, None].double()).abs().amax(dim=(2, 3)).flatten()
            assert ((mean - mean_c).abs() <= block_sums * spread).all()
            assert rel_err(rstd, rstd_c) <= block_sums


def hard_inputs_roundoff(dtype):
    from hard_inputs import UNIT_ROUNDOFF

    return UNIT_ROUNDOFF[dtype]


@requires_extension
@pytest.mark.parametrize("shape", [(1, 2, 300, 260), (2, 5, 40, 1000), (1, 3, 1100, 1100), (1, 1, 4, 4)],
                         ids=["few planes", "planes per thread", "planes over the cache bound", "one small plane"])
def test_cpu_kernel_gives_the_same_bits_on_any_thread_count(shape):
    """The kernel normalises planes right after their statistics when there are enough planes for the
    threads, and in two passes otherwise: the same chunks and merge order, so the same bits either way."""
    x = (torch.randn(shape) * 0.01 + 3).to(torch.float32)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            outputs.append(torch.ops.fastp2phd.instance_norm_act(x, "leaky_relu", 0.2, 1e-5))
    finally:
        torch.set_num_threads(threads)
    for y, mean, rstd in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(mean, outputs[0][1]) and torch.equal(rstd, outputs[0][2])
