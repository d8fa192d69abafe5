"""boundary_map's parity: the C++ fast path and the reference against scikit-image, every id and output dtype,
Cityscapes-like maps, extreme ids, the same result on any thread count. (The CUDA kernel: test_cuda.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from support import cityscapes_like, requires_extension

from fastp2phd.ops import boundary_map

from .cases import random_ids

skimage_segmentation = pytest.importorskip("skimage.segmentation")
ID_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
             torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float64, torch.bool]
SHAPES = [(1, 1, 1, 1), (1, 1, 1, 9), (1, 1, 9, 1), (1, 1, 2, 2), (3, 1, 17, 31), (2, 1, 64, 33)]


def skimage_boundaries(inst: torch.Tensor) -> torch.Tensor:
    slices = [skimage_segmentation.find_boundaries(m[0].numpy(), mode="thick", connectivity=1) for m in inst]
    return torch.from_numpy(np.stack(slices)[:, None])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ID_DTYPES)
def test_reference_equals_scikit_image(shape, dtype):
    inst = random_ids(shape, dtype)
    expected = skimage_boundaries(inst.to(torch.int64))
    assert torch.equal(boundary_map(inst, dtype=torch.bool, impl="reference"), expected)


@requires_extension
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ID_DTYPES)
def test_cpp_equals_scikit_image(shape, dtype, poisoned_empty):
    inst = random_ids(shape, dtype, seed=1)
    expected = skimage_boundaries(inst.to(torch.int64))
    assert torch.equal(boundary_map(inst, dtype=torch.bool, impl="cpp"), expected)


@requires_extension
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_cpp_output_dtypes(out_dtype, poisoned_empty):
    inst = random_ids((2, 1, 23, 37), torch.int32, seed=2)
    out = boundary_map(inst, dtype=out_dtype, impl="cpp")
    ref = boundary_map(inst, dtype=out_dtype, impl="reference")
    assert out.dtype == out_dtype and out.shape == inst.shape
    assert torch.equal(out, ref)
    assert set(torch.unique(out.double()).tolist()) <= {0.0, 1.0}


@requires_extension
@pytest.mark.parametrize("size", [(256, 512), (1024, 2048)])
def test_cpp_on_cityscapes_like_maps(size):
    inst = cityscapes_like(2, *size, seed=3)
    expected = skimage_boundaries(inst)
    out = boundary_map(inst, impl="cpp")
    assert torch.equal(out.bool(), expected)
    assert 0.005 < out.mean().item() < 0.2  # the maps do have edges, and are mostly interior


@requires_extension
def test_cpp_sparse_and_extreme_ids():
    # Cityscapes-style ids, negative ids and ids beyond 32 bits differ only in high bits.
    inst = torch.tensor([[26014, 26014, 26015], [-1, 2**40 + 7, 2**40 + 7], [2**40 + 6, 2**40 + 7, 7]]).view(1, 1, 3, 3)
    assert torch.equal(boundary_map(inst, impl="cpp"), boundary_map(inst, impl="reference"))
    assert torch.equal(boundary_map(inst, dtype=torch.bool, impl="cpp"), skimage_boundaries(inst))


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cpp_float_ids_compare_as_numbers(dtype):
    """-0.0 and 0.0 are one id (integer ids are compared by their bits; float ids must not be)."""
    inst = torch.tensor([[0.0, -0.0, 0.0, -0.0], [-0.0, -0.0, 0.0, 0.0], [0.0, 0.0, -0.0, -0.0]], dtype=dtype)
    assert not boundary_map(inst.view(1, 1, 3, 4), impl="cpp").any()


@requires_extension
def test_cpp_single_instance_has_no_edges():
    inst = torch.full((2, 1, 13, 7), 26001, dtype=torch.int32)
    assert not boundary_map(inst, impl="cpp").any()


@requires_extension
def test_cpp_independent_of_thread_count():
    inst = cityscapes_like(1, 128, 256, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = boundary_map(inst, impl="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, boundary_map(inst, impl="cpp"))
