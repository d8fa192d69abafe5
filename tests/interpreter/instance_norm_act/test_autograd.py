"""Triton instance_norm_act under every autograd mode, in the interpreter: gradcheck, forward-mode AD, vmap and
double backward, which before dropped tangents or failed."""
from __future__ import annotations

import pytest
import torch
from autograd_modes import assert_forward_ad_matches, assert_vmap_matches

from fastp2phd import ops
from fastp2phd.ops import ACTIVATIONS, instance_norm_act

from .cases import make


ACT_CASES = [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("none", 0.0)]


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_gradcheck():
    x = make((1, 2, 3, 4), torch.float64, "contiguous", seed=6).requires_grad_(True)
    for activation in ACTIVATIONS:
        assert torch.autograd.gradcheck(lambda t: instance_norm_act(t, activation, 0.3, impl="triton"), (x,))


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
