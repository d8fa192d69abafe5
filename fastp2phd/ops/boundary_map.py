"""boundary_map: the instance boundary map pix2pixHD feeds its generator.

Contract: ``inst`` (N, 1, H, W) holds instance ids (uint8..int64, or float
holding whole numbers). The result (N, 1, H, W) is 1 where any of the pixel's
4 neighbours holds a different id and 0 elsewhere; pixels outside the image do
not count, so image borders never create edges. This equals scikit-image's
``find_boundaries(ids, mode="thick", connectivity=1)`` on each 2D slice.

Fast paths: ``"cpu"`` (C++, one pass, threads over rows) and ``"cuda"`` (CUDA C++), the
kernels of ``torch.ops.fastp2phd.boundary_map`` in the C++/CUDA extension (where
it is absent, the operator runs the reference). The output never requires grad:
ids are not differentiable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_instance_map
from ._dispatch import FastPath, select
from ._library import extension_kernel_missing, op, register_kernel

OUTPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool)


def boundary_map_reference(inst: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pure-PyTorch boundary map: compare every pixel with its right and lower neighbour."""
    horizontal = inst[..., :, 1:] != inst[..., :, :-1]  # (N, 1, H, W-1): pixel x differs from x+1
    vertical = inst[..., 1:, :] != inst[..., :-1, :]  # (N, 1, H-1, W): row y differs from y+1
    # Each difference marks the pixels on both of its sides; padding with "no difference"
    # keeps borders edge-free.
    h = horizontal.to(torch.uint8)
    v = vertical.to(torch.uint8)
    edge = F.pad(h, (1, 0)) | F.pad(h, (0, 1)) | F.pad(v, (0, 0, 1, 0)) | F.pad(v, (0, 0, 0, 1))
    return edge.to(dtype)


# ----------------------------------------------------------------------------- the operator

_OP = op("boundary_map")
# Where the extension is absent (or built without CUDA), the operator runs the reference.
register_kernel("boundary_map", "CPU", boundary_map_reference)
register_kernel("boundary_map", "CUDA", boundary_map_reference)


@torch.library.register_fake("fastp2phd::boundary_map")
def _boundary_map_fake(inst: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    torch._check(inst.dim() == 4 and inst.shape[1] == 1,
                 lambda: f"boundary_map: inst must have shape (N, 1, H, W), got {tuple(inst.shape)}")
    torch._check(not inst.is_complex() and inst.dtype != torch.bool,
                 lambda: f"boundary_map: instance ids must be an integer or float tensor, got {inst.dtype}")
    torch._check(dtype in OUTPUT_DTYPES, lambda: f"boundary_map: unsupported output dtype {dtype}")
    return inst.new_empty(inst.shape, dtype=dtype)


def _no_gradient(ctx, inputs, output):
    ctx.mark_non_differentiable(output)  # ids are not differentiable, even as float tensors


torch.library.register_autograd("fastp2phd::boundary_map", lambda ctx, grad: (None, None), setup_context=_no_gradient)

FAST_PATHS = (
    FastPath("cpu", "C++", extension_kernel_missing("boundary_map", "CPU"), _OP, aliases=("cpp",)),
    FastPath("cuda", "CUDA C++", extension_kernel_missing("boundary_map", "CUDA"), _OP),
)


def boundary_map(inst: torch.Tensor, *, dtype: torch.dtype = torch.float32, impl: str = "auto") -> torch.Tensor:
    """The instance boundary map pix2pixHD feeds its generator.

    ``inst``: (N, 1, H, W) instance ids: uint8, int8, int16, int32 or int64, or a float tensor
    holding whole numbers (checked: one extra pass; pass integer ids where speed matters). Any
    strided view is accepted.

    Returns an (N, 1, H, W) tensor of ``dtype`` (float32, float64, float16, bfloat16, uint8 or
    bool; default float32) that is 1 where any of a pixel's 4 neighbours (up, down, left,
    right) holds a different id and 0 elsewhere. Pixels outside the image do not count, so
    image borders never make edges; batch items are independent. This equals scikit-image's
    ``find_boundaries(ids, mode="thick", connectivity=1)`` on each (H, W) slice. The output
    never requires grad (ids are not differentiable).

    ``impl``: "auto" (the fastest path for the device), "reference" (PyTorch), "cpu" (C++; "cpp"
    is its earlier name) or "cuda"; a named path that cannot run here raises instead of falling back.
    """
    check_instance_map("boundary_map", inst)
    if dtype not in OUTPUT_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in OUTPUT_DTYPES)
        raise TypeError(f"boundary_map: dtype must be one of {allowed}, got {dtype}")
    path = select("boundary_map", impl, inst.device, FAST_PATHS)
    if path is None:
        return boundary_map_reference(inst, dtype)
    return path.run(inst, dtype)
