"""The device's copy bandwidth, measured in the same run: the bound of the memory-bound ops."""
from __future__ import annotations

import torch
from harness import measure, tensor_bytes


def test_copy_bandwidth(benchmark, settings):
    elements = 2**16 if settings.smoke else (2**28 if settings.cuda else 2**26)
    src = torch.randn(elements, device=settings.device)
    dst = torch.empty_like(src)
    measure(benchmark, settings, suite="memory copy", case=f"{tensor_bytes(src) // 2**20} MiB float32",
            provider="copy", fn=lambda: dst.copy_(src), bytes_moved=2 * tensor_bytes(src))
