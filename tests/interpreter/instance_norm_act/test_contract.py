"""Triton instance_norm_act's registered operator in the interpreter: opcheck."""
from __future__ import annotations

import torch

from .cases import make


def test_opcheck():
    x = make((2, 3, 5, 4), torch.float32, "contiguous", seed=7).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "leaky_relu", 0.2, 1e-5))
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "relu", 0.2, 1e-5))
