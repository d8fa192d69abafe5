"""Inputs shared by boundary_map's tests."""
from __future__ import annotations

import torch


def random_ids(shape, dtype, num_ids=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_ids, shape, generator=g).to(dtype)
