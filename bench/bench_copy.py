"""The device's copy bandwidth, measured in the same run: the bound of the memory-bound ops."""
from __future__ import annotations

import torch
from harness import measure, tensor_bytes


def test_copy_bandwidth(benchmark, settings):
    elements = 2**16 if settings.smoke else (2**28 if settings.cuda else 2**26)
    src = torch.randn(elements, device=settings.device)
    # Into a fresh tensor, as every op the bandwidth is compared with writes its output: a copy into one reused
    # buffer would be a bound in another allocation state.
    measure(benchmark, settings, suite="memory copy", case=f"{tensor_bytes(src) // 2**20} MiB float32",
            provider="copy", fn=lambda: src.clone(), bytes_moved=2 * tensor_bytes(src))
