"""boundary_map's contract: output dtypes and the default, empty inputs, bad instance maps and arguments, ids that
require grad, and its registered operator (opcheck, torch.compile)."""
from __future__ import annotations

import pytest
import torch
from support import requires_extension

from fastp2phd.ops import boundary_map, boundary_map_reference

from .cases import random_ids


@requires_extension
def test_cpp_default_dtype_is_float32():
    out = boundary_map(random_ids((1, 1, 5, 5), torch.int64))
    assert out.dtype == torch.float32


def test_empty_inputs_give_empty_outputs():
    for impl in ("reference", "auto"):
        for shape in ((0, 1, 4, 4), (2, 1, 0, 4), (2, 1, 4, 0)):
            out = boundary_map(torch.zeros(shape, dtype=torch.int32), impl=impl)
            assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize(
    "inst, message",
    [
        (torch.zeros(4, 4, dtype=torch.int32), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 2, 4, 4, dtype=torch.int32), "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.bool), "integer ids"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.float8_e4m3fn), "integer ids"),
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
