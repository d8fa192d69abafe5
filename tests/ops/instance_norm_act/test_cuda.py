"""instance_norm_act's Triton kernels on a CUDA device: within twice PyTorch's error at pix2pixHD's real shapes,
opcheck and torch.compile, the layout fuzz. Skipped without a GPU; ``bench/gpu_check.sh`` runs it on one."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_norm_act
from support import grad_err, instance_norm_act_definition, pytorch_errors, rel_err

from fastp2phd import ops
from fastp2phd.ops._common import memory_format_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORM_SHAPES = [(1, 64, 1024, 512), (4, 256, 256, 128), (8, 1024, 64, 32), (2, 3, 1, 2), (3, 5, 7, 9)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_act_triton_within_twice_pytorch_error(shape, layout, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = (torch.randn(shape, device=CUDA, generator=g) * 2 + 0.5).to(dtype)
    grad = torch.randn(shape, device=CUDA, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for activation in ("relu", "leaky_relu", "none"):
        forward_error, backward_error = pytorch_errors(x, grad, activation, 0.2)
        x64 = x.detach().double().requires_grad_(True)
        expected = instance_norm_act_definition(x64, activation)
        expected.backward(grad.double())
        xt = x.detach().clone().requires_grad_(True)
        y = ops.instance_norm_act(xt, activation, impl="triton")
        y.backward(grad)
        assert memory_format_of(y) == memory_format_of(x)
        floor = 1e-6 if dtype == torch.float32 else 0.0  # where PyTorch happens to be exact
        assert rel_err(y, expected) <= max(2 * forward_error, floor), activation
        assert grad_err(xt.grad, x64.grad, x, grad) <= max(2 * backward_error, floor), activation


def test_instance_norm_act_triton_opcheck_and_compile():
    x = torch.randn(2, 8, 16, 16, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "leaky_relu", 0.2, 1e-5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.instance_norm_act(t, "relu").square().sum(), fullgraph=True)
    compiled(x).backward()
    expected = x.detach().clone().requires_grad_(True)
    ops.instance_norm_act(expected, "relu", impl="reference").square().sum().backward()
    assert rel_err(x.grad, expected.grad) < 1e-5


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_instance_norm_act_triton(kind, seed, poisoned_empty):
    check_instance_norm_act("triton", CUDA, random.Random(f"cuda norm {kind} {seed}"), kind, CUDA_FLOATS)
