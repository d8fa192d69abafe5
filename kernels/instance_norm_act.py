"""Triton kernels for instance_norm_act: y = act((x - mean) * rstd) per (n, c) plane.

The op's contract, reference and torch.library registration live in
``fastp2phd/ops/instance_norm_act.py``; this module holds the kernels and the
launchers that pick their tiling.

Layout. A plane's H*W pixels are addressed as one axis P with stride ``stride_p``,
which covers contiguous NCHW (stride_p = 1, stride_c = H*W) and channels_last
(stride_p = C, stride_c = 1) alike; Triton specialises strides equal to 1, so the
contiguous axis of each layout gets vectorised loads. Each program works on a
[BLOCK_C channels, BLOCK_P pixels] tile: BLOCK_C = 1..16 whole planes for NCHW,
a run of channels of the same pixels for channels_last.

Work split. pix2pixHD's big layers have few, huge planes (64 planes of 524288
pixels at 1024x512), its deep layers many small ones (1024 planes of 2048 pixels
at batch 1). When every program can own whole planes and there are enough of
them to fill the GPU, one kernel per direction does everything: statistics,
then the output, reading the input once from memory (the second read hits the
cache). Otherwise each direction runs in two phases over a grid of
(n, channel block) x (chunk of pixels):

  phase 1  every program reduces its chunk to partial statistics
           (forward: mean and M2 of the chunk; backward: sums of g and g * xhat);
  phase 2  every program merges its planes' partials (a few dozen numbers, in
           float64) and writes its chunk of the output.

Numerics. Each tile's mean is a float64 sum (relative to the plane's first
value), its M2 a two-pass sum about that mean, and tiles and chunks are merged with Chan's formula in float64, so neither
uniform regions nor planes far from zero lose precision; the backward's sums are
accumulated in float64 too. The mean is
returned in float64, and xhat = ((x - hi) - lo) * rstd with mean = hi + lo split
into two floats: x - hi is exact near the mean, so the sign of xhat, which picks
the activation's branch in both directions, is the sign of x - mean as in
float64. float64 input is computed in float64 throughout (eps and slope are
float64 arguments, square roots and divisions of the statistics round correctly).

Backward. With g = dy * act'(xhat): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
with xhat recomputed from the saved input x exactly as the forward computed it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import ACTIVATIONS, stats_dtype
from . import cast_rounded, new_output, on_device_of, plane_view

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
RELU = tl.constexpr(ACTIVATION_CODES["relu"])
LEAKY_RELU = tl.constexpr(ACTIVATION_CODES["leaky_relu"])

# Phase 2 merges at most this many partials per plane; keep it a power of two.
MAX_CHUNKS = 128
# Aim for this many programs per phase: a few waves on a 132-SM H100.
TARGET_PROGRAMS = 1024
# Elements per tile, and warps for a full tile: 8 elements of each loaded tensor per thread (see _warps).
TILE_ELEMENTS = 2048
TILE_WARPS = 8


@triton.jit
def _activate(xhat, ACTIVATION: tl.constexpr, slope):
    if ACTIVATION == RELU:
        return tl.where(xhat < 0, 0.0, xhat)  # NaN stays NaN, as in F.relu
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(xhat > 0, xhat, xhat * slope)
    else:
        return xhat


@triton.jit
def _as_compute(scalar, ACC_DTYPE: tl.constexpr):
    """A float64 scalar argument as a value of the compute dtype. (The interpreter passes it as a
    Python float, which Triton's arithmetic would round to float32 first: tl.full keeps it exact.)"""
    return tl.full([], scalar, ACC_DTYPE)


@triton.jit
def _tile(pid_nc, C, num_c_blocks, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """This program's batch item, channels, channel mask, rows (n * C + c) and plane start offsets."""
    n = pid_nc // num_c_blocks
    channels = (pid_nc % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, channels, channels < C, n * C + channels, n * stride_n + channels * stride_c


@triton.jit
def _split_mean(mean, acc_dtype: tl.constexpr):
    """hi + lo = mean (float64), as two values of the compute dtype (lo = 0 in float64)."""
    hi = mean.to(acc_dtype)
    return hi, (mean - hi.to(tl.float64)).to(acc_dtype)


@triton.jit
def _first_values(x_ptr, plane_offsets, c_mask, ACC_DTYPE: tl.constexpr):
    """Each plane's first value, in float64: the origin of its moments."""
    return tl.load(x_ptr + plane_offsets, mask=c_mask, other=0.0).to(ACC_DTYPE).to(tl.float64)


@triton.jit
def _chunk_moments(x_ptr, plane_offsets, c_mask, origin, start, end, stride_p,
                   ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """float64 mean (relative to ``origin``) and M2 over pixels [start, end) of this program's planes.
    Each tile's mean is a float64 tree sum (no float32 drift on uniform regions or far from zero; relative
    to the first value, a constant float64 plane sums to exactly 0); its M2 is a float64 sum of squares
    about that mean rounded to the compute dtype (x - it is exact near the mean), corrected to the exact
    mean; tiles are merged with Chan's formula in float64."""
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        p_mask = pixels < end
        mask = c_mask[:, None] & p_mask[None, :]
        x = tl.load(x_ptr + plane_offsets[:, None] + pixels[None, :] * stride_p, mask=mask, other=0.0).to(ACC_DTYPE)
        block_count = tl.sum(p_mask.to(tl.float64), axis=0)
        block_mean = tl.sum(tl.where(mask, x.to(tl.float64) - origin[:, None], 0.0), axis=1) / block_count
        rounded = (origin + block_mean).to(ACC_DTYPE)
        deviation = tl.where(mask, x - rounded[:, None], 0.0)
        offset = (origin - rounded.to(tl.float64)) + block_mean
        block_m2 = tl.sum((deviation * deviation).to(tl.float64), axis=1) - block_count * offset * offset
        # Chan et al.: merge (count, mean, m2) with the tile's.
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
        count = total
    return mean, m2


@triton.jit
def _rstd(m2, P, eps, ACC_DTYPE: tl.constexpr):
    """1 / sqrt(var + eps) in the compute dtype, from a plane's float64 M2."""
    eps = _as_compute(eps, tl.float64)
    # In float64, division and square root round correctly on the GPU (float32's are approximate there).
    # Where var + eps is 0 (a constant or one-value plane, eps = 0), rstd is 0 as PyTorch's invstd is, so y and dx
    # are 0 (1 / 0 would make them 0 * inf = NaN).
    var = m2 / P
    rstd = tl.where(var + eps == 0, 0.0, 1.0 / tl.sqrt(var + eps))
    return rstd.to(ACC_DTYPE)


@triton.jit
def _normalize_chunk(x_ptr, y_ptr, plane_offsets, y_plane_offsets, c_mask, hi, lo, rstd, start, end,
                     stride_p, y_stride_p, slope, ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr):
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        x = tl.load(x_ptr + plane_offsets[:, None] + pixels[None, :] * stride_p, mask=mask, other=0.0).to(hi.dtype)
        y = _activate(((x - hi[:, None]) - lo[:, None]) * rstd[:, None], ACTIVATION, slope)
        tl.store(y_ptr + y_plane_offsets[:, None] + pixels[None, :] * y_stride_p,
                 cast_rounded(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_fused_kernel(
    x_ptr,  # (N, C, P) input, any float dtype, strides below
    y_ptr,  # (N, C, P) output, strides below
    mean_ptr,  # (N*C,) float64 plane means
    rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane 1 / sqrt(var + eps)
    C, P, num_c_blocks,
    stride_n, stride_c, stride_p,  # element strides of x (a view: may be 0, or exceed the dense ones)
    y_stride_n, y_stride_c, y_stride_p,  # element strides of y (a fresh dense tensor)
    eps: tl.float64, slope: tl.float64,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Whole planes per program: statistics, then y (one kernel; x's second read comes from the cache)."""
    n, channels, c_mask, rows, plane_offsets = _tile(tl.program_id(0), C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    origin = _first_values(x_ptr, plane_offsets, c_mask, ACC_DTYPE)
    mean, m2 = _chunk_moments(x_ptr, plane_offsets, c_mask, origin, 0, P, stride_p, ACC_DTYPE, BLOCK_C, BLOCK_P)
    mean += origin
    rstd = _rstd(m2, P, eps, ACC_DTYPE)
    tl.store(mean_ptr + rows, mean, mask=c_mask)
    tl.store(rstd_ptr + rows, rstd, mask=c_mask)
    hi, lo = _split_mean(mean, ACC_DTYPE)
    _normalize_chunk(x_ptr, y_ptr, plane_offsets, n * y_stride_n + channels * y_stride_c, c_mask, hi, lo, rstd,
                     0, P, stride_p, y_stride_p, _as_compute(slope, ACC_DTYPE), ACTIVATION, BLOCK_P)


@triton.jit
def _forward_stats_kernel(
    x_ptr,  # (N, C, P) input, any float dtype, strides below
    partial_mean_ptr,  # (N*C, num_chunks) float64: mean of each plane's chunk, relative to its first value
    partial_m2_ptr,  # (N*C, num_chunks) float64: sum of squared deviations of each chunk
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, c_mask, rows, plane_offsets = _tile(tl.program_id(0), C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    start = chunk * chunk_size
    mean, m2 = _chunk_moments(x_ptr, plane_offsets, c_mask, _first_values(x_ptr, plane_offsets, c_mask, ACC_DTYPE), start,
                              tl.minimum(start + chunk_size, P), stride_p, ACC_DTYPE, BLOCK_C, BLOCK_P)
    tl.store(partial_mean_ptr + rows * num_chunks + chunk, mean, mask=c_mask)
    tl.store(partial_m2_ptr + rows * num_chunks + chunk, m2, mask=c_mask)


@triton.jit
def _forward_normalize_kernel(
    x_ptr,  # (N, C, P) input
    y_ptr,  # (N, C, P) output, strides below
    partial_mean_ptr, partial_m2_ptr,  # (N*C, num_chunks) float64 partials from phase 1
    mean_ptr,  # (N*C,) float64 plane means, written by the chunk-0 programs
    rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane 1 / sqrt(var + eps), likewise
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x (a view: may be 0, or exceed the dense ones)
    y_stride_n, y_stride_c, y_stride_p,  # element strides of y (a fresh dense tensor)
    eps: tl.float64, slope: tl.float64,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    MAX_CHUNKS_P2: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, c_mask, rows, plane_offsets = _tile(tl.program_id(0), C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    # Merge the planes' chunk moments in float64.
    chunks = tl.arange(0, MAX_CHUNKS_P2)
    k_mask = chunks < num_chunks
    mask = c_mask[:, None] & k_mask[None, :]
    index = rows[:, None] * num_chunks + chunks[None, :]
    means = tl.load(partial_mean_ptr + index, mask=mask, other=0.0)
    m2s = tl.load(partial_m2_ptr + index, mask=mask, other=0.0)
    counts = tl.where(k_mask, tl.minimum(chunk_size, P - chunks * chunk_size), 0).to(tl.float64)
    mean = tl.sum(means * counts[None, :], axis=1) / P
    deviation = tl.where(mask, means - mean[:, None], 0.0)
    m2 = tl.sum(m2s + deviation * deviation * counts[None, :], axis=1)
    mean += _first_values(x_ptr, plane_offsets, c_mask, ACC_DTYPE)
    rstd = _rstd(m2, P, eps, ACC_DTYPE)
    if chunk == 0:
        tl.store(mean_ptr + rows, mean, mask=c_mask)
        tl.store(rstd_ptr + rows, rstd, mask=c_mask)
    hi, lo = _split_mean(mean, ACC_DTYPE)
    start = chunk * chunk_size
    _normalize_chunk(x_ptr, y_ptr, plane_offsets, n * y_stride_n + channels * y_stride_c, c_mask, hi, lo, rstd,
                     start, tl.minimum(start + chunk_size, P), stride_p, y_stride_p, _as_compute(slope, ACC_DTYPE), ACTIVATION,
                     BLOCK_P)


@triton.jit
def _load_xhat_and_grad(x_ptr, dy_ptr, offsets, dy_offsets, mask, hi, lo, rstd, slope, ACTIVATION: tl.constexpr):
    """xhat, exactly as the forward computes it, and g = dy * act'(xhat) (compute dtype)."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(rstd.dtype)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(rstd.dtype)
    xhat = ((x - hi[:, None]) - lo[:, None]) * rstd[:, None]
    if ACTIVATION == RELU:
        g = tl.where(xhat > 0, dy, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        g = tl.where(xhat > 0, dy, dy * slope)
    else:
        g = dy
    return xhat, g


@triton.jit
def _backward_tile(mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c,
                   ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch item, channels, rows, channel mask, plane offsets in x and dy, and
    the plane statistics: hi + lo = mean, and rstd."""
    n, channels, c_mask, rows, plane_offsets = _tile(tl.program_id(0), C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    hi, lo = _split_mean(tl.load(mean_ptr + rows, mask=c_mask, other=0.0), ACC_DTYPE)
    rstd = tl.load(rstd_ptr + rows, mask=c_mask, other=0.0)
    return n, channels, rows, c_mask, plane_offsets, n * dy_stride_n + channels * dy_stride_c, hi, lo, rstd


@triton.jit
def _chunk_grad_sums(x_ptr, dy_ptr, plane_offsets, dy_offsets, c_mask, hi, lo, rstd, slope, start, end,
                     stride_p, dy_stride_p, ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Sums of g and g * xhat over pixels [start, end) of this program's planes: tree sums per tile,
    accumulated across tiles in float64."""
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        xhat, g = _load_xhat_and_grad(x_ptr, dy_ptr, plane_offsets[:, None] + pixels[None, :] * stride_p,
                                      dy_offsets[:, None] + pixels[None, :] * dy_stride_p, mask, hi, lo, rstd,
                                      slope, ACTIVATION)
        g = tl.where(mask, g, 0.0)
        sum_g += tl.sum(g, axis=1).to(tl.float64)
        sum_gx += tl.sum(g * xhat, axis=1).to(tl.float64)
    return sum_g, sum_gx


@triton.jit
def _dx_chunk(x_ptr, dy_ptr, dx_ptr, plane_offsets, dy_offsets, dx_offsets, c_mask, hi, lo, rstd, slope,
              mean_g, mean_gx, start, end, stride_p, dy_stride_p, dx_stride_p,
              ACTIVATION: tl.constexpr, BLOCK_P: tl.constexpr):
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        xhat, g = _load_xhat_and_grad(x_ptr, dy_ptr, plane_offsets[:, None] + pixels[None, :] * stride_p,
                                      dy_offsets[:, None] + pixels[None, :] * dy_stride_p, mask, hi, lo, rstd,
                                      slope, ACTIVATION)
        dx = rstd[:, None] * ((g - mean_g[:, None]) - xhat * mean_gx[:, None])
        tl.store(dx_ptr + dx_offsets[:, None] + pixels[None, :] * dx_stride_p,
                 cast_rounded(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_fused_kernel(
    dy_ptr, x_ptr,  # (N, C, P) gradient of y, and the op's input x (views)
    dx_ptr,  # (N, C, P) gradient of x, strides below
    mean_ptr,  # (N*C,) float64 plane means
    rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane 1 / sqrt(var + eps)
    C, P, num_c_blocks,
    stride_n, stride_c, stride_p,  # element strides of x
    dy_stride_n, dy_stride_c, dy_stride_p,  # element strides of dy (often expanded: stride 0)
    dx_stride_n, dx_stride_c, dx_stride_p,  # element strides of dx (a fresh dense tensor)
    slope: tl.float64,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Whole planes per program: the sums, then dx (one kernel)."""
    n, channels, rows, c_mask, plane_offsets, dy_offsets, hi, lo, rstd = _backward_tile(
        mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c, ACC_DTYPE, BLOCK_C)
    slope_c = _as_compute(slope, ACC_DTYPE)
    sum_g, sum_gx = _chunk_grad_sums(x_ptr, dy_ptr, plane_offsets, dy_offsets, c_mask, hi, lo, rstd, slope_c,
                                     0, P, stride_p, dy_stride_p, ACTIVATION, BLOCK_C, BLOCK_P)
    _dx_chunk(x_ptr, dy_ptr, dx_ptr, plane_offsets, dy_offsets, n * dx_stride_n + channels * dx_stride_c, c_mask,
              hi, lo, rstd, slope_c, (sum_g / P).to(ACC_DTYPE), (sum_gx / P).to(ACC_DTYPE), 0, P, stride_p,
              dy_stride_p, dx_stride_p, ACTIVATION, BLOCK_P)


@triton.jit
def _backward_sums_kernel(
    dy_ptr,  # (N, C, P) gradient of y
    x_ptr,  # (N, C, P) the op's input
    mean_ptr,  # (N*C,) float64 plane means
    rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane 1 / sqrt(var + eps)
    partial_g_ptr, partial_gx_ptr,  # (N*C, num_chunks) float64: chunk sums of g and g * xhat
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x
    dy_stride_n, dy_stride_c, dy_stride_p,  # element strides of dy
    slope: tl.float64,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, rows, c_mask, plane_offsets, dy_offsets, hi, lo, rstd = _backward_tile(
        mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c, ACC_DTYPE, BLOCK_C)
    start = chunk * chunk_size
    sum_g, sum_gx = _chunk_grad_sums(x_ptr, dy_ptr, plane_offsets, dy_offsets, c_mask, hi, lo, rstd,
                                     _as_compute(slope, ACC_DTYPE), start, tl.minimum(start + chunk_size, P), stride_p,
                                     dy_stride_p, ACTIVATION, BLOCK_C, BLOCK_P)
    tl.store(partial_g_ptr + rows * num_chunks + chunk, sum_g, mask=c_mask)
    tl.store(partial_gx_ptr + rows * num_chunks + chunk, sum_gx, mask=c_mask)


@triton.jit
def _backward_dx_kernel(
    dy_ptr, x_ptr,  # (N, C, P) gradient of y, and the op's input x
    dx_ptr,  # (N, C, P) gradient of x, strides below
    mean_ptr, rstd_ptr,  # (N*C,) plane statistics (float64 mean; rstd in the compute dtype)
    partial_g_ptr, partial_gx_ptr,  # (N*C, num_chunks) float64 chunk sums from the previous kernel
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x (a view: may be 0, or exceed the dense ones)
    dy_stride_n, dy_stride_c, dy_stride_p,  # element strides of dy (a view, likewise)
    dx_stride_n, dx_stride_c, dx_stride_p,  # element strides of dx (a fresh dense tensor)
    slope: tl.float64,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, MAX_CHUNKS_P2: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, rows, c_mask, plane_offsets, dy_offsets, hi, lo, rstd = _backward_tile(
        mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c, ACC_DTYPE, BLOCK_C)
    chunks = tl.arange(0, MAX_CHUNKS_P2)
    k_mask = c_mask[:, None] & (chunks < num_chunks)[None, :]
    index = rows[:, None] * num_chunks + chunks[None, :]
    mean_g = tl.sum(tl.load(partial_g_ptr + index, mask=k_mask, other=0.0), axis=1) / P
    mean_gx = tl.sum(tl.load(partial_gx_ptr + index, mask=k_mask, other=0.0), axis=1) / P
    start = chunk * chunk_size
    _dx_chunk(x_ptr, dy_ptr, dx_ptr, plane_offsets, dy_offsets, n * dx_stride_n + channels * dx_stride_c, c_mask,
              hi, lo, rstd, _as_compute(slope, ACC_DTYPE), mean_g.to(ACC_DTYPE), mean_gx.to(ACC_DTYPE), start,
              tl.minimum(start + chunk_size, P), stride_p, dy_stride_p, dx_stride_p, ACTIVATION, BLOCK_P)


# ----------------------------------------------------------------------------- launchers


def _tiling(N: int, C: int, P: int, stride_c: int, stride_p: int) -> tuple[int, int, int, int, int]:
    """BLOCK_C, BLOCK_P, channel blocks, chunk size and chunk count for this shape and layout.
    One chunk (chunk size >= P) means whole planes per program: the fused kernels."""
    if stride_c == 1 and C > 1:  # channels_last: a tile is a run of channels of the same pixels
        block_c = min(triton.next_power_of_2(C), 16)
    else:  # NCHW: a tile is one or more whole planes (many small planes share a program)
        block_c = max(1, min(16, TILE_ELEMENTS // triton.next_power_of_2(P), triton.next_power_of_2(C)))
    block_p = max(16, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(P)))
    c_blocks = triton.cdiv(C, block_c)
    wanted = triton.cdiv(TARGET_PROGRAMS, N * c_blocks)
    num_chunks = max(1, min(wanted, triton.cdiv(P, block_p), MAX_CHUNKS))
    chunk_size = triton.cdiv(triton.cdiv(P, num_chunks), block_p) * block_p
    num_chunks = triton.cdiv(P, chunk_size)
    return block_c, block_p, c_blocks, chunk_size, num_chunks


def _warps(block_c: int, block_p: int, dtype: torch.dtype) -> int:
    """Warps for a tile. A float64 tile takes twice the registers: twice the warps keep each thread's share as
    for the other dtypes (at 8 warps Triton 3.6's ptxas spilled the fused forward on channels_last tiles)."""
    warps = TILE_WARPS if block_c * block_p >= TILE_ELEMENTS else 4
    return 2 * warps if dtype == torch.float64 else warps


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, activation: str, negative_slope: float, eps: float):
    """(y, mean, rstd): y a new tensor in x's dtype and memory format; mean (N*C,) float64, rstd (N*C,)
    float32 (float64 for float64 x). ``x`` may be any view; see ``plane_view``."""
    N, C, H, W = x.shape
    P = H * W
    x, (stride_n, stride_c, stride_p) = plane_view(x, "instance_norm_act")
    y, (y_stride_n, y_stride_c, y_stride_p) = new_output(x, "instance_norm_act")
    mean = torch.empty(N * C, device=x.device, dtype=torch.float64)
    rstd = torch.empty(N * C, device=x.device, dtype=stats_dtype(x.dtype))
    if x.numel() == 0:
        return y, mean, rstd
    block_c, block_p, c_blocks, chunk_size, num_chunks = _tiling(N, C, P, stride_c, stride_p)
    common = dict(ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_P=block_p,
                  num_warps=_warps(block_c, block_p, x.dtype))
    activation_code = ACTIVATION_CODES[activation]
    with on_device_of(x):
        if num_chunks == 1:
            _forward_fused_kernel[(N * c_blocks,)](
                x, y, mean, rstd, C, P, c_blocks, stride_n, stride_c, stride_p, y_stride_n, y_stride_c, y_stride_p,
                eps, negative_slope, ACTIVATION=activation_code, **common)
            return y, mean, rstd
        partial_mean = torch.empty(N * C, num_chunks, device=x.device, dtype=torch.float64)
        partial_m2 = torch.empty_like(partial_mean)
        grid = (N * c_blocks, num_chunks)
        _forward_stats_kernel[grid](
            x, partial_mean, partial_m2, C, P, c_blocks, num_chunks, chunk_size, stride_n, stride_c, stride_p,
            **common)
        _forward_normalize_kernel[grid](
            x, y, partial_mean, partial_m2, mean, rstd, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, y_stride_n, y_stride_c, y_stride_p, eps, negative_slope,
            ACTIVATION=activation_code, MAX_CHUNKS_P2=triton.next_power_of_2(num_chunks), **common)
    return y, mean, rstd


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """dx, a new tensor in x's dtype and memory format, from dy and the op's input x and statistics;
    dy and x may be any views (dy is often expanded, stride 0)."""
    N, C, H, W = x.shape
    P = H * W
    x, (stride_n, stride_c, stride_p) = plane_view(x, "instance_norm_act")
    dy, (dy_stride_n, dy_stride_c, dy_stride_p) = plane_view(dy, "instance_norm_act")
    dx, (dx_stride_n, dx_stride_c, dx_stride_p) = new_output(x, "instance_norm_act")
    if x.numel() == 0:
        return dx
    block_c, block_p, c_blocks, chunk_size, num_chunks = _tiling(N, C, P, stride_c, stride_p)
    common = dict(ACTIVATION=ACTIVATION_CODES[activation], ACC_DTYPE=_acc_dtype(x.dtype), BLOCK_C=block_c,
                  BLOCK_P=block_p, num_warps=_warps(block_c, block_p, x.dtype))
    with on_device_of(x):
        if num_chunks == 1:
            _backward_fused_kernel[(N * c_blocks,)](
                dy, x, dx, mean, rstd, C, P, c_blocks, stride_n, stride_c, stride_p,
                dy_stride_n, dy_stride_c, dy_stride_p, dx_stride_n, dx_stride_c, dx_stride_p, negative_slope,
                **common)
            return dx
        partial_g = torch.empty(N * C, num_chunks, device=x.device, dtype=torch.float64)
        partial_gx = torch.empty_like(partial_g)
        grid = (N * c_blocks, num_chunks)
        _backward_sums_kernel[grid](
            dy, x, mean, rstd, partial_g, partial_gx, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, dy_stride_n, dy_stride_c, dy_stride_p, negative_slope, **common)
        _backward_dx_kernel[grid](
            dy, x, dx, mean, rstd, partial_g, partial_gx, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, dy_stride_n, dy_stride_c, dy_stride_p, dx_stride_n, dx_stride_c,
            dx_stride_p, negative_slope, MAX_CHUNKS_P2=triton.next_power_of_2(num_chunks), **common)
    return dx
