"""Triton instance_mean's contract in the interpreter: empty inputs stay in the graph; opcheck."""
from __future__ import annotations

import torch

from fastp2phd.ops import instance_mean

from .cases import random_inputs


def test_empty_inputs_stay_in_the_graph():
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)]:
        feat = torch.randn(shape, requires_grad=True)
        inst = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int64)
        for out in (instance_mean(feat, inst, impl="triton"), torch.ops.fastp2phd.instance_mean(feat, inst)):
            assert out.shape == shape and out.requires_grad
            out.sum().backward()
            assert feat.grad.shape == shape


def test_opcheck():
    feat, inst = random_inputs(1, 2, 5, 6, 3, seed=6)
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.requires_grad_(True), inst))
