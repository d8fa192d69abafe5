"""Every autograd mode through the Triton kernels: forward-mode AD, vmap and double backward (a
gradient penalty on a discriminator), which before dropped tangents or failed."""
from __future__ import annotations

import pytest
import torch
from autograd_modes import assert_forward_ad_matches, assert_same_gradients, assert_vmap_matches
from support import cityscapes_like

from fastp2phd import ops
from fastp2phd.models import MultiscaleDiscriminator

ACT_CASES = [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("none", 0.0)]


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation, slope", ACT_CASES)
def test_instance_norm_act_forward_ad_vmap_and_double_backward(activation, slope):
    def fast(t):
        return ops.instance_norm_act(t, activation, slope, impl="triton")

    def reference(t):
        return ops.instance_norm_act(t, activation, slope, impl="reference")

    assert_forward_ad_matches(fast, reference, feats(2, 3, 4, 5), feats(2, 3, 4, 5, seed=1))
    assert_vmap_matches(fast, reference, feats(3, 2, 2, 3, 4))
    x = feats(1, 2, 3, 4).requires_grad_(True)
    assert torch.autograd.gradgradcheck(fast, (x,))


def test_instance_mean_forward_ad_vmap_and_double_backward():
    inst = cityscapes_like(2, 6, 8, seed=3)

    def fast(f):
        return ops.instance_mean(f, inst, impl="triton")

    def reference(f):
        return ops.instance_mean(f, inst, impl="reference")

    assert_forward_ad_matches(fast, reference, feats(2, 3, 6, 8), feats(2, 3, 6, 8, seed=1))
    assert_vmap_matches(lambda f: ops.instance_mean(f, inst[:1], impl="triton"),
                        lambda f: ops.instance_mean(f, inst[:1], impl="reference"), feats(3, 1, 2, 6, 8))
    f = feats(1, 2, 6, 8).requires_grad_(True)
    # fast_mode: each launch costs half a second in the interpreter
    assert torch.autograd.gradgradcheck(lambda t: ops.instance_mean(t, inst[:1], impl="triton") ** 2, (f,),
                                        fast_mode=True)


def test_r1_penalty_through_the_triton_discriminator():
    """R1: the penalty's parameter gradients need the gradient of dD/dx; equal to the reference network's."""
    nets = {}
    for impl in ("triton", "reference"):
        torch.manual_seed(0)
        nets[impl] = MultiscaleDiscriminator(3, ndf=4, n_layers=2, num_D=2, impl=impl).double()
    grads = {}
    for impl, net in nets.items():
        x = feats(2, 3, 32, 32).requires_grad_(True)
        score = sum(scale[-1].sum() for scale in net(x))
        (dx,) = torch.autograd.grad(score, x, create_graph=True)
        grads[impl] = torch.autograd.grad(dx.pow(2).sum(), list(net.parameters()), allow_unused=True)
    assert_same_gradients(grads["triton"], grads["reference"])
