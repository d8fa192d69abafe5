"""Inputs, dtypes and tolerances shared by instance_norm_act's tests."""
from __future__ import annotations

import pytest
import torch
from support import rel_err, requires_extension


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def tolerance(expected: torch.Tensor, dtype: torch.dtype) -> float:
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-5
    return 2 * rel_err(expected.to(dtype), expected) + 1e-12  # twice the rounding error of the dtype


PATHS = ["reference", pytest.param("cpu", marks=requires_extension)]
