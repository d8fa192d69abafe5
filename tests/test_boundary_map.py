"""boundary_map: C++ fast path vs reference vs scikit-image, registration, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from support import cityscapes_like, requires_extension

from fastp2phd.ops import boundary_map, boundary_map_reference

skimage_segmentation = pytest.importorskip("skimage.segmentation")

ID_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.float64]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float64, torch.bool]
SHAPES = [(1, 1, 1, 1), (1, 1, 1, 9), (1, 1, 9, 1), (1, 1, 2, 2), (3, 1, 17, 31), (2, 1, 64, 33)]


def skimage_boundaries(inst: torch.Tensor) -> torch.Tensor:
    slices = [skimage_segmentation.find_boundaries(m[0].numpy(), mode="thick", connectivity=1) for m in inst]
    return torch.from_numpy(np.stack(slices)[:, None])


def random_ids(shape, dtype, num_ids=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_ids, shape, generator=g).to(dtype)


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
def test_cpp_default_dtype_is_float32():
    out = boundary_map(random_ids((1, 1, 5, 5), torch.int64))
    assert out.dtype == torch.float32


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
def test_cpp_single_instance_has_no_edges():
    inst = torch.full((2, 1, 13, 7), 26001, dtype=torch.int32)
    assert not boundary_map(inst, impl="cpp").any()


@requires_extension
def test_cpp_non_contiguous_and_channels_last_inputs():
    base = random_ids((2, 1, 40, 50), torch.int32, num_ids=3, seed=4)
    strided = base[:, :, ::2, 1::3]
    transposed = base.transpose(2, 3)
    channels_last = base.contiguous(memory_format=torch.channels_last)
    for inst in (strided, transposed, channels_last):
        assert torch.equal(boundary_map(inst, impl="cpp"), boundary_map(inst.contiguous(), impl="reference"))


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


def test_empty_inputs_give_empty_outputs():
    for impl in ("reference", "auto"):
        for shape in ((0, 1, 4, 4), (2, 1, 0, 4), (2, 1, 4, 0)):
            out = boundary_map(torch.zeros(shape, dtype=torch.int32), impl=impl)
            assert out.shape == shape and out.dtype == torch.float32


@requires_extension
def test_opcheck():
    inst = random_ids((2, 1, 9, 11), torch.int32, seed=6)
    for dtype in (torch.float32, torch.uint8):
        torch.library.opcheck(torch.ops.fastp2phd.boundary_map.default, (inst, dtype))


@requires_extension
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    fn = torch.compile(lambda t: boundary_map(t, dtype=torch.float16) * 2, fullgraph=True)
    inst = random_ids((2, 1, 12, 20), torch.int64, seed=7)
    assert torch.equal(fn(inst), boundary_map_reference(inst, torch.float16) * 2)


@pytest.mark.parametrize(
    "inst, message",
    [
        (torch.zeros(4, 4, dtype=torch.int32), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.int32), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.bool), "integer ids"),
        (torch.full((1, 1, 4, 4), 0.5), "not whole numbers"),
        (torch.full((1, 1, 4, 4), float("nan")), "fractions, NaN, inf"),
        # In float16, -2**63 rounds to -inf: a range check alone let -inf through.
        *[(torch.full((1, 1, 4, 4), value, dtype=dtype), "fractions, NaN, inf")
          for dtype in (torch.float16, torch.bfloat16) for value in (float("-inf"), float("inf"), float("nan"))],
    ],
)
@pytest.mark.parametrize("impl", ["auto", "reference", pytest.param("cpp", marks=requires_extension)])
def test_bad_instance_maps(inst, message, impl):
    with pytest.raises((ValueError, TypeError), match=message):
        boundary_map(inst, impl=impl)


def test_bad_output_dtype_and_impl():
    inst = torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype must be one of"):
        boundary_map(inst, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown impl='triton'.*choose one of 'auto', 'reference', 'cpu', 'cuda'"):
        boundary_map(inst, impl="triton")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        boundary_map(inst, impl="cuda")


@pytest.mark.parametrize("impl", ["auto", "reference", pytest.param("cpp", marks=requires_extension)])
def test_float_ids_that_require_grad_give_an_output_that_does_not(impl):
    inst = (torch.randint(0, 3, (1, 1, 5, 6)) * 1000.0).requires_grad_(True)
    assert not boundary_map(inst, impl=impl).requires_grad
    assert not torch.ops.fastp2phd.boundary_map(inst, torch.float32).requires_grad
