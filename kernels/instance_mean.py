"""Triton kernels for instance_mean: every pixel gets the mean feature of its (batch item, id) segment.

The op's contract, reference and torch.library registration live in
``fastp2phd/ops/instance_mean.py``; this module holds the kernels and the launcher.

Segments. Instance ids are arbitrary (Cityscapes: class*1000+k, so ids span
0..~34000 with a few dozen present). The launcher reads the smallest and largest
id (the one host synchronisation of the op) and, when their span is small
enough, uses ``id - lowest`` directly as the segment index, so no id is ever
sorted; otherwise it maps ids to dense indices with ``torch.unique``. Segment
tables are laid out (N, span): a batch item's ids never meet another item's.

Accumulation. Each program takes a tile of BLOCK consecutive pixels of one
batch item (half a row at 2048 wide: spatially coherent, so a tile holds a few
runs of equal ids). A segmented scan sums every run inside the tile and only
the last pixel of each run issues an atomic add, so a road or sky region costs
one float64 atomic per run per tile instead of one per pixel. A second kernel
writes each pixel's segment mean. Float atomics make the summation order, and
so the last bits of the result, vary from run to run; with
``torch.use_deterministic_algorithms(True)`` the op runs its PyTorch reference
on CUDA instead (see ``fastp2phd.ops.instance_mean``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cast_rounded, check_size, new_output, on_device_of, plane_view

BLOCK = 1024  # pixels per tile
# Use ids directly as segment indices while the id span is at most this many
# entries (or P // 8, if larger); beyond that, torch.unique maps them densely.
DIRECT_SPAN = 1 << 16


@triton.jit
def _run_sum(a, a_head, b, b_head):
    """Segmented-scan operator: restart the sum at every run head."""
    return tl.where(b_head, b, a + b), a_head | b_head


@triton.jit
def _segment_sums_kernel(
    feat_ptr,  # (N, C, P) features, any float dtype, strides below
    keys_ptr,  # (N, P) integer or whole-float ids, strides below
    sums_ptr,  # (N * span, C) float64 accumulators, zero on entry
    counts_ptr,  # (N * span,) int32 pixel counts, zero on entry
    lowest, span, P, C,  # segment index = id - lowest, in [0, span)
    stride_fn, stride_fc, stride_fp,  # element strides of feat
    stride_kn, stride_kp,  # element strides of keys
    SCAN_DTYPE: tl.constexpr,  # float32, or float64 for float64 features
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    pixels = tl.program_id(0) * BLOCK + lanes
    valid = pixels < P
    row = keys_ptr + n * stride_kn
    keys = tl.load(row + pixels * stride_kp, mask=valid, other=0).to(tl.int64)
    previous = tl.load(row + (pixels - 1) * stride_kp, mask=valid & (lanes > 0), other=0).to(tl.int64)
    following = tl.load(row + (pixels + 1) * stride_kp, mask=(pixels + 1 < P) & (lanes < BLOCK - 1), other=0)
    head = (lanes == 0) | (keys != previous)
    tail = valid & ((lanes == BLOCK - 1) | (pixels + 1 >= P) | (keys != following.to(tl.int64)))
    segment = n * span + (keys - lowest)
    run_count, _ = tl.associative_scan((valid.to(tl.int32), head), 0, _run_sum)
    tl.atomic_add(counts_ptr + segment, run_count, mask=tail)
    for c in range(C):
        values = tl.load(feat_ptr + n * stride_fn + c * stride_fc + pixels * stride_fp, mask=valid, other=0.0)
        run_total, _ = tl.associative_scan((values.to(SCAN_DTYPE), head), 0, _run_sum)
        tl.atomic_add(sums_ptr + segment * C + c, run_total.to(tl.float64), mask=tail)


@triton.jit
def _broadcast_means_kernel(
    out_ptr,  # (N, C, P) output, strides below
    keys_ptr,  # (N, P) ids, strides below
    means_ptr,  # (N * span, C) segment means
    lowest, span, P, C,
    stride_on, stride_oc, stride_op,  # element strides of out
    stride_kn, stride_kp,  # element strides of keys
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pixels < P
    keys = tl.load(keys_ptr + n * stride_kn + pixels * stride_kp, mask=valid, other=0).to(tl.int64)
    segment = n * span + (keys - lowest)
    for c in range(C):
        mean = tl.load(means_ptr + segment * C + c, mask=valid, other=0.0)
        tl.store(out_ptr + n * stride_on + c * stride_oc + pixels * stride_op,
                 cast_rounded(mean, out_ptr.dtype.element_ty), mask=valid)


def segment_keys(inst: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(keys (N, P), lowest, span): segment index = key - lowest, within [0, span)."""
    N, _, H, W = inst.shape
    keys = inst.reshape(N, H * W)
    if keys.is_floating_point():  # integers compare exactly; the cast needs whole numbers in int64's range
        wide = keys.double()
        if not bool(((wide == wide.trunc()) & (wide >= -2.0**63) & (wide < 2.0**63)).all()):
            raise ValueError("instance_mean: float instance ids must be whole numbers within int64's range (no "
                             "fractions, NaN, inf or values beyond ±9.2e18); pass integer ids")
        keys = keys.to(torch.int64)
    lowest, highest = torch.stack(torch.aminmax(keys)).tolist()  # the op's one host sync
    span = highest - lowest + 1
    if span > max(DIRECT_SPAN, H * W // 8):
        unique, inverse = torch.unique(keys, return_inverse=True)
        return inverse.to(torch.int32), 0, unique.numel()
    return keys, lowest, span


def forward(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """Segment means of ``feat`` (N, C, H, W) over ``inst`` (N, 1, H, W), in feat's dtype and layout."""
    N, C, H, W = feat.shape
    P = H * W
    feat, (stride_fn, stride_fc, stride_fp) = plane_view(feat, "instance_mean")
    out, (stride_on, stride_oc, stride_op) = new_output(feat, "instance_mean")
    if feat.numel() == 0:
        return out
    keys, lowest, span = segment_keys(inst)
    check_size(keys, "instance_mean")
    sums = torch.zeros(N * span, C, device=feat.device, dtype=torch.float64)
    counts = torch.zeros(N * span, device=feat.device, dtype=torch.int32)
    grid = (triton.cdiv(P, BLOCK), N)
    with on_device_of(feat):
        _segment_sums_kernel[grid](
            feat, keys, sums, counts, lowest, span, P, C, stride_fn, stride_fc, stride_fp,
            keys.stride(0), keys.stride(1), SCAN_DTYPE=tl.float64 if feat.dtype == torch.float64 else tl.float32,
            BLOCK=BLOCK,
        )
        # Empty segments (ids absent from an item) divide by 1 and are never read.
        means = (sums / counts.clamp_min(1)[:, None]).to(torch.promote_types(feat.dtype, torch.float32))
        _broadcast_means_kernel[grid](
            out, keys, means, lowest, span, P, C, stride_on, stride_oc, stride_op,
            keys.stride(0), keys.stride(1), BLOCK=BLOCK,
        )
    return out
