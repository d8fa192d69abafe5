"""boundary_map's CUDA kernel on a CUDA device: every id and output dtype against the reference, a full-resolution
batch, opcheck and torch.compile, the layout fuzz. Skipped without a GPU; ``bench/gpu_check.sh`` runs it on one."""
from __future__ import annotations

import random

import pytest
import torch
from layouts import VIEW_KINDS, check_boundary_map
from support import cityscapes_like

from fastp2phd import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool])
def test_boundary_map_cuda_matches_reference(id_dtype, out_dtype):
    for shape in ((1, 1, 1, 1), (1, 1, 1, 37), (1, 1, 37, 1), (3, 1, 17, 300)):
        inst = torch.randint(0, 4, shape, device=CUDA).to(id_dtype)
        assert torch.equal(ops.boundary_map(inst, dtype=out_dtype, impl="cuda"),
                           ops.boundary_map(inst, dtype=out_dtype, impl="reference"))


def test_boundary_map_cuda_full_resolution_batch():
    inst = cityscapes_like(4, 1024, 2048, seed=0).to(CUDA)
    assert torch.equal(ops.boundary_map(inst, impl="cuda"), ops.boundary_map(inst.cpu(), impl="cpp").to(CUDA))


def test_boundary_map_cuda_opcheck_and_compile():
    inst = torch.randint(0, 4, (2, 1, 33, 65), device=CUDA, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastp2phd.boundary_map.default, (inst, torch.float32))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.boundary_map(t) * 3, fullgraph=True)
    assert torch.equal(compiled(inst), ops.boundary_map(inst, impl="reference") * 3)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_boundary_map_cuda(kind, seed, poisoned_empty):
    check_boundary_map("cuda", CUDA, random.Random(f"cuda boundary {kind} {seed}"), kind)
