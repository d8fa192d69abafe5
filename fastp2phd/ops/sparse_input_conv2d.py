"""sparse_input_conv2d: a convolution of an input with few nonzero channels per pixel.

Contract: ``F.conv2d(x, weight, bias)`` with stride 1, no padding, no groups, for ``x`` (N, C, H, W) and
``weight`` (O, C, kh, kw): the same values (up to float rounding: the sum skips zeros, so it adds fewer
terms), dtype, shape and layout, under autograd and autocast alike. It pays where most input values are 0,
as in the generator's input: a one-hot label map beside a boundary map (1 value in 36 nonzero).

Fast path: ``"cpu"`` (C++): each pixel's nonzero channels are found once, and each output pixel adds the
weight rows of those channels only; the 1024p generator's first 7x7 convolution (36 -> 32 channels) at
1024x2048 takes about 40x less arithmetic than the dense one. The kernel runs the dense convolution itself
where more than 1 value in 4 is nonzero or the weights are not finite (0 * inf must stay NaN). Gradients,
forward-mode AD and exports take the reference (``F.conv2d``); under autocast the result is computed in
float32 and returned in the autocast dtype, as ``F.conv2d`` returns it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ._common import memory_format_of, tangents_may_flow
from ._dispatch import FastPath, select
from ._library import extension_kernel_missing, op, register_kernel


def sparse_input_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    return F.conv2d(x, weight, bias)


# ----------------------------------------------------------------------------- the operator

_OP = op("sparse_input_conv2d")
register_kernel("sparse_input_conv2d", "CPU", sparse_input_conv2d_reference)
register_kernel("sparse_input_conv2d", "CUDA", sparse_input_conv2d_reference)


@torch.library.register_fake("fastp2phd::sparse_input_conv2d")
def _sparse_input_conv2d_fake(x, weight, bias):
    torch._check(x.dim() == 4 and weight.dim() == 4 and x.shape[1] == weight.shape[1],
                 lambda: f"sparse_input_conv2d: x (N, C, H, W) {tuple(x.shape)} and weight (O, C, kh, kw) "
                         f"{tuple(weight.shape)} do not match")
    torch._check(x.shape[2] >= weight.shape[2] and x.shape[3] >= weight.shape[3],
                 lambda: f"sparse_input_conv2d: x {tuple(x.shape)} is smaller than the kernel {tuple(weight.shape)}")
    n, _, height, width = x.shape
    shape = (n, weight.shape[0], height - weight.shape[2] + 1, width - weight.shape[3] + 1)
    channels_last = torch.channels_last in (memory_format_of(x), memory_format_of(weight))
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


FAST_PATHS = (
    FastPath("cpu", "C++", extension_kernel_missing("sparse_input_conv2d", "CPU"), _OP),
)


def sparse_input_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        impl: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding), faster where most of ``x`` is 0.

    ``x``: (N, C, H, W) floating point, any strided view; ``weight``: (O, C, kh, kw); ``bias``: (O,) or None.
    The float32 and float64 kernels skip zeros; other dtypes, mixed dtypes (which autocast casts) and inputs with
    more than 1 value in 4 nonzero run the dense convolution. ``impl``: "auto", "reference" (``F.conv2d``) or
    "cpu" (C++).
    """
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise InvalidArgumentError(f"sparse_input_conv2d: x (N, C, H, W) {tuple(x.shape)} and weight (O, C, kh, kw) "
                                   f"{tuple(weight.shape)} must have 4 dimensions and the same C")
    path = select("sparse_input_conv2d", impl, x.device, FAST_PATHS)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    # Mixed dtypes go to F.conv2d, which casts them under autocast and refuses them otherwise; the kernel takes one.
    # So does a 16-bit input under autocast to the other 16-bit type (float16 under bfloat16), which it casts too.
    autocast = torch.is_autocast_enabled(x.device.type)
    if (path is None or any(t.dtype != x.dtype for t in tensors)
            or (autocast and x.dtype not in (torch.float32, torch.float64, torch.get_autocast_dtype(x.device.type)))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or tangents_may_flow()):
        return sparse_input_conv2d_reference(x, weight, bias)
    y = path.run(x, weight, bias)
    if autocast and x.dtype == torch.float32:
        y = y.to(torch.get_autocast_dtype(x.device.type))
    return y
