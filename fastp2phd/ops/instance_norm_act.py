"""instance_norm_act: instance normalisation without affine, then an activation.

Contract: ``x`` (N, C, H, W) floating point. Each (n, c) plane is normalised by
its own mean and biased variance, ``y = act((x - mean) / sqrt(var + eps))``,
with act one of "none", "relu", "leaky_relu" (slope ``negative_slope``). The
output has x's dtype and memory format (channels_last stays channels_last).

This is every InstanceNorm2d(affine=False) + ReLU/LeakyReLU pair of pix2pixHD's
generator, encoder and discriminator.

Accuracy rule, on every path and dtype: the error against float64 is at most twice
that of ``nn.InstanceNorm2d`` + the activation in the same dtype on the same input,
and at most twice the reference path's; float64 is within 1e-10 of float64 maths where eps is not far
below the plane's variance (1e4 + 1e-3 noise with eps 1e-12: 3.4e-10, the module 1.7e-9).
tests/hard_inputs.py checks it on the planes that break naive kernels (constant,
far from zero, sparse label-like, huge, one-value, NaN and inf).

Fast paths: ``"cpu"`` (C++, ``csrc/instance_norm_act_cpu.cpp``) and ``"cuda"``
(Triton, ``kernels/instance_norm_act.py``, imported as ``fastp2phd.kernels``; earlier name ``"triton"``),
the kernels of ``torch.ops.fastp2phd.instance_norm_act`` (returns y and the float64
mean and rstd of every plane) and ``torch.ops.fastp2phd.instance_norm_act_backward``,
with fake kernels and autograd. Where neither is compiled (no extension, no Triton)
the operator runs ``_forward_reference_kernel``, PyTorch ops with the kernels'
numerics; under ``TRITON_INTERPRET=1`` the CPU kernels run the Triton kernels in the
interpreter. Backward saves x, as nn.InstanceNorm2d does, so the output is a plain
tensor that may be modified in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ._common import ACTIVATIONS, check_float, empty_like_format, memory_format_of, stats_dtype, tangents_may_flow
from ._dispatch import FastPath, select, triton_missing
from ._library import LIBRARY, extension_kernel_missing, op, register_kernel

try:
    from ..kernels import INTERPRETED as _INTERPRETED
    from ..kernels import instance_norm_act as _kernels
except ImportError as exc:  # Triton missing or broken
    _kernels, _INTERPRETED, _TRITON_MISSING = None, False, triton_missing(exc)
else:
    _TRITON_MISSING = None


def check_activation(activation: str, negative_slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise InvalidArgumentError(f"instance_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float, torch.SymFloat)):
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
    return _activate(y, activation, negative_slope).to(x.dtype).contiguous(memory_format=memory_format_of(x))


# ----------------------------------------------------------------------------- the operators


def _split_mean(mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """hi + lo = mean (float64), as two tensors of the compute dtype; lo is 0 in float64."""
    hi = mean.to(dtype)
    return hi, (mean - hi.double()).to(dtype)


def _normalize(s: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """xhat = ((s - hi) - lo) * rstd per plane, in rstd's dtype: the kernels' formula. s - hi is exact
    near the mean, so the sign of xhat (which picks the activation's branch) is that of s - mean."""
    N, C = s.shape[:2]
    hi, lo = _split_mean(mean.view(N, C, 1, 1), rstd.dtype)
    return ((s.to(rstd.dtype) - hi) - lo) * rstd.view(N, C, 1, 1)


def _forward_reference_kernel(x, activation, negative_slope, eps):
    """(y, mean, rstd) in PyTorch ops with the kernels' numerics: the operator's kernel where no compiled
    one is registered (no extension, no Triton). Sums are taken in float64 (float32 values sum exactly
    there; float64 values relative to the mean of the plane's first rows, itself summed relative to the first
    value, so a constant plane's mean is exact and an outlying first value costs no precision, as in the C++
    kernel)."""
    dtype = stats_dtype(x.dtype)
    xc = x.to(dtype)
    if dtype == torch.float64:
        first = xc[:, :, :1, :1]
        origin = first + (xc[:, :, :max(1, 2048 // x.shape[3])] - first).mean(dim=(2, 3), keepdim=True)
        mean = (origin + (xc - origin).mean(dim=(2, 3), keepdim=True)).reshape(-1)
    else:
        mean = xc.sum(dim=(2, 3), dtype=torch.float64).reshape(-1) / (x.shape[2] * x.shape[3])
    centred = _normalize(xc, mean, torch.ones_like(mean, dtype=dtype))
    var = centred.square().sum(dim=(2, 3), dtype=torch.float64).reshape(-1) / (x.shape[2] * x.shape[3])
    # Where var + eps is 0 (a constant or one-value plane, eps = 0), rstd is 0 as PyTorch's invstd is, so y and dx
    # are 0 (rsqrt(0) = inf would make them 0 * inf = NaN).
    rstd = torch.where(var + eps == 0, 0.0, torch.rsqrt(var + eps)).to(dtype)
    y = _activate(centred * rstd.view(*x.shape[:2], 1, 1), activation, negative_slope)
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x)), mean, rstd


_forward_op = op("instance_norm_act")
_backward_op = op("instance_norm_act_backward")
# CUDA: the Triton kernels. CPU: the C++ kernel (csrc/instance_norm_act_cpu.cpp) where the extension
# provides one, the Triton kernels under TRITON_INTERPRET=1, the reference kernel otherwise.
register_kernel("instance_norm_act", "CUDA", _kernels.forward if _kernels is not None else _forward_reference_kernel)
register_kernel("instance_norm_act", "CPU", _kernels.forward if _INTERPRETED else _forward_reference_kernel,
                replace=_INTERPRETED)


def _check_stats(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> None:
    planes = x.shape[0] * x.shape[1]
    for name, t, dtype in (("mean", mean, torch.float64), ("rstd", rstd, stats_dtype(x.dtype))):
        torch._check(t.dim() == 1 and t.shape[0] == planes and t.dtype == dtype,
                     lambda: f"instance_norm_act_backward: {name} must be ({planes},) {dtype}, got {tuple(t.shape)} "
                             f"{t.dtype}")


@torch.library.register_fake("fastp2phd::instance_norm_act")
def _forward_fake(x, activation, negative_slope, eps):
    torch._check(x.dim() == 4 and x.is_floating_point(),
                 lambda: f"instance_norm_act: x must be a floating-point (N, C, H, W) tensor, got {tuple(x.shape)} "
                         f"{x.dtype}")
    torch._check(activation in ACTIVATIONS, lambda: f"instance_norm_act: activation must be one of {ACTIVATIONS}")
    planes = x.shape[0] * x.shape[1]
    return empty_like_format(x), x.new_empty(planes, dtype=torch.float64), x.new_empty(planes, dtype=stats_dtype(x.dtype))


@torch.library.register_fake("fastp2phd::instance_norm_act_backward")
def _backward_fake(grad, x, mean, rstd, activation, negative_slope):
    torch._check(x.dim() == 4 and x.is_floating_point() and grad.shape == x.shape,
                 lambda: f"instance_norm_act_backward: grad {tuple(grad.shape)} and x {tuple(x.shape)} "
                         "must be one floating-point (N, C, H, W) shape")
    torch._check(grad.device == x.device == mean.device == rstd.device,
                 lambda: "instance_norm_act_backward: the tensors must be on one device")
    _check_stats(x, mean, rstd)
    return empty_like_format(x)


# The Jacobian of x -> xhat on a plane of P pixels is J = rstd * (I - 11^T / P - xhat xhat^T / P), which is
# symmetric, and act'(xhat) is diagonal. So backward is dx = J (act' * dy), and forward-mode AD is
# dy = act' * (J dx): the same two pieces in the other order. Written in PyTorch ops, these serve the CPU
# kernel, forward-mode AD, and double backward (a differentiable graph of the gradient).


def _times_act_grad(v, xhat, activation, negative_slope):
    """act'(xhat) * v."""
    if activation == "relu":
        return torch.where(xhat > 0, v, 0.0)
    if activation == "leaky_relu":
        return torch.where(xhat > 0, v, v * negative_slope)
    return v


def _times_norm_jacobian(v, xhat, rstd):
    """J v for every plane (J is symmetric, so this is also J^T v)."""
    N, C = xhat.shape[:2]
    centred = v - v.mean(dim=(2, 3), keepdim=True)
    return rstd.view(N, C, 1, 1) * (centred - xhat * (v * xhat).mean(dim=(2, 3), keepdim=True))


def _backward_formula(grad, x, mean, rstd, activation, negative_slope):
    xhat = _normalize(x, mean, rstd)
    g = _times_act_grad(grad.to(rstd.dtype), xhat, activation, negative_slope)
    return _times_norm_jacobian(g, xhat, rstd).to(x.dtype).contiguous(memory_format=memory_format_of(x))


register_kernel("instance_norm_act_backward", "CUDA", _kernels.backward if _kernels is not None else _backward_formula)
register_kernel("instance_norm_act_backward", "CPU", _kernels.backward if _INTERPRETED else _backward_formula,
                replace=_INTERPRETED)


def _setup_context(ctx, inputs, output):
    # x, as nn.InstanceNorm2d saves: y stays a plain tensor the caller may modify in place.
    x, activation, negative_slope, _ = inputs
    _, mean, rstd = output
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.save_for_backward(x, mean, rstd)
    ctx.set_materialize_grads(False)  # mean and rstd rarely get gradients: don't fill zeros for them


def _input_grad(grad_y, grad_mean, grad_rstd, x, mean, rstd, activation, negative_slope):
    """dx from the gradients of all three outputs (y, mean, rstd; None where none flows).

    With create_graph (grad mode on during backward), dx is computed in PyTorch ops, so its graph
    reaches x directly or through the saved mean and rstd; their gradients come back here. This is
    also the composite kernel of ``instance_norm_act_input_grad``, which the C++ autograd calls.
    """
    if grad_y is None:
        dx = torch.zeros(x.shape, dtype=rstd.dtype, device=x.device)
    elif torch.is_grad_enabled() or tangents_may_flow():  # create_graph, or under torch.func (e.g. jacrev)
        dx = _backward_formula(grad_y, x, mean, rstd, activation, negative_slope)
    else:
        dx = _backward_op(grad_y, x, mean, rstd, activation, negative_slope)
    if grad_mean is None and grad_rstd is None:
        return dx
    # d mean / dx = 1 / P and d rstd / dx = -rstd^2 xhat / P, per plane.
    N, C, H, W = x.shape
    xhat = _normalize(x, mean, rstd)
    extra = torch.zeros_like(xhat)
    if grad_mean is not None:
        extra = extra + grad_mean.to(rstd.dtype).view(N, C, 1, 1) / (H * W)
    if grad_rstd is not None:
        extra = extra - (grad_rstd * rstd * rstd).view(N, C, 1, 1) * xhat / (H * W)
    return (dx + extra).to(x.dtype).contiguous(memory_format=memory_format_of(x))


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, mean, rstd = ctx.saved_tensors
    return _input_grad(grad_y, grad_mean, grad_rstd, x, mean, rstd, ctx.activation, ctx.negative_slope), None, None, None


LIBRARY.impl("instance_norm_act_input_grad", _input_grad, "CompositeImplicitAutograd")
# The extension's C++ autograd (csrc/instance_norm_act_autograd.cpp) costs less host time per call;
# this Python one, the same formula, serves where the extension is not built.
if extension_kernel_missing("instance_norm_act", "Autograd") is not None:
    torch.library.register_autograd("fastp2phd::instance_norm_act", _backward, setup_context=_setup_context)


class _ForwardADFunction(torch.autograd.Function):
    """The op with the same backward, a jvp and a vmap rule, for forward-mode AD and torch.func
    transforms, which the registered autograd above does not serve (it would drop tangents).
    Not used under torch.compile, which cannot trace a custom jvp."""

    @staticmethod
    def forward(x, activation, negative_slope, eps):
        return _forward_op(x, activation, negative_slope, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], *output[1:])

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        x, mean, rstd = ctx.saved_tensors
        xhat = _normalize(x, mean, rstd)
        t = x_tangent.to(rstd.dtype)
        y_tangent = _times_act_grad(_times_norm_jacobian(t, xhat, rstd), xhat, ctx.activation, ctx.negative_slope)
        mean_tangent = t.mean(dim=(2, 3)).reshape(-1).to(mean.dtype)
        rstd_tangent = -(rstd * rstd) * (t * xhat).mean(dim=(2, 3)).reshape(-1)
        y_tangent = y_tangent.to(x_tangent.dtype).contiguous(memory_format=memory_format_of(x))
        return y_tangent, mean_tangent, rstd_tangent

    @staticmethod
    def vmap(info, in_dims, x, activation, negative_slope, eps):
        # Planes are independent: the vmapped dimension joins the batch.
        if in_dims[0] is None:
            return _ForwardADFunction.apply(x, activation, negative_slope, eps), (None, None, None)
        xb = x.movedim(in_dims[0], 0)
        y, mean, rstd = _ForwardADFunction.apply(xb.flatten(0, 1), activation, negative_slope, eps)
        batch = xb.shape[0]
        return (y.unflatten(0, xb.shape[:2]), mean.unflatten(0, (batch, -1)), rstd.unflatten(0, (batch, -1))), (0, 0, 0)


def _run_op(x, activation, negative_slope, eps):
    """The registered op (its device's kernel), with forward-mode AD where tangents flow."""
    run = _ForwardADFunction.apply if tangents_may_flow() else _forward_op
    return run(x, activation, float(negative_slope), float(eps))[0]


FAST_PATHS: tuple[FastPath, ...] = (
    FastPath("cpu", "C++", "the interpreter process (TRITON_INTERPRET=1) runs the Triton kernels on the CPU"
             if _INTERPRETED else extension_kernel_missing("instance_norm_act", "CPU"), _run_op,
             registered_anywhere=True, off_on_purpose=_INTERPRETED),
    FastPath("cuda", "Triton", _TRITON_MISSING, _run_op, aliases=("triton",), interpreted=_INTERPRETED,
             registered_anywhere=True),
)


def instance_norm_act(
    x: torch.Tensor,
    activation: str = "relu",
    negative_slope: float = 0.2,
    eps: float = 1e-5,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Instance normalisation without affine parameters, then an activation: InstanceNorm2d + ReLU in one op.

    ``x``: (N, C, H, W) float16, bfloat16, float32 or float64, any strided view. Each (n, c)
    plane is normalised by its own mean and biased variance, ``(x - mean) / sqrt(var + eps)``,
    then ``activation``: "none", "relu" or "leaky_relu" (slope ``negative_slope``). ``eps`` is
    finite and >= 0. A 1x1 plane gives 0. Returns a new tensor of x's dtype, channels_last when
    x's strides are channels-last-like, NCHW otherwise.

    Accuracy: on every path the error against float64 is at most twice that of
    ``nn.InstanceNorm2d`` + the activation in x's dtype, and at most twice the reference path's
    (float64: within 1e-10, for eps not far below the plane's variance). The fast paths keep float64
    statistics and never accumulate in x's 16-bit type (the CPU kernel sums 16-bit input in float32
    blocks of 2048 values, merged in float64: about 1e-6 relative, far below y's rounding).

    Differentiable in every mode (backward, double backward, forward-mode AD, vmap); on the fast paths
    the output may be modified in place before backward (the reference, as F.relu, saves its output).
    ``impl``: "auto", "reference" (F.instance_norm and the activation), "cpu" (C++) or "cuda"
    (Triton, earlier "triton"; CPU tensors too under TRITON_INTERPRET=1); a named path that cannot
    run here raises.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgumentError(f"instance_norm_act: x must be an (N, C, H, W) tensor, got {shape}")
    check_float("instance_norm_act", "x", x)
    check_activation(activation, negative_slope)
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) these may be SymFloats.
    if not (isinstance(eps, (int, float, torch.SymFloat)) and 0 <= eps < math.inf):
        raise InvalidArgumentError(f"instance_norm_act: eps must be a finite number, 0 or more, got {eps}")
    if not -math.inf < negative_slope < math.inf:
        raise InvalidArgumentError(f"instance_norm_act: negative_slope must be a finite number, got {negative_slope}")
    if x.numel() == 0:  # nothing to normalise; clone keeps the (empty) result in x's autograd graph
        return x.clone(memory_format=memory_format_of(x))
    path = select("instance_norm_act", impl, x.device, FAST_PATHS)
    if path is None:
        return instance_norm_act_reference(x, activation, negative_slope, eps)
    return path.run(x, activation, negative_slope, eps)
