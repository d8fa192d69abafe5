"""instance_norm_act: instance normalisation without affine, then an activation.

Contract: ``x`` (N, C, H, W) floating point. Each (n, c) plane is normalised by
its own mean and biased variance, ``y = act((x - mean) / sqrt(var + eps))``,
with act one of "none", "relu", "leaky_relu" (slope ``negative_slope``).
Statistics are computed in float32 for float16/bfloat16 input. The output has
x's dtype and memory format (channels_last stays channels_last).

This is every InstanceNorm2d(affine=False) + ReLU/LeakyReLU pair of pix2pixHD's
generator, encoder and discriminator.

Fast path ``"triton"`` (CUDA; kernels in ``fastp2phd/kernels/instance_norm_act.py``):
registered as ``torch.ops.fastp2phd.instance_norm_act`` (returns y, mean, rstd)
and ``torch.ops.fastp2phd.instance_norm_act_backward``, with fake kernels and
autograd. Their CPU kernels are the PyTorch reference, so graphs compiled on
the CPU run; under ``TRITON_INTERPRET=1`` the CPU kernels run the Triton
kernels in the interpreter instead. Backward saves the output y rather than x
when the activation can be inverted (none, leaky_relu with a positive slope).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._triton import interpreted, load_kernels
from ._common import empty_like_format, memory_format_of, tangents_may_flow
from ._dispatch import FastPath, select

ACTIVATIONS = ("none", "relu", "leaky_relu")

_kernels, _triton_unavailable = load_kernels("instance_norm_act")
_INTERPRETED = interpreted()


def check_activation(activation: str, negative_slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)):
        raise TypeError(f"instance_norm_act: negative_slope must be a number, got {type(negative_slope).__name__}")


def _activate(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    return y


def instance_norm_act_reference(
    x: torch.Tensor, activation: str = "relu", negative_slope: float = 0.2, eps: float = 1e-5
) -> torch.Tensor:
    """``F.instance_norm`` (in float32 at least) followed by the activation; 1x1 planes give 0."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.shape[2] * x.shape[3] > 1:
        y = F.instance_norm(xc, eps=eps)
    else:  # F.instance_norm refuses one-value planes; x - mean is exactly 0 there
        y = xc - xc
    return _activate(y, activation, negative_slope).to(x.dtype, memory_format=memory_format_of(x))


# ----------------------------------------------------------------------------- Triton path


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics are float32, or float64 for float64 input."""
    return torch.promote_types(x.dtype, torch.float32)


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether backward can recover xhat from y (so y, not x, is saved)."""
    return activation == "none" or (activation == "leaky_relu" and negative_slope > 0)


@torch.library.custom_op("fastp2phd::instance_norm_act", mutates_args=())
def _forward_op(x: torch.Tensor, activation: str, negative_slope: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd), mean and rstd of shape (N*C,) in float32 (float64 for float64 x): the Triton kernels."""
    return _kernels.forward(x, activation, negative_slope, eps)


@_forward_op.register_kernel("cpu")
def _forward_cpu(x, activation, negative_slope, eps):
    if _INTERPRETED:
        return _kernels.forward(x, activation, negative_slope, eps)
    var, mean = torch.var_mean(x.to(_stats_dtype(x)), dim=(2, 3), correction=0)
    y = instance_norm_act_reference(x, activation, negative_slope, eps)
    return y, mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)


@_forward_op.register_fake
def _forward_fake(x, activation, negative_slope, eps):
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=_stats_dtype(x))
    return empty_like_format(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastp2phd::instance_norm_act_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    saved: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    saved_is_output: bool,
) -> torch.Tensor:
    """dx from dy and the saved input x (or output y when ``saved_is_output``)."""
    return _kernels.backward(grad, saved, mean, rstd, activation, negative_slope, saved_is_output)


@_backward_op.register_kernel("cpu")
def _backward_cpu(grad, saved, mean, rstd, activation, negative_slope, saved_is_output):
    if _INTERPRETED:
        return _kernels.backward(grad, saved, mean, rstd, activation, negative_slope, saved_is_output)
    N, C = saved.shape[:2]
    s = saved.to(mean.dtype)
    if saved_is_output:
        xhat = torch.where(s > 0, s, s / negative_slope) if activation == "leaky_relu" else s
    else:
        xhat = (s - mean.view(N, C, 1, 1)) * rstd.view(N, C, 1, 1)
    g = grad.to(mean.dtype)
    if activation == "relu":
        g = torch.where(xhat > 0, g, 0.0)
    elif activation == "leaky_relu":
        g = torch.where(xhat > 0, g, g * negative_slope)
    mean_g = g.mean(dim=(2, 3), keepdim=True)
    mean_gx = (g * xhat).mean(dim=(2, 3), keepdim=True)
    dx = rstd.view(N, C, 1, 1) * (g - mean_g - xhat * mean_gx)
    return dx.to(saved.dtype, memory_format=memory_format_of(saved))


@_backward_op.register_fake
def _backward_fake(grad, saved, mean, rstd, activation, negative_slope, saved_is_output):
    return torch.empty_like(saved)


def _setup_context(ctx, inputs, output):
    x, activation, negative_slope, _ = inputs
    y, mean, rstd = output
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.saved_is_output = saves_output(activation, negative_slope)
    ctx.save_for_backward(y if ctx.saved_is_output else x, mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    saved, mean, rstd = ctx.saved_tensors
    dx = _backward_op(grad_y, saved, mean, rstd, ctx.activation, ctx.negative_slope, ctx.saved_is_output)
    return dx, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _instance_norm_act_triton(x, activation, negative_slope, eps):
    return _forward_op(x, activation, float(negative_slope), float(eps))[0]


FAST_PATHS: tuple[FastPath, ...] = (
    FastPath("triton", "cuda", _triton_unavailable, _instance_norm_act_triton, interpreted=_INTERPRETED),
)


def instance_norm_act(
    x: torch.Tensor,
    activation: str = "relu",
    negative_slope: float = 0.2,
    eps: float = 1e-5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Instance norm (no affine, biased variance) followed by ``activation``.

    ``impl``: "auto", "reference" or "triton" (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"instance_norm_act: x must be an (N, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"instance_norm_act: x must be floating point, got {x.dtype}")
    check_activation(activation, negative_slope)
    if eps < 0:
        raise ValueError(f"instance_norm_act: eps must be 0 or more, got {eps}")
    if x.numel() == 0:
        return empty_like_format(x)
    path = select("instance_norm_act", impl, x.device, FAST_PATHS)
    if path is None:
        return instance_norm_act_reference(x, activation, negative_slope, eps)
    return path.run(x, activation, negative_slope, eps)
