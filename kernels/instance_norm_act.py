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
pixels at 1024x512), its deep layers many small ones. Both kernels therefore run
in two phases over a grid of (n, channel block) x (chunk of pixels):

  phase 1  every program reduces its chunk to partial statistics
           (forward: count, mean and M2 merged with Chan's formula;
            backward: sums of g and g * xhat);
  phase 2  every program merges its planes' partials (a few dozen numbers) and
           writes its chunk of the output.

So x is read twice and y written once, with enough programs to fill the GPU
whether planes are few and large or many and small.

Backward. With g = dy * act'(xhat): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
xhat comes from the saved input x (and mean, rstd), or, when the activation is
invertible (none, leaky_relu with a positive slope), from the saved output y:
the next layer keeps y alive anyway, so saving it costs no memory.
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
# Elements per tile: a register budget that keeps 4 warps spill-free.
TILE_ELEMENTS = 2048


@triton.jit
def _activate(xhat, ACTIVATION: tl.constexpr, slope):
    if ACTIVATION == RELU:
        return tl.maximum(xhat, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        return tl.where(xhat > 0, xhat, xhat * slope)
    else:
        return xhat


@triton.jit
def _tile_offsets(pid_nc, C, num_c_blocks, stride_n, stride_c, BLOCK_C: tl.constexpr):
    """Channels of this program and the element offset of each channel's plane start."""
    n = pid_nc // num_c_blocks
    channels = (pid_nc % num_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, channels, n * stride_n + channels * stride_c


@triton.jit
def _forward_stats_kernel(
    x_ptr,  # (N, C, P) input, any float dtype, strides below
    partial_mean_ptr,  # (N*C, num_chunks) float32 (float64 for float64 x): mean of each plane's chunk
    partial_m2_ptr,  # (N*C, num_chunks) float32 (float64 for float64 x): sum of squared deviations of each chunk
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, plane_offsets = _tile_offsets(pid_nc, C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    c_mask = channels < C
    acc_dtype = partial_mean_ptr.dtype.element_ty
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, P)
    count = tl.zeros([BLOCK_C], dtype=acc_dtype)
    mean = tl.zeros([BLOCK_C], dtype=acc_dtype)
    m2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        p_mask = pixels < end
        mask = c_mask[:, None] & p_mask[None, :]
        x = tl.load(x_ptr + plane_offsets[:, None] + pixels[None, :] * stride_p, mask=mask, other=0.0).to(acc_dtype)
        block_count = tl.sum(p_mask.to(acc_dtype), axis=0)
        block_mean = tl.sum(x, axis=1) / block_count
        deviation = tl.where(mask, x - block_mean[:, None], 0.0)
        block_m2 = tl.sum(deviation * deviation, axis=1)
        # Chan et al.: merge (count, mean, m2) with the block's.
        total = count + block_count
        delta = block_mean - mean
        mean = mean + delta * (block_count / total)
        m2 = m2 + block_m2 + delta * delta * (count * block_count / total)
        count = total
    rows = n * C + channels
    tl.store(partial_mean_ptr + rows * num_chunks + chunk, mean, mask=c_mask)
    tl.store(partial_m2_ptr + rows * num_chunks + chunk, m2, mask=c_mask)


@triton.jit
def _merge_stats(partial_mean_ptr, partial_m2_ptr, rows, c_mask, P, num_chunks, chunk_size, eps,
                 MAX_CHUNKS_P2: tl.constexpr):
    """Mean and rstd of whole planes from their chunks' partials."""
    chunks = tl.arange(0, MAX_CHUNKS_P2)
    k_mask = chunks < num_chunks
    mask = c_mask[:, None] & k_mask[None, :]
    index = rows[:, None] * num_chunks + chunks[None, :]
    means = tl.load(partial_mean_ptr + index, mask=mask, other=0.0)
    m2s = tl.load(partial_m2_ptr + index, mask=mask, other=0.0)
    counts = tl.where(k_mask, tl.minimum(chunk_size, P - chunks * chunk_size), 0).to(means.dtype)
    mean = tl.sum(means * counts[None, :], axis=1) / P
    deviation = tl.where(mask, means - mean[:, None], 0.0)
    m2 = tl.sum(m2s + deviation * deviation * counts[None, :], axis=1)
    rstd = 1.0 / tl.sqrt(m2 / P + eps)
    return mean, rstd


@triton.jit
def _forward_normalize_kernel(
    x_ptr,  # (N, C, P) input
    y_ptr,  # (N, C, P) output, strides below
    partial_mean_ptr, partial_m2_ptr,  # (N*C, num_chunks) float32 (float64 for float64 x) partials from phase 1
    mean_ptr, rstd_ptr,  # (N*C,) float32 (float64 for float64 x): plane statistics, written by the chunk-0 programs
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of x (a view: may be 0, or exceed the dense ones)
    y_stride_n, y_stride_c, y_stride_p,  # element strides of y (a fresh dense tensor)
    eps, slope,
    ACTIVATION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, MAX_CHUNKS_P2: tl.constexpr,
):
    pid_nc = tl.program_id(0)
    chunk = tl.program_id(1)
    n, channels, plane_offsets = _tile_offsets(pid_nc, C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    y_plane_offsets = n * y_stride_n + channels * y_stride_c
    c_mask = channels < C
    rows = n * C + channels
    mean, rstd = _merge_stats(partial_mean_ptr, partial_m2_ptr, rows, c_mask, P, num_chunks, chunk_size, eps,
                              MAX_CHUNKS_P2)
    if chunk == 0:
        tl.store(mean_ptr + rows, mean, mask=c_mask)
        tl.store(rstd_ptr + rows, rstd, mask=c_mask)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, P)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        x = tl.load(x_ptr + plane_offsets[:, None] + pixels[None, :] * stride_p, mask=mask, other=0.0).to(mean.dtype)
        y = _activate((x - mean[:, None]) * rstd[:, None], ACTIVATION, slope)
        tl.store(y_ptr + y_plane_offsets[:, None] + pixels[None, :] * y_stride_p,
                 cast_rounded(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat_and_grad(saved, dy, mean, rstd, ACTIVATION: tl.constexpr, SAVED_IS_OUTPUT: tl.constexpr, slope):
    """xhat, and g = dy * act'(xhat), from the saved input x or output y."""
    if SAVED_IS_OUTPUT:  # activation none, or leaky_relu with slope > 0: y -> xhat is invertible
        if ACTIVATION == LEAKY_RELU:
            xhat = tl.where(saved > 0, saved, saved / slope)
        else:
            xhat = saved
    else:
        xhat = (saved - mean[:, None]) * rstd[:, None]
    if ACTIVATION == RELU:
        g = tl.where(xhat > 0, dy, 0.0)
    elif ACTIVATION == LEAKY_RELU:
        g = tl.where(xhat > 0, dy, dy * slope)
    else:
        g = dy
    return xhat, g


@triton.jit
def _backward_tile(mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c,
                   BLOCK_C: tl.constexpr):
    """This program's batch item, channels, rows, channel mask, plane offsets in saved and dy, and plane statistics."""
    n, channels, plane_offsets = _tile_offsets(tl.program_id(0), C, num_c_blocks, stride_n, stride_c, BLOCK_C)
    c_mask = channels < C
    rows = n * C + channels
    mean = tl.load(mean_ptr + rows, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=c_mask, other=0.0)
    return n, channels, rows, c_mask, plane_offsets, n * dy_stride_n + channels * dy_stride_c, mean, rstd


@triton.jit
def _load_xhat_and_grad(saved_ptr, dy_ptr, offsets, dy_offsets, mask, mean, rstd, ACTIVATION: tl.constexpr,
                        SAVED_IS_OUTPUT: tl.constexpr, slope):
    saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(mean.dtype)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(mean.dtype)
    return _xhat_and_grad(saved, dy, mean, rstd, ACTIVATION, SAVED_IS_OUTPUT, slope)


@triton.jit
def _backward_sums_kernel(
    dy_ptr,  # (N, C, P) gradient of y
    saved_ptr,  # (N, C, P) saved x or y
    mean_ptr, rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane statistics
    partial_g_ptr, partial_gx_ptr,  # (N*C, num_chunks) float32 (float64 for float64 x): chunk sums of g and g * xhat
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of saved
    dy_stride_n, dy_stride_c, dy_stride_p,  # element strides of dy
    slope,
    ACTIVATION: tl.constexpr, SAVED_IS_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, rows, c_mask, plane_offsets, dy_offsets, mean, rstd = _backward_tile(
        mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c, BLOCK_C)
    sum_g = tl.zeros([BLOCK_C], dtype=mean.dtype)
    sum_gx = tl.zeros([BLOCK_C], dtype=mean.dtype)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, P)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        xhat, g = _load_xhat_and_grad(saved_ptr, dy_ptr, plane_offsets[:, None] + pixels[None, :] * stride_p,
                                      dy_offsets[:, None] + pixels[None, :] * dy_stride_p, mask, mean, rstd,
                                      ACTIVATION, SAVED_IS_OUTPUT, slope)
        g = tl.where(mask, g, 0.0)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
    tl.store(partial_g_ptr + rows * num_chunks + chunk, sum_g, mask=c_mask)
    tl.store(partial_gx_ptr + rows * num_chunks + chunk, sum_gx, mask=c_mask)


@triton.jit
def _backward_dx_kernel(
    dy_ptr, saved_ptr,  # (N, C, P) gradient of y, saved x or y
    dx_ptr,  # (N, C, P) gradient of x, strides below
    mean_ptr, rstd_ptr,  # (N*C,) float32 (float64 for float64 x) plane statistics
    partial_g_ptr, partial_gx_ptr,  # (N*C, num_chunks) float32 (float64 for float64 x) chunk sums from the previous kernel
    C, P, num_c_blocks, num_chunks, chunk_size,
    stride_n, stride_c, stride_p,  # element strides of saved (a view: may be 0, or exceed the dense ones)
    dy_stride_n, dy_stride_c, dy_stride_p,  # element strides of dy (a view, likewise)
    dx_stride_n, dx_stride_c, dx_stride_p,  # element strides of dx (a fresh dense tensor)
    slope,
    ACTIVATION: tl.constexpr, SAVED_IS_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    MAX_CHUNKS_P2: tl.constexpr,
):
    chunk = tl.program_id(1)
    n, channels, rows, c_mask, plane_offsets, dy_offsets, mean, rstd = _backward_tile(
        mean_ptr, rstd_ptr, C, num_c_blocks, stride_n, stride_c, dy_stride_n, dy_stride_c, BLOCK_C)
    chunks = tl.arange(0, MAX_CHUNKS_P2)
    k_mask = c_mask[:, None] & (chunks < num_chunks)[None, :]
    index = rows[:, None] * num_chunks + chunks[None, :]
    mean_g = tl.sum(tl.load(partial_g_ptr + index, mask=k_mask, other=0.0), axis=1) / P
    mean_gx = tl.sum(tl.load(partial_gx_ptr + index, mask=k_mask, other=0.0), axis=1) / P
    dx_plane_offsets = n * dx_stride_n + channels * dx_stride_c
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, P)
    for p0 in range(start, end, BLOCK_P):
        pixels = p0 + tl.arange(0, BLOCK_P)
        mask = c_mask[:, None] & (pixels < end)[None, :]
        xhat, g = _load_xhat_and_grad(saved_ptr, dy_ptr, plane_offsets[:, None] + pixels[None, :] * stride_p,
                                      dy_offsets[:, None] + pixels[None, :] * dy_stride_p,
                                      mask, mean, rstd, ACTIVATION, SAVED_IS_OUTPUT, slope)
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + dx_plane_offsets[:, None] + pixels[None, :] * dx_stride_p,
                 cast_rounded(dx, dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _tiling(N: int, C: int, P: int, stride_c: int, stride_p: int) -> tuple[int, int, int, int, int]:
    """BLOCK_C, BLOCK_P, channel blocks, chunk size and chunk count for this shape and layout."""
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


def forward(x: torch.Tensor, activation: str, negative_slope: float, eps: float):
    """(y, mean, rstd): y a new tensor in x's dtype and memory format; mean, rstd (N*C,) in stats_dtype.

    ``x`` may be any view; see ``plane_view``."""
    N, C, H, W = x.shape
    P = H * W
    x, (stride_n, stride_c, stride_p) = plane_view(x, "instance_norm_act")
    y, (y_stride_n, y_stride_c, y_stride_p) = new_output(x, "instance_norm_act")
    mean = torch.empty(N * C, device=x.device, dtype=stats_dtype(x.dtype))
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    block_c, block_p, c_blocks, chunk_size, num_chunks = _tiling(N, C, P, stride_c, stride_p)
    partial_mean = torch.empty(N * C, num_chunks, device=x.device, dtype=mean.dtype)
    partial_m2 = torch.empty_like(partial_mean)
    grid = (N * c_blocks, num_chunks)
    with on_device_of(x):
        _forward_stats_kernel[grid](
            x, partial_mean, partial_m2, C, P, c_blocks, num_chunks, chunk_size, stride_n, stride_c, stride_p,
            BLOCK_C=block_c, BLOCK_P=block_p,
        )
        _forward_normalize_kernel[grid](
            x, y, partial_mean, partial_m2, mean, rstd, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, y_stride_n, y_stride_c, y_stride_p, eps, float(negative_slope),
            ACTIVATION=ACTIVATION_CODES[activation], BLOCK_C=block_c, BLOCK_P=block_p,
            MAX_CHUNKS_P2=triton.next_power_of_2(num_chunks),
        )
    return y, mean, rstd


def backward(
    dy: torch.Tensor,
    saved: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    saved_is_output: bool,
) -> torch.Tensor:
    """dx, a new tensor in saved's dtype and memory format, from dy and the saved x (or y when
    ``saved_is_output``); dy and saved may be any views (dy is often expanded, stride 0)."""
    N, C, H, W = saved.shape
    P = H * W
    saved, (stride_n, stride_c, stride_p) = plane_view(saved, "instance_norm_act")
    dy, (dy_stride_n, dy_stride_c, dy_stride_p) = plane_view(dy, "instance_norm_act")
    dx, (dx_stride_n, dx_stride_c, dx_stride_p) = new_output(saved, "instance_norm_act")
    if saved.numel() == 0:
        return dx
    block_c, block_p, c_blocks, chunk_size, num_chunks = _tiling(N, C, P, stride_c, stride_p)
    partial_g = torch.empty(N * C, num_chunks, device=saved.device, dtype=mean.dtype)
    partial_gx = torch.empty_like(partial_g)
    grid = (N * c_blocks, num_chunks)
    common = dict(ACTIVATION=ACTIVATION_CODES[activation], SAVED_IS_OUTPUT=saved_is_output,
                  BLOCK_C=block_c, BLOCK_P=block_p)
    with on_device_of(saved):
        _backward_sums_kernel[grid](
            dy, saved, mean, rstd, partial_g, partial_gx, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, dy_stride_n, dy_stride_c, dy_stride_p, float(negative_slope), **common,
        )
        _backward_dx_kernel[grid](
            dy, saved, dx, mean, rstd, partial_g, partial_gx, C, P, c_blocks, num_chunks, chunk_size,
            stride_n, stride_c, stride_p, dy_stride_n, dy_stride_c, dy_stride_p, dx_stride_n, dx_stride_c,
            dx_stride_p, float(negative_slope), MAX_CHUNKS_P2=triton.next_power_of_2(num_chunks), **common,
        )
    return dx
