"""Triton instance_mean under every autograd mode, in the interpreter: forward-mode AD, vmap and double backward."""
from __future__ import annotations

import torch
from autograd_modes import assert_forward_ad_matches, assert_vmap_matches
from support import cityscapes_like

from fastp2phd import ops


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_instance_mean_forward_ad_vmap_and_double_backward():
    inst = cityscapes_like(2, 6, 8, seed=3)

    def fast(f):
        return ops.instance_mean(f, inst, impl="triton")

    def reference(f):
        return ops.instance_mean(f, inst, impl="reference")

    assert_forward_ad_matches(fast, reference, feats(2, 3, 6, 8), feats(2, 3, 6, 8, seed=1))
    # jacfwd runs the kernel once per input value here (~0.3 s each): a 4x6 plane of one channel (13 instances)
    small = cityscapes_like(1, 4, 6, seed=3)
    assert_vmap_matches(lambda f: ops.instance_mean(f, small, impl="triton"),
                        lambda f: ops.instance_mean(f, small, impl="reference"), feats(3, 1, 1, 4, 6))
    f = feats(1, 2, 6, 8).requires_grad_(True)
    # fast_mode: each launch costs half a second in the interpreter
    assert torch.autograd.gradgradcheck(lambda t: ops.instance_mean(t, inst[:1], impl="triton") ** 2, (f,),
                                        fast_mode=True)
