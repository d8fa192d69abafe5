"""Inputs shared by the interpreter tests of instance_mean's Triton kernels."""
from __future__ import annotations

import torch
from support import cityscapes_like


def random_inputs(n, c, h, w, num_ids, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(dtype), torch.randint(0, num_ids, (n, 1, h, w), generator=g)


CASES = {
    "one pixel": (torch.randn(1, 2, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.int64)),
    "one segment": (torch.randn(2, 3, 9, 7), torch.full((2, 1, 9, 7), 26001)),
    "one-pixel segments": (torch.randn(1, 2, 6, 5), torch.arange(30).view(1, 1, 6, 5)),
    "hundreds of segments": (torch.randn(1, 2, 30, 40), torch.randint(0, 500, (1, 1, 30, 40)) * 1000),
    "Cityscapes-like": (torch.randn(2, 3, 24, 48), cityscapes_like(2, 24, 48, seed=1)),
    "ids beyond 32 bits": (torch.randn(2, 2, 8, 9), torch.randint(-5, 5, (2, 1, 8, 9)) * 2**40),
    "uint8 ids": (torch.randn(1, 3, 5, 11), torch.randint(0, 255, (1, 1, 5, 11), dtype=torch.uint8)),
    "float ids": (torch.randn(1, 3, 5, 11), torch.randint(0, 4, (1, 1, 5, 11)).float() * 1000),
    "tile boundary": (torch.randn(1, 1, 3, 700), torch.randint(0, 3, (1, 1, 3, 700))),  # 2100 pixels: 3 tiles
}
