"""Inputs shared by the interpreter tests of instance_norm_act's Triton kernels."""
from __future__ import annotations

import torch


def make(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":  # a crop of a wider tensor: neither NCHW- nor channels_last-contiguous
        n, c, h, w = shape
        return (torch.randn(n, c, h, w + 3, generator=g) * 2 + 0.5).to(dtype)[..., 1:w + 1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
