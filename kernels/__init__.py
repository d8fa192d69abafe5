"""Triton kernels of fastp2phd, importable only as ``fastp2phd.kernels``.

One module per op (``instance_norm_act``, ``instance_mean``) holding its kernels
and launchers; the op's contract, reference and registration live in
``fastp2phd/ops/``. Kernels are compiled for the GPU, or, when ``TRITON_INTERPRET=1``
was set before Triton was imported, run by Triton's interpreter on CPU tensors
(that is how the tests exercise them on machines without a GPU).
"""
import os

import torch
import triton
import triton.language as tl

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


MAX_ELEMENTS = 2**31 - 1  # offsets inside the kernels are 32-bit


def check_size(t: torch.Tensor, op: str) -> None:
    if t.numel() > MAX_ELEMENTS:
        raise ValueError(
            f"{op}: the Triton kernels take tensors of at most 2^31 - 1 elements, got {t.numel()} "
            f"({tuple(t.shape)}); split the batch, or use impl='reference'"
        )


def plane_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (or a copy) whose pixels form one strided axis, and its (n, c, p) strides.

    NCHW-contiguous and channels_last tensors are used as they are; any other
    strides (a cropped or transposed view) are copied to contiguous first.
    """
    N, C, H, W = t.shape
    if t.stride(2) != W * t.stride(3) and H > 1:
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))
