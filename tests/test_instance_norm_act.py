"""instance_norm_act: the op against a float64 definition, every activation, dtype and layout."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support import grad_err, pytorch_errors, rel_err, requires_extension
from support import instance_norm_act_definition as definition

from fastp2phd.nn import InstanceNormAct2d
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 2, 3), (2, 3, 1, 1), (2, 5, 7, 9), (1, 4, 33, 17), (3, 2, 1, 64)]


def tolerance(expected: torch.Tensor, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-5
    return 2 * rel_err(expected.to(dtype), expected) + 1e-12  # twice the rounding error of the dtype


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


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: instance_norm_act(t, activation, 0.3), (x,))


def test_one_pixel_planes_normalise_to_zero():
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    out = instance_norm_act(x, "none")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_stays_channels_last(dtype):
    x = torch.randn(2, 8, 6, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    out = instance_norm_act(x, "leaky_relu")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, definition(x, "leaky_relu")) <= tolerance(definition(x, "leaky_relu"), dtype)


def test_non_contiguous_input():
    x = torch.randn(2, 6, 10, 12)[:, ::2, 1:, ::3]
    assert rel_err(instance_norm_act(x, "relu"), definition(x, "relu")) < 1e-5


def test_eps_is_used():
    x = torch.tensor([[[[0.0, 1e-3]]]])
    out = instance_norm_act(x, "none", eps=1.0)
    assert rel_err(out, definition(x, "none", eps=1.0)) < 1e-6
    assert out.abs().max() < 1e-3  # with eps=1e-5 it would be about 0.16


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.zeros(3, 4, 4)), ValueError, "x must be an \\(N, C, H, W\\)"),
        (dict(x=torch.zeros(1, 3, 4, 4, dtype=torch.int64)), TypeError, "floating point"),
        (dict(x=torch.zeros(1, 3, 4, 4), activation="gelu"), ValueError, "activation must be one of"),
        (dict(x=torch.zeros(1, 3, 4, 4), eps=-1e-5), ValueError, "eps must be a finite number, 0 or more"),
        (dict(x=torch.zeros(1, 3, 4, 4), impl="cudnn"), ValueError, "unknown impl='cudnn'"),
        (dict(x=torch.zeros(1, 3, 4, 4), impl="triton"), ValueError, "runs on cuda tensors \\(or on CPU tensors when TRITON_INTERPRET=1"),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        instance_norm_act(**kwargs)


def test_matches_pytorch_modules_exactly_in_float32():
    # The reference must be interchangeable with the modules it replaces in official checkpoints.
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(instance_norm_act(x, "relu", impl="reference"), F.relu(F.instance_norm(x)))
    assert torch.equal(instance_norm_act(x, "leaky_relu", 0.2, impl="reference"), F.leaky_relu(F.instance_norm(x), 0.2))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_registered_triton_op_on_cpu_runs_the_reference(activation):
    # Without the interpreter, the op's CPU kernels are the PyTorch reference, so graphs
    # compiled on the CPU keep working; its CUDA kernels are the Triton ones.
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    y, mean, rstd = torch.ops.fastp2phd.instance_norm_act(x, activation, 0.2, 1e-5)
    assert rel_err(y, definition(x, activation)) < 1e-12
    assert rel_err(mean, x.mean(dim=(2, 3)).flatten()) < 1e-12
    assert rel_err(rstd, torch.rsqrt(x.var(dim=(2, 3), correction=0) + 1e-5).flatten()) < 1e-12
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().requires_grad_(True)
    definition(x64, activation).backward(grad)
    assert rel_err(dx, x64.grad) < 1e-10


def test_registered_triton_op_opcheck_and_compile_on_cpu():
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    for activation, slope in (("relu", 0.2), ("leaky_relu", 0.2), ("leaky_relu", 0.0), ("none", 0.2)):
        torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, activation, slope, 1e-5))
    torch._dynamo.reset()

    def step(t):
        return torch.ops.fastp2phd.instance_norm_act(t, "leaky_relu", 0.2, 1e-5)[0].square().sum()

    compiled = torch.compile(step, fullgraph=True)
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    compiled(x1).backward()
    step(x2).backward()
    assert rel_err(x1.grad, x2.grad) < 1e-6


PATHS = ["reference", pytest.param("cpu", marks=requires_extension)]


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_output_can_be_modified_in_place_before_backward(activation, dtype, impl):
    # A plain tensor, not a view or a saved output that autograd forbids writing to (issue 18). The reference
    # is F.instance_norm + F.relu, whose relu saves its output: there (as with the modules) relu's may not be,
    # unless the reference returns a cast of it (16-bit input).
    x = torch.randn(2, 3, 5, 6).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 3, 5, 6).to(dtype)
    y = instance_norm_act(x, activation, 0.2, impl=impl)
    y.add_(1).mul_(2)
    if impl == "reference" and activation == "relu" and dtype in (torch.float32, torch.float64):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(grad)
        return
    y.backward(grad)
    expected = x.detach().clone().requires_grad_(True)
    instance_norm_act(expected, activation, 0.2, impl=impl).backward(2 * grad)
    assert torch.equal(x.grad, expected.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_block_with_an_in_place_relu_trains_in_16_bit(dtype):
    from fastp2phd import fuse_modules

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.InstanceNorm2d(4), torch.nn.ReLU(inplace=True))
    fused = fuse_modules(copy.deepcopy(block)).to(dtype)
    x = torch.randn(2, 3, 9, 10).to(dtype)
    fused(x).float().square().sum().backward()
    block.to(dtype)(x).float().square().sum().backward()
    # (The conv's bias has an exact gradient of 0 before an instance norm: both give rounding noise there.)
    a, b = fused[0].weight.grad.float(), block[0].weight.grad.float()
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


@pytest.mark.filterwarnings("ignore:InstanceNormAct2d. input has 0 channels")
@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
def test_empty_input_keeps_autograd(shape, impl):
    x = torch.zeros(shape, requires_grad=True)
    for out in (instance_norm_act(x, impl=impl), InstanceNormAct2d(max(shape[1], 1), impl=impl)(x)):
        assert out.shape == x.shape and out.requires_grad
        out.sum().backward()
        assert x.grad.shape == x.shape
        x.grad = None


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_compiles_with_dynamic_shapes(activation):
    # eps and the slope reach the op as SymFloats under dynamic=True (issue 18: math.isfinite broke this).
    torch._dynamo.reset()
    module = InstanceNormAct2d(4, activation, 0.3)
    for fn in (module, lambda t: instance_norm_act(t, activation, 0.3)):
        compiled = torch.compile(fn, fullgraph=True, dynamic=True)
        for shape in ((2, 4, 8, 8), (1, 4, 5, 7)):
            x = torch.randn(shape)
            assert rel_err(compiled(x), fn(x)) < 1e-6


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
    expected_y, expected_dx, expected_rstd = oracle(x, dy, "leaky_relu", 0.01)
    bound = 1e-10 if dtype == torch.float64 else 4 * hard_inputs_roundoff(dtype)
    assert (y.double() - expected_y).abs().max() <= bound * max(1.0, expected_y.abs().max().item())
    assert (dx.double() - expected_dx).abs().max() <= bound * (expected_rstd.max() * dy.abs().max()).item()
    if hasattr(torch.ops.fastp2phd.instance_norm_act.default, "_op"):  # the compiled kernel, where there is one
        y_c, mean_c, rstd_c = torch.ops.fastp2phd.instance_norm_act(x, "leaky_relu", 0.01, 1e-5)
        # (float64 statistics: equal to summation order; float32 rstd: a rounding of each)
        assert rel_err(mean, mean_c) <= 1e-12
        assert rel_err(rstd, rstd_c) <= (1e-12 if rstd.dtype == torch.float64 else 4 * hard_inputs_roundoff(rstd.dtype))


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
