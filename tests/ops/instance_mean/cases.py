"""Inputs, paths and tolerances shared by instance_mean's tests."""
from __future__ import annotations

import pytest
import torch
from support import rel_err, requires_extension


IMPLS = ["reference", pytest.param("cpp", marks=requires_extension)]


def make_inputs(n, c, h, w, num_ids=5, dtype=torch.float32, id_dtype=torch.int64, seed=0, offset=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(n, c, h, w, generator=g).to(dtype)
    inst = (torch.randint(0, num_ids, (n, 1, h, w), generator=g) + offset).to(id_dtype)
    return feat, inst


def low_precision_bound(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice PyTorch's own error for this dtype: rounding the exact result to it."""
    return 2 * rel_err(oracle.to(dtype), oracle) + 1e-12
