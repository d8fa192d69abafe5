"""instance_mean's Triton path on a CUDA device: full resolution in every dtype, small cases and gradients,
deterministic mode, opcheck and torch.compile, the layout fuzz. Skipped without a GPU; ``bench/gpu_check.sh``
runs it on one. (Never waiting for the device: test_cuda_graph_safe.py.)"""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_instance_mean
from support import cityscapes_like, instance_mean_loop, rel_err

from fastp2phd import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_instance_mean_triton_full_resolution(dtype):
    inst = cityscapes_like(1, 1024, 2048, seed=1).to(CUDA)
    feat = torch.randn(1, 3, 1024, 2048, device=CUDA).to(dtype)
    expected = ops.instance_mean(feat.double(), inst, impl="reference")
    out = ops.instance_mean(feat, inst, impl="triton")
    bound = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype) or 2 * rel_err(expected.to(dtype), expected) + 1e-12
    assert out.dtype == dtype and rel_err(out, expected) <= bound


def test_instance_mean_triton_small_cases_and_gradient():
    cases = [
        (torch.randn(2, 3, 9, 7), torch.full((2, 1, 9, 7), 26001)),
        (torch.randn(1, 2, 6, 5), torch.arange(30).view(1, 1, 6, 5)),
        (torch.randn(2, 2, 30, 40), torch.randint(-3, 3, (2, 1, 30, 40)) * 2**40),
        (torch.randn(2, 4, 20, 30).contiguous(memory_format=torch.channels_last), torch.randint(0, 300, (2, 1, 20, 30))),
    ]
    for feat, inst in cases:
        feat, inst = feat.to(CUDA).requires_grad_(True), inst.to(CUDA)
        out = ops.instance_mean(feat, inst, impl="triton")
        assert rel_err(out, instance_mean_loop(feat.detach(), inst)) < 1e-6
        grad = torch.randn_like(out)
        out.backward(grad)
        assert rel_err(feat.grad, instance_mean_loop(grad, inst)) < 1e-6


def test_instance_mean_deterministic_mode_auto_runs_the_reference_and_by_name_refuses():
    inst = cityscapes_like(1, 64, 128, seed=2).to(CUDA)
    feat = torch.randn(1, 3, 64, 128, device=CUDA)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(UserWarning, match="float atomics"):
            first = ops.instance_mean(feat, inst)
        second = ops.instance_mean(feat, inst)
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
            ops.instance_mean(feat, inst, impl="cuda")
        torch.use_deterministic_algorithms(True, warn_only=True)
        atomics = ops.instance_mean(feat, inst, impl="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert torch.equal(first, ops.instance_mean(feat, inst, impl="reference"))
    assert rel_err(atomics, instance_mean_loop(feat, inst)) < 1e-6


def test_instance_mean_triton_opcheck_and_compile():
    feat = torch.randn(2, 3, 16, 24, device=CUDA, requires_grad=True)
    inst = torch.randint(0, 5, (2, 1, 16, 24), device=CUDA) * 1000
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat, inst))
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, i: (ops.instance_mean(f, i) * f).sum(), fullgraph=True)
    compiled(feat, inst).backward()
    expected = feat.detach().clone().requires_grad_(True)
    (ops.instance_mean(expected, inst, impl="reference") * expected).sum().backward()
    assert rel_err(feat.grad, expected.grad) < 1e-5


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_instance_mean_triton(kind, seed):  # not poisoned: deterministic mode would run the reference
    check_instance_mean("triton", CUDA, random.Random(f"cuda mean {kind} {seed}"), kind, CUDA_FLOATS)
