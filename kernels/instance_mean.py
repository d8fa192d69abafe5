"""Triton kernels for instance_mean: every pixel gets the mean feature of its (batch item, id) segment.

The op's contract, reference and torch.library registration live in
``fastp2phd/ops/instance_mean.py``; this module holds the kernels and the launcher.

Segments. Instance ids are arbitrary (Cityscapes: class*1000+k; any int64 or
whole float). The op numbers each batch item's segments 0, 1, ... by sorting its
ids (``segment_index`` in ``fastp2phd/ops/instance_mean.py``, shared with the
reference), and the kernels take that index, one per pixel. The tables then have
one slot per pixel, a size known before any id is read: the op never waits for
the GPU (no ``.item()``, ``.tolist()``, ``torch.unique`` or ``nonzero``), so it
can be captured in a CUDA graph. For N x C x P features it allocates, besides
its output: while numbering, at most (id bytes + 33) bytes per pixel (sorted
ids, order, running count, the index); while the kernels run, the int64 index,
float64 sums and int32 counts, 12 + 8C bytes per pixel (36 for C = 3, three
times the float32 features).

Accumulation. Each program takes a tile of BLOCK consecutive pixels of one
batch item (half a row at 2048 wide: spatially coherent, so a tile holds a few
runs of equal ids). A segmented scan sums every run inside the tile and only
the last pixel of each run issues an atomic add, so a road or sky region costs
one float64 atomic per run per tile instead of one per pixel. The scan too sums in float64 (float32 lost up to
65 ulps of the mean over a tile of values far from zero, and overflowed near its largest values). A second kernel
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


@triton.jit
def _run_sum(a, a_head, b, b_head):
    """Segmented-scan operator: restart the sum at every run head."""
    return tl.where(b_head, b, a + b), a_head | b_head


@triton.jit
def _segment_sums_kernel(
    feat_ptr,  # (N, C, P) features, any float dtype, strides below
    segment_ptr,  # (N, P) int64 segment of every pixel, in [0, P), contiguous
    sums_ptr,  # (N * P, C) float64 accumulators, zero on entry
    counts_ptr,  # (N * P,) int32 pixel counts, zero on entry
    P, C,
    stride_fn, stride_fc, stride_fp,  # element strides of feat
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    pixels = tl.program_id(0) * BLOCK + lanes
    valid = pixels < P
    row = segment_ptr + n * P
    segment = tl.load(row + pixels, mask=valid, other=0)
    previous = tl.load(row + pixels - 1, mask=valid & (lanes > 0), other=0)
    following = tl.load(row + pixels + 1, mask=(pixels + 1 < P) & (lanes < BLOCK - 1), other=0)
    head = (lanes == 0) | (segment != previous)
    tail = valid & ((lanes == BLOCK - 1) | (pixels + 1 >= P) | (segment != following))
    slot = n * P + segment  # a batch item's segments never meet another item's
    run_count, _ = tl.associative_scan((valid.to(tl.int32), head), 0, _run_sum)
    tl.atomic_add(counts_ptr + slot, run_count, mask=tail)
    for c in range(C):
        values = tl.load(feat_ptr + n * stride_fn + c * stride_fc + pixels * stride_fp, mask=valid, other=0.0)
        run_total, _ = tl.associative_scan((values.to(tl.float64), head), 0, _run_sum)
        tl.atomic_add(sums_ptr + slot * C + c, run_total, mask=tail)


@triton.jit
def _broadcast_means_kernel(
    out_ptr,  # (N, C, P) output, strides below
    segment_ptr,  # (N, P) int64 segments, contiguous
    sums_ptr,  # (N * P, C) float64 segment sums
    counts_ptr,  # (N * P,) int32 segment sizes
    P, C,
    stride_on, stride_oc, stride_op,  # element strides of out
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1)
    pixels = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = pixels < P
    slot = n * P + tl.load(segment_ptr + n * P + pixels, mask=valid, other=0)
    count = tl.load(counts_ptr + slot, mask=valid, other=1).to(tl.float64)
    for c in range(C):
        mean = tl.load(sums_ptr + slot * C + c, mask=valid, other=0.0) / count
        tl.store(out_ptr + n * stride_on + c * stride_oc + pixels * stride_op,
                 cast_rounded(mean, out_ptr.dtype.element_ty), mask=valid)


def forward(feat: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Segment means of ``feat`` (N, C, H, W) in feat's dtype and layout; ``segment`` (N, H*W) int64 numbers
    each pixel's segment within its batch item, below H*W (``fastp2phd.ops.instance_mean.segment_index``)."""
    N, C, H, W = feat.shape
    P = H * W
    feat, (stride_fn, stride_fc, stride_fp) = plane_view(feat, "instance_mean")
    out, (stride_on, stride_oc, stride_op) = new_output(feat, "instance_mean")
    if feat.numel() == 0:
        return out
    segment = segment.contiguous()
    check_size(segment, "instance_mean")
    sums = torch.zeros(N * P, C, device=feat.device, dtype=torch.float64)
    counts = torch.zeros(N * P, device=feat.device, dtype=torch.int32)
    grid = (triton.cdiv(P, BLOCK), N)
    with on_device_of(feat):
        _segment_sums_kernel[grid](
            feat, segment, sums, counts, P, C, stride_fn, stride_fc, stride_fp, BLOCK=BLOCK,
        )
        _broadcast_means_kernel[grid](out, segment, sums, counts, P, C, stride_on, stride_oc, stride_op, BLOCK=BLOCK)
    return out
