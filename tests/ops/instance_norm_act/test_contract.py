"""instance_norm_act's contract: what it accepts and refuses, eps, degenerate planes, empty inputs, outputs that
may be written in place, exact equality with the PyTorch modules it replaces, and its registered operator
(the CPU kernel it runs without the extension, opcheck, torch.compile)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hard_inputs import eps_0_case
from support import instance_norm_act_definition as definition
from support import rel_err

from fastp2phd.nn import InstanceNormAct2d
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

from .cases import DTYPES, PATHS


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=torch.zeros(3, 4, 4)), ValueError, "x must be an \\(N, C, H, W\\)"),
        (dict(x=torch.zeros(1, 3, 4, 4, dtype=torch.int64)), TypeError, "float16, bfloat16, float32 or float64"),
        (dict(x=torch.zeros(1, 3, 4, 4, dtype=torch.float8_e4m3fn)), TypeError, "got torch.float8_e4m3fn"),
        (dict(x=torch.zeros(1, 3, 4, 4), activation="gelu"), ValueError, "activation must be one of"),
        (dict(x=torch.zeros(1, 3, 4, 4), eps=-1e-5), ValueError, "eps must be a finite number, 0 or more"),
        (dict(x=torch.zeros(1, 3, 4, 4), impl="cudnn"), ValueError, "unknown impl='cudnn'"),
        (dict(x=torch.zeros(1, 3, 4, 4), impl="triton"), ValueError, "runs on cuda tensors \\(or on CPU tensors when TRITON_INTERPRET=1"),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        instance_norm_act(**kwargs)


def test_eps_is_used():
    x = torch.tensor([[[[0.0, 1e-3]]]])
    out = instance_norm_act(x, "none", eps=1.0)
    assert rel_err(out, definition(x, "none", eps=1.0)) < 1e-6
    assert out.abs().max() < 1e-3  # with eps=1e-5 it would be about 0.16


def test_one_pixel_planes_normalise_to_zero():
    x = torch.randn(2, 3, 1, 1, requires_grad=True)
    out = instance_norm_act(x, "none")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_eps_0_modules_give_0_on_a_constant_plane_as_pytorch_modules_do():
    """InstanceNormAct2d(eps=0), and fuse_modules of an eps = 0 InstanceNorm2d + ReLU, as their PyTorch modules."""
    from fastp2phd import fuse_modules

    x, _ = eps_0_case(torch.float32, 5, 6)
    plain = torch.nn.Sequential(torch.nn.InstanceNorm2d(2, eps=0.0), torch.nn.ReLU())
    for module, expected in ((InstanceNormAct2d(2, activation="none", eps=0.0), F.instance_norm(x, eps=0.0)),
                             (fuse_modules(copy.deepcopy(plain)), plain(x))):
        out = module(x)
        assert torch.equal(out[:, :1], expected[:, :1]) and torch.equal(expected[:, :1], torch.zeros_like(x[:, :1]))
        assert rel_err(out, expected) < 1e-6


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


def test_matches_pytorch_modules_exactly_in_float32():
    # The reference must be interchangeable with the modules it replaces in official checkpoints.
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(instance_norm_act(x, "relu", impl="reference"), F.relu(F.instance_norm(x)))
    assert torch.equal(instance_norm_act(x, "leaky_relu", 0.2, impl="reference"), F.leaky_relu(F.instance_norm(x), 0.2))


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
