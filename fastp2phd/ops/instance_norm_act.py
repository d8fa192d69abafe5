"""instance_norm_act: instance normalisation without affine, then an activation.

Contract: ``x`` (N, C, H, W) floating point. Each (n, c) plane is normalised by
its own mean and biased variance, ``y = act((x - mean) / sqrt(var + eps))``,
with act one of "none", "relu", "leaky_relu" (slope ``negative_slope``).
Statistics are computed in float32 for float16/bfloat16 input. The output has
x's dtype and memory format (channels_last stays channels_last).

This is every InstanceNorm2d(affine=False) + ReLU/LeakyReLU pair of pix2pixHD's
generator, encoder and discriminator. The fused Triton path for CUDA tensors
registers itself in FAST_PATHS; until it exists every call runs the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import memory_format_of
from ._dispatch import FastPath, select

ACTIVATIONS = ("none", "relu", "leaky_relu")

FAST_PATHS: tuple[FastPath, ...] = ()


def check_activation(activation: str, negative_slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)):
        raise TypeError(f"instance_norm_act: negative_slope must be a number, got {type(negative_slope).__name__}")


def instance_norm_act_reference(
    x: torch.Tensor, activation: str = "relu", negative_slope: float = 0.2, eps: float = 1e-5
) -> torch.Tensor:
    """``F.instance_norm`` (in float32 at least) followed by the activation; 1x1 planes give 0."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    if x.shape[2] * x.shape[3] > 1:
        y = F.instance_norm(xc, eps=eps)
    else:  # F.instance_norm refuses one-value planes; x - mean is exactly 0 there
        y = xc - xc
    if activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    return y.to(x.dtype, memory_format=memory_format_of(x))


def instance_norm_act(
    x: torch.Tensor,
    activation: str = "relu",
    negative_slope: float = 0.2,
    eps: float = 1e-5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Instance norm (no affine, biased variance) followed by ``activation``.

    ``impl``: "auto" or "reference" (fast paths are added by the Triton kernels).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"instance_norm_act: x must be an (N, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"instance_norm_act: x must be floating point, got {x.dtype}")
    check_activation(activation, negative_slope)
    if eps <= 0:
        raise ValueError(f"instance_norm_act: eps must be positive, got {eps}")
    if x.numel() == 0:
        return torch.empty_like(x)
    path = select("instance_norm_act", impl, x.device, FAST_PATHS)
    if path is None:
        return instance_norm_act_reference(x, activation, negative_slope, eps)
    return path.run(x, activation, negative_slope, eps)
