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

import math

import torch
import torch.nn.functional as F

from ._common import ACTIVATIONS, empty_like_format, memory_format_of, stats_dtype, tangents_may_flow
from ._dispatch import FastPath, select, triton_missing
from ._library import op, register_kernel

try:
    from ..kernels import INTERPRETED as _INTERPRETED
    from ..kernels import instance_norm_act as _kernels
except ImportError as exc:  # Triton missing or broken
    _kernels, _INTERPRETED, _TRITON_MISSING = None, False, triton_missing(exc)
else:
    _TRITON_MISSING = None


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


# ----------------------------------------------------------------------------- the operators


def saves_output(activation: str, negative_slope: float) -> bool:
    """Whether backward can recover xhat from y (so y, not x, is saved)."""
    return activation == "none" or (activation == "leaky_relu" and negative_slope > 0)


def _forward_reference_kernel(x, activation, negative_slope, eps):
    """(y, mean, rstd) from PyTorch ops: the operator's kernel where the Triton kernels do not run."""
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(2, 3), correction=0)
    y = instance_norm_act_reference(x, activation, negative_slope, eps)
    return y, mean.reshape(-1), torch.rsqrt(var + eps).reshape(-1)


_forward_op = op("instance_norm_act")
_backward_op = op("instance_norm_act_backward")
def _forward_cpu_kernel(x, activation, negative_slope, eps):
    """The CPU kernel. For 16-bit input (bf16 autocast inference) PyTorch's mixed-precision batch norm over the
    N*C planes does in one pass what the reference does in five (upcast, statistics, normalise, activate,
    round): float32 statistics (from sums of squares: relative error ~1e-5 where |mean| >> std, far below the
    output's rounding), y rounded once to x's dtype, then the activation in place (leaky_relu rounds its
    product once more: within one unit in the last place). Other dtypes, one-value planes and layouts it
    cannot view as planes take the reference."""
    N, C, H, W = x.shape
    dense = x.is_contiguous() or (N == 1 and x.is_contiguous(memory_format=torch.channels_last))
    if x.dtype not in (torch.float16, torch.bfloat16) or H * W == 1 or not dense or x.numel() == 0:
        return _forward_reference_kernel(x, activation, negative_slope, eps)
    ones = torch.ones(N * C, dtype=torch.float32)
    y, mean, rstd = torch.ops.aten.native_batch_norm(x if N == 1 else x.view(1, N * C, H, W), ones,
                                                     torch.zeros_like(ones), None, None, True, 0.0, eps)
    y = y.view(N, C, H, W)
    if activation == "relu":
        y.relu_()
    elif activation == "leaky_relu":
        F.leaky_relu_(y, negative_slope)
    return y, mean, rstd


_triton_forward = _kernels.forward if _kernels is not None else _forward_reference_kernel
register_kernel("instance_norm_act", "CUDA", _triton_forward)
register_kernel("instance_norm_act", "CPU", _triton_forward if _INTERPRETED else _forward_cpu_kernel)


