"""Triton kernels of fastp2phd, importable only as ``fastp2phd.kernels``.

One module per op (``instance_norm_act``, ``instance_mean``) holding its kernels
and launchers; the op's contract, reference and registration live in
``fastp2phd/ops/``. Kernels are compiled for the GPU, or, when ``TRITON_INTERPRET=1``
was set before Triton was imported, run by Triton's interpreter on CPU tensors
(that is how the tests exercise them on machines without a GPU).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..ops._common import empty_like_format, memory_format_of


def on_device_of(t: torch.Tensor):
    """Launch under ``t``'s CUDA device (Triton launches on the current one, which may be another)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()

try:
    INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton before 3.4 has no knobs; it reads the variable the same way
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rounded(value, dtype: tl.constexpr):
    """``value.to(dtype)`` rounding to nearest even, as the GPU does.

    Triton's interpreter truncates float32 -> bfloat16, so there the rounding is
    done on the bits; compiled kernels use the hardware conversion.
    """
    if _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(dtype)


MAX_OFFSET = 2**31 - 1  # element offsets inside the kernels are 32-bit


def check_size(t: torch.Tensor, op: str) -> None:
    """Refuse a tensor whose elements lie beyond 32-bit offsets from its first one."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    if max(t.numel(), extent) > MAX_OFFSET:
        raise ValueError(
            f"{op}: the Triton kernels address at most 2^31 - 1 elements, got a tensor of shape {tuple(t.shape)} "
            f"and strides {t.stride()}; split the batch, or use impl='reference'"
        )


def pixel_stride(t: torch.Tensor) -> int | None:
    """The stride that walks an (N, C, H, W) tensor's H*W pixels in order, or None when no single one does."""
    _, _, H, W = t.shape
    if W == 1:
        return t.stride(2)
    if H == 1 or t.stride(2) == W * t.stride(3):
        return t.stride(3)
    return None


def plane_view(t: torch.Tensor, op: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (or a copy of it) whose pixels form one strided axis, and its (n, c, p) strides.

    Any view whose pixels are one strided axis is read where it lies: contiguous and
    channels_last tensors, channel and batch slices, steps along one axis, expanded
    (stride 0) dimensions. Others (a crop of a wider tensor, a transposed one) are copied.
    The kernels only read through these strides; outputs get strides of their own.
    """
    stride_p = pixel_stride(t)
    if stride_p is None:
        t = t.contiguous(memory_format=memory_format_of(t))
        stride_p = pixel_stride(t)
    check_size(t, op)
    return t, (t.stride(0), t.stride(1), stride_p)


def new_output(like: torch.Tensor, op: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A fresh output for input ``like``, in the layout the ops promise (``memory_format_of``), and its
    (n, c, p) strides. Never a view of ``like``: kernels write outputs through these strides only."""
    out = empty_like_format(like, dtype)
    return plane_view(out, op)
