"""boundary_map: the fast path next to the reference, the original 4-pass get_edges,
torch.compile, scikit-image, and the floor (an int32 -> float32 copy of the same ids)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import check_agrees, compiled_or_skip, instance_maps, measure, tensor_bytes
from official import official_edges

from fastp2phd.ops import boundary_map, boundary_map_reference

PROVIDERS = ["floor", "fastp2phd", "reference", "official", "compile", "scikit-image"]
SIZE_IDS = ["small", "medium", "large"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", range(3), ids=SIZE_IDS)
def test_boundary_map(benchmark, settings, size, provider):
    sizes = settings.map_sizes()
    if size >= len(sizes):
        pytest.skip("smoke run")
    n, h, w = sizes[size]
    inst = instance_maps(settings, n, h, w, seed=size)
    out_bytes = inst.numel() * 4  # float32 edges
    if provider == "floor":
        fn = lambda: inst.to(torch.float32)  # noqa: E731
    elif provider == "fastp2phd":
        fn = lambda: boundary_map(inst)  # noqa: E731
    elif provider == "reference":
        fn = lambda: boundary_map(inst, impl="reference")  # noqa: E731
    elif provider == "official":
        fn = lambda: official_edges(inst)  # noqa: E731
    elif provider == "compile":
        fn = compiled_or_skip(boundary_map_reference, inst)
        fn = (lambda f: lambda: f(inst))(fn)
    else:
        segmentation = pytest.importorskip("skimage.segmentation")
        if settings.cuda:
            pytest.skip("scikit-image runs on the CPU")
        ids = inst.cpu().numpy()

        def fn():  # float32 edges like every other provider's (find_boundaries gives bool)
            return np.stack([segmentation.find_boundaries(m[0], mode="thick", connectivity=1)
                             for m in ids])[:, None].astype(np.float32)

    if provider != "floor":
        check_agrees(settings, fn(), boundary_map_reference(inst), what=f"boundary_map {provider}")
    measure(benchmark, settings, suite="boundary_map", case=f"{n}x1x{h}x{w} int32 -> float32", provider=provider,
            fn=fn, bytes_moved=tensor_bytes(inst) + out_bytes, images=n, slow=provider == "scikit-image")