def _check_stats(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    torch._check(t.dim() == 1 and t.shape[0] == x.shape[0] * x.shape[1] and t.dtype == stats_dtype(x.dtype),
                 lambda: f"instance_norm_act_backward: {name} must be ({x.shape[0] * x.shape[1]},) "
                         f"{stats_dtype(x.dtype)}, got {tuple(t.shape)} {t.dtype}")


@torch.library.register_fake("fastp2phd::instance_norm_act")
def _forward_fake(x, activation, negative_slope, eps):
    torch._check(x.dim() == 4 and x.is_floating_point(),
                 lambda: f"instance_norm_act: x must be a floating-point (N, C, H, W) tensor, got {tuple(x.shape)} "
                         f"{x.dtype}")
    torch._check(activation in ACTIVATIONS, lambda: f"instance_norm_act: activation must be one of {ACTIVATIONS}")
    stats = x.new_empty(x.shape[0] * x.shape[1], dtype=stats_dtype(x.dtype))
    return empty_like_format(x), stats, torch.empty_like(stats)


@torch.library.register_fake("fastp2phd::instance_norm_act_backward")
def _backward_fake(grad, saved, mean, rstd, activation, negative_slope, saved_is_output):
    torch._check(saved.dim() == 4 and saved.is_floating_point() and grad.shape == saved.shape,
                 lambda: f"instance_norm_act_backward: grad {tuple(grad.shape)} and saved {tuple(saved.shape)} "
                         "must be one floating-point (N, C, H, W) shape")
    torch._check(grad.device == saved.device == mean.device == rstd.device,
                 lambda: "instance_norm_act_backward: the tensors must be on one device")
    _check_stats("mean", mean, saved)
    _check_stats("rstd", rstd, saved)
    return empty_like_format(saved)


# The Jacobian of x -> xhat on a plane of P pixels is J = rstd * (I - 11^T / P - xhat xhat^T / P), which is
# symmetric, and act'(xhat) is diagonal. So backward is dx = J (act' * dy), and forward-mode AD is
# dy = act' * (J dx): the same two pieces in the other order. Written in PyTorch ops, these serve the CPU
# kernel, forward-mode AD, and double backward (a differentiable graph of the gradient).


def _xhat(saved, mean, rstd, activation, negative_slope, saved_is_output):
    """xhat in the statistics' dtype, from the saved x, or from y when the activation can be inverted."""
    N, C = saved.shape[:2]
    s = saved.to(mean.dtype)
    if saved_is_output:
        return torch.where(s > 0, s, s / negative_slope) if activation == "leaky_relu" else s
    return (s - mean.view(N, C, 1, 1)) * rstd.view(N, C, 1, 1)


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


def _backward_formula(grad, saved, mean, rstd, activation, negative_slope, saved_is_output):
    xhat = _xhat(saved, mean, rstd, activation, negative_slope, saved_is_output)
    g = _times_act_grad(grad.to(mean.dtype), xhat, activation, negative_slope)
    return _times_norm_jacobian(g, xhat, rstd).to(saved.dtype, memory_format=memory_format_of(saved))


_triton_backward = _kernels.backward if _kernels is not None else _backward_formula
register_kernel("instance_norm_act_backward", "CUDA", _triton_backward)
register_kernel("instance_norm_act_backward", "CPU", _triton_backward if _INTERPRETED else _backward_formula)


def _setup_context(ctx, inputs, output):
    x, activation, negative_slope, _ = inputs
    y, mean, rstd = output
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.saved_is_output = saves_output(activation, negative_slope)
    ctx.save_for_backward(y if ctx.saved_is_output else x, mean, rstd)
    ctx.set_materialize_grads(False)  # mean and rstd rarely get gradients: don't fill zeros for them


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    """dx from the gradients of all three outputs (y, mean, rstd).

    With create_graph (grad mode on during backward), dx is computed in PyTorch ops, so its graph
    reaches x directly or through the saved y, mean and rstd; their gradients come back here.
    """
    saved, mean, rstd = ctx.saved_tensors
    args = (ctx.activation, ctx.negative_slope, ctx.saved_is_output)
    if grad_y is None:
        dx = torch.zeros(saved.shape, dtype=mean.dtype, device=saved.device)
    elif torch.is_grad_enabled() or tangents_may_flow():  # create_graph, or under torch.func (e.g. jacrev)
        dx = _backward_formula(grad_y, saved, mean, rstd, *args)
    else:
        dx = _backward_op(grad_y, saved, mean, rstd, *args)
    if grad_mean is None and grad_rstd is None:
        return dx, None, None, None
    # d mean / dx = 1 / P and d rstd / dx = -rstd^2 xhat / P, per plane.
    N, C, H, W = saved.shape
    xhat = _xhat(saved, mean, rstd, *args)
    extra = torch.zeros_like(xhat)
    if grad_mean is not None:
        extra = extra + grad_mean.view(N, C, 1, 1) / (H * W)
    if grad_rstd is not None:
        extra = extra - (grad_rstd * rstd * rstd).view(N, C, 1, 1) * xhat / (H * W)
    return (dx + extra).to(saved.dtype, memory_format=memory_format_of(saved)), None, None, None


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
        x, y, mean, rstd = inputs[0], *output
        ctx.save_for_forward(y if ctx.saved_is_output else x, mean, rstd)

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        saved, mean, rstd = ctx.saved_tensors
        xhat = _xhat(saved, mean, rstd, ctx.activation, ctx.negative_slope, ctx.saved_is_output)
        t = x_tangent.to(mean.dtype)
        y_tangent = _times_act_grad(_times_norm_jacobian(t, xhat, rstd), xhat, ctx.activation, ctx.negative_slope)
        mean_tangent = t.mean(dim=(2, 3)).reshape(-1)
        rstd_tangent = -(rstd * rstd) * (t * xhat).mean(dim=(2, 3)).reshape(-1)
        return (y_tangent.to(x_tangent.dtype, memory_format=memory_format_of(saved)), mean_tangent, rstd_tangent)

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


def _instance_norm_act_cpu(x, activation, negative_slope, eps):
    # The op's CPU kernel wins only for 16-bit input (one pass instead of five); for float32/64 the
    # reference is one fused PyTorch call already, and the op would add a pass for its saved statistics.
    if x.dtype in (torch.float16, torch.bfloat16):
        return _run_op(x, activation, negative_slope, eps)
    return instance_norm_act_reference(x, activation, negative_slope, eps)


FAST_PATHS: tuple[FastPath, ...] = (
    FastPath("triton", "cuda", _TRITON_MISSING, _run_op, interpreted=_INTERPRETED, registered_anywhere=True),
    FastPath("cpu", "cpu", None, _instance_norm_act_cpu, registered_anywhere=True),
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
    plane is normalised by its own mean and biased variance, ``(x - mean) / sqrt(var + eps)``
    (statistics in float32 for 16-bit input, float64 for float64), then ``activation``:
    "none", "relu" or "leaky_relu" (slope ``negative_slope``). ``eps`` is finite and >= 0.
    A 1x1 plane gives 0. Returns a new tensor of x's dtype, channels_last when x's strides
    are channels-last-like, NCHW otherwise.

    Differentiable in every mode (backward, double backward, forward-mode AD, vmap).
    ``impl``: "auto", "reference" (PyTorch), "cpu" (CPU tensors: the op, whose kernel normalises
    16-bit input in one pass with float32 statistics) or "triton" (CUDA tensors; CPU tensors under
    TRITON_INTERPRET=1); a named path that cannot run here raises.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"instance_norm_act: x must be an (N, C, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"instance_norm_act: x must be floating point, got {x.dtype}")
    check_activation(activation, negative_slope)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"instance_norm_act: eps must be a finite number, 0 or more, got {eps}")
    if not math.isfinite(negative_slope):
        raise ValueError(f"instance_norm_act: negative_slope must be a finite number, got {negative_slope}")
    if x.numel() == 0:
        return empty_like_format(x)
    path = select("instance_norm_act", impl, x.device, FAST_PATHS)
    if path is None:
        return instance_norm_act_reference(x, activation, negative_slope, eps)
    return path.run(x, activation, negative_slope, eps)
