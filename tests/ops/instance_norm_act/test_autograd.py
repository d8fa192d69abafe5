"""instance_norm_act under every autograd mode: gradcheck, and through its registered (torch.library) operator on
the CPU the backward of all three outputs, double backward, forward-mode AD and vmap. Before, forward-mode AD
silently returned zero tangents here."""
from __future__ import annotations

import importlib

import pytest
import torch
from autograd_modes import assert_forward_ad_matches, assert_vmap_matches
from support import rel_err

from fastp2phd import ops
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

norm_module = importlib.import_module("fastp2phd.ops.instance_norm_act")


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: instance_norm_act(t, activation, 0.3), (x,))


# instance_norm_act's fast path is Triton (CUDA, or the interpreter), but its registered op runs on CPU
# tensors with the reference as kernel, so its autograd formulas (backward of all three outputs, the
# differentiable backward, jvp, vmap) are checked here; tests/interpreter checks them with the kernels.
ACT_CASES = [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("leaky_relu", 0.0), ("none", 0.0)]


@pytest.mark.parametrize("activation, slope", ACT_CASES)
def test_registered_instance_norm_act_op_backward_of_every_output_and_double_backward(activation, slope):
    x = feats(2, 3, 4, 5).requires_grad_(True)
    op = torch.ops.fastp2phd.instance_norm_act
    assert torch.autograd.gradcheck(lambda t: op(t, activation, slope, 1e-5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, activation, slope, 1e-5), (x,))


@pytest.mark.parametrize("activation, slope", ACT_CASES)
def test_instance_norm_act_forward_ad_and_vmap_formulas(activation, slope):
    def fast(t):
        return norm_module._ForwardADFunction.apply(t, activation, slope, 1e-5)[0]

    def reference(t):
        return ops.instance_norm_act(t, activation, slope, impl="reference")

    assert_forward_ad_matches(fast, reference, feats(2, 3, 4, 5), feats(2, 3, 4, 5, seed=1))
    assert_vmap_matches(fast, reference, feats(3, 2, 2, 3, 4))
    cube_sum = lambda fn: lambda t: fn(t).pow(3).sum()  # noqa: E731
    x = feats(1, 2, 2, 3)
    assert rel_err(torch.func.hessian(cube_sum(fast))(x), torch.func.hessian(cube_sum(reference))(x)) < 1e-10
    x = feats(1, 2, 3, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: norm_module._ForwardADFunction.apply(t, activation, slope, 1e-5), (x,),
                                    check_forward_ad=True)
