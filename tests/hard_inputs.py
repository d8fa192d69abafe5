"""The hard-input accuracy suite of instance_norm_act, shared by every implementation.

The planes pix2pixHD produces break naive kernels, not random normal data: constant planes (a first
conv over one-hot labels with large uniform regions), planes with a large mean and a small spread,
sparse label-like planes, huge planes, one-value planes, NaN and inf. Every path is checked against
float64 (wider for float64 inputs) on each, in every dtype, forward and backward, by the rule the op's
docstring states:

    error(path) <= max(2 * error(nn.InstanceNorm2d + activation in the same dtype),
                       2 * error(impl="reference"),
                       2 * the dtype's unit roundoff)

and the fast paths in float64 within 1e-10. The last term is the floor where the others are exactly 0 (a constant
plane): one rounding of the output is always allowed. tests/ops/instance_norm_act/test_hard_inputs.py
runs it for the reference, the CPU kernel and (on a GPU) the Triton kernels;
tests/interpreter/instance_norm_act/test_hard_inputs.py for the Triton kernels in the interpreter.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastp2phd.ops import instance_norm_act

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (activation, negative_slope): pix2pixHD's three, and a small slope whose inverse amplifies errors.
ACTIVATIONS = [("relu", 0.0), ("leaky_relu", 0.2), ("none", 0.0), ("leaky_relu", 0.01)]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant(value: float, shape=(1, 2, 64, 96)):
    return lambda: torch.full(shape, value, dtype=torch.float64)


def offset(mean: float, spread: float, shape=(2, 3, 40, 56)):
    return lambda: mean + spread * torch.randn(shape, generator=_generator(int(mean) % 97 + 7), dtype=torch.float64)


def label_like(shape=(1, 2, 512, 1024), base=-2.3, spike=1.0, density=1e-4):
    """A conv of a one-hot label map: one value almost everywhere, another on a few pixels."""
    def make():
        x = torch.full(shape, base, dtype=torch.float64)
        x[torch.rand(shape, generator=_generator(11)) < density] = spike
        return x
    return make


def regions(shape=(1, 4, 96, 128)):
    """A few large uniform regions with different values, as after a first conv over labels."""
    def make():
        g = _generator(12)
        x = torch.empty(shape, dtype=torch.float64)
        n, c, h, w = shape
        levels = torch.randn(c, 4, generator=g, dtype=torch.float64) * 3
        x[:, :, : h // 2, : w // 3] = levels[:, 0, None, None]
        x[:, :, : h // 2, w // 3:] = levels[:, 1, None, None]
        x[:, :, h // 2:, : w // 2] = levels[:, 2, None, None]
        x[:, :, h // 2:, w // 2:] = levels[:, 3, None, None]
        return x
    return make


def with_value(value: float, shape=(2, 3, 9, 11)):
    """Random planes, one of which holds a NaN or an inf."""
    def make():
        x = torch.randn(shape, generator=_generator(13), dtype=torch.float64)
        x[1, 2, 4, 5] = value
        return x
    return make


def outlier_first(value: float, shape=(1, 2, 64, 112)):
    """1 + 0.001 randn with the plane's first pixel (the kernels' shift) far out: the plane's blocks (3.5 of the CPU
    kernel's 2048 values, 28 of its 16-bit pieces of 256) all sum about it."""
    def make():
        x = offset(1.0, 1e-3, shape)()
        x[:, :, 0, 0] = value
        return x
    return make


CASES = {
    "constant -2.3": constant(-2.3),
    "constant 1000": constant(1000.0),
    "constant 0": constant(0.0),
    "constant bf16 1024x1024": constant(-2.3, (1, 1, 1024, 1024)),
    "3 + 0.01 randn": offset(3.0, 0.01, (3, 3, 300, 260)),
    "1000 + randn": offset(1000.0, 1.0),
    "1000 + 0.001 randn": offset(1000.0, 1e-3),
    "-1e4 + 0.1 randn": offset(-1e4, 0.1),
    "1e4 + randn huge": offset(1e4, 1.0, (1, 1, 2048, 2048)),
    "label-like": label_like(),
    "label-like small": label_like((2, 3, 64, 64), density=3e-3),
    "regions": regions(),
    "one pixel": offset(5.0, 2.0, (2, 3, 1, 1)),
    "one row": offset(5.0, 2.0, (2, 3, 1, 37)),
    "first pixel 1e4": outlier_first(1e4),
    "NaN": with_value(math.nan),
    "inf": with_value(math.inf),
    "-inf": with_value(-math.inf),
}
# The cases whose planes are big enough to take seconds per call: fewer activations there, and in Triton's
# interpreter (tens of seconds per call) only the dtype and activation named here.
HUGE = {"constant bf16 1024x1024": ("bfloat16", "relu"), "1e4 + randn huge": ("float32", "relu"),
        "label-like": ("bfloat16", "leaky_relu"), "3 + 0.01 randn": ("float32", "leaky_relu")}
CHANNELS_LAST = {"label-like", "label-like small", "regions", "1000 + randn", "constant -2.3", "first pixel 1e4", "NaN"}


def parameters(interpreted: bool = False):
    """(case, dtype name, channels_last, activation, slope) of the suite. ``interpreted``: Triton's interpreter
    takes ~30 s per call on a 2048x2048 plane, so there the huge cases run in one dtype each, and every case
    with relu and a leaky_relu (the activations' two branch rules) only."""
    for case in CASES:
        for dtype in DTYPES:
            if interpreted and case in HUGE and dtype != HUGE[case][0]:
                continue
            for channels_last in (False, True) if case in CHANNELS_LAST else (False,):
                for activation, slope in ACTIVATIONS[::3] if case in HUGE or interpreted else ACTIVATIONS:
                    if not (interpreted and case in HUGE and activation != HUGE[case][1]):
                        yield case, dtype, channels_last, activation, slope


def make_input(case: str, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = CASES[case]().to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _act(y, activation, slope):
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, slope)
    return y


# float64 paths are checked against wider arithmetic where numpy has it (x86's 80-bit long double): against a
# float64 oracle, their ulp-level errors would be the oracle's own rounding as much as theirs.
WIDE = np.longdouble if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps else np.float64


def _array(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().cpu().double().numpy().astype(dtype)


def oracle(x: torch.Tensor, dy: torch.Tensor, activation: str, slope: float):
    """(y, dx, rstd) as numpy arrays from x and dy's values, with PyTorch's branch rule at 0 (xhat > 0 passes dy):
    in float64, or in ``WIDE`` for float64 inputs."""
    wide = WIDE if x.dtype == torch.float64 else np.float64
    x, dy, slope = _array(x, wide), _array(dy, wide), np.float64(slope).astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):  # (the NaN and inf cases)
        first = x[:, :, :1, :1]  # summing x - first keeps a constant plane's mean exact
        mean = first + (x - first).mean(axis=(2, 3), keepdims=True)
        rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=(2, 3), keepdims=True) + np.float64(1e-5).astype(wide))
        xhat = (x - mean) * rstd
        if x.shape[2] * x.shape[3] == 1:  # a one-value plane normalises to 0
            xhat = np.zeros_like(x)
        g = dy if activation == "none" else np.where(xhat > 0, dy, dy * slope)
        dx = rstd * (g - g.mean(axis=(2, 3), keepdims=True) - xhat * (g * xhat).mean(axis=(2, 3), keepdims=True))
        y = {"relu": np.maximum(xhat, 0), "leaky_relu": np.where(xhat > 0, xhat, xhat * slope)}.get(activation, xhat)
    return y, dx, rstd


def module_result(x, dy, activation, slope):
    """nn.InstanceNorm2d + activation in x's own dtype: the module the op replaces."""
    xr = x.detach().clone().requires_grad_(True)
    y = _act(F.instance_norm(xr) if x.shape[2] * x.shape[3] > 1 else xr - xr, activation, slope)
    y.backward(dy)
    return y.detach(), xr.grad


def path_result(x, dy, activation, slope, impl):
    xr = x.detach().clone().requires_grad_(True)
    y = instance_norm_act(xr, activation, slope, impl=impl)
    y.backward(dy)
    return y.detach(), xr.grad


def python_kernels_result(x, dy, activation, slope):
    """(y, dx) from the operator's PyTorch kernels, which it runs where neither the extension nor Triton is there."""
    module = importlib.import_module("fastp2phd.ops.instance_norm_act")  # (the package exports the function)
    y, mean, rstd = module._forward_reference_kernel(x, activation, slope, 1e-5)
    return y, module._backward_formula(dy, x, mean, rstd, activation, slope)


def result_of(impl, x, dy, activation, slope, device="cpu"):
    """(y, dx) on the CPU from ``impl`` (an ``impl`` of the op, or "python kernels") run on ``device``."""
    if impl == "python kernels":
        return python_kernels_result(x, dy, activation, slope)
    return tuple(t.cpu() for t in path_result(x.to(device), dy.to(device), activation, slope, impl))


def errors(y, dx, expected_y, expected_dx, rstd, dy):
    """(forward, backward) error against the oracle on the planes where it is finite, and whether the
    non-finite planes are non-finite in y too. Forward: relative to max |y|, at least 1. Backward: relative to the size
    of the terms dx is computed from, rstd * |dy| (dx itself may cancel to ~0)."""
    y, dx, dy = (_array(t, expected_y.dtype) for t in (y, dx, dy))
    finite = np.broadcast_to(np.isfinite(expected_y).all(axis=(2, 3), keepdims=True), expected_y.shape)
    nan_planes_agree = bool(np.isnan(y[~finite]).all()) if (~finite).any() else True
    if not finite.any():
        return 0.0, 0.0, nan_planes_agree
    e_y, a_y, a_dx = expected_y[finite], y[finite], dx[finite]
    forward = float(np.abs(a_y - e_y).max() / max(np.abs(e_y).max(), 1.0))  # (a constant plane's y is 0)
    scale = max(float((np.broadcast_to(rstd, expected_y.shape)[finite] * np.abs(dy).max()).max()),
                float(np.abs(expected_dx[finite]).max()), 1e-30)
    backward = float(np.abs(a_dx - expected_dx[finite]).max() / scale)
    return (math.inf if np.isnan(a_y).any() else forward), (math.inf if np.isnan(a_dx).any() else backward), \
        nan_planes_agree


def check_path(case: str, dtype: torch.dtype, channels_last: bool, activation: str, slope: float, impl: str,
               device: str = "cpu"):
    """Assert the accuracy rule for one path on one hard input (see the module docstring). ``impl``: an ``impl`` of
    the op, or "python kernels" (``python_kernels_result``); ``device``: where it runs; the module and the reference
    it is compared with run on the CPU."""
    x = make_input(case, dtype, channels_last)
    dy = torch.randn(x.shape, generator=_generator(3)).to(dtype)
    expected_y, expected_dx, rstd = oracle(x, dy, activation, slope)

    y, dx = result_of(impl, x, dy, activation, slope, device)
    assert y.dtype == dtype and dx.dtype == dtype
    forward, backward, nan_planes = errors(y, dx, expected_y, expected_dx, rstd, dy)
    assert nan_planes, f"{impl}: a plane holding NaN or inf must give NaN"
    floor = 2 * UNIT_ROUNDOFF[dtype]
    module_forward, module_backward, _ = errors(*module_result(x, dy, activation, slope), expected_y, expected_dx,
                                                rstd, dy)
    reference_forward, reference_backward, _ = errors(*path_result(x, dy, activation, slope, "reference"),
                                                      expected_y, expected_dx, rstd, dy)
    assert forward <= max(2 * module_forward, 2 * reference_forward, floor), \
        f"forward error {forward:.3g}: nn.InstanceNorm2d {module_forward:.3g}, reference {reference_forward:.3g}"
    assert backward <= max(2 * module_backward, 2 * reference_backward, floor), \
        f"backward error {backward:.3g}: nn.InstanceNorm2d {module_backward:.3g}, reference {reference_backward:.3g}"
    if dtype == torch.float64 and impl != "reference":  # (the reference is nn.InstanceNorm2d's arithmetic)
        assert forward <= 1e-10 and backward <= 1e-10, f"float64 errors {forward:.3g}, {backward:.3g}"


# eps = 0 on a constant plane (var + eps = 0): PyTorch's invstd is 0 there, so y and dx are 0, not 0 * inf = NaN.
# Sizes: a one-value plane, a small one, and one that the CPU and Triton kernels sum in several chunks.
EPS_0_SIZES = [(1, 1), (3, 3), (256, 160)]


def eps_0_case(dtype: torch.dtype, height: int, width: int):
    """A constant plane (var = 0) beside a random one, and a gradient."""
    g = _generator(14)
    x = torch.cat([torch.full((1, 1, height, width), 7.0), torch.randn(1, 1, height, width, generator=g)], 1)
    return x.to(dtype), torch.randn(x.shape, generator=g).to(dtype)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max())


def check_eps_0(size, dtype: torch.dtype, activation: str, impl: str, device: str = "cpu"):
    """With eps = 0 the constant plane gives exactly 0 in y and dx, and the random plane matches float64 to the
    parity tests' bounds (1e-12 in float64, 1e-5 in float32, twice the dtype's rounding of the result in 16 bit).
    ``impl``: an ``impl`` of the op, or "python kernels"; ``device``: where it runs."""
    x, dy = eps_0_case(dtype, *size)
    if impl == "python kernels":
        module = importlib.import_module("fastp2phd.ops.instance_norm_act")
        y, mean, rstd = module._forward_reference_kernel(x, activation, 0.2, 0.0)
        dx = module._backward_formula(dy, x, mean, rstd, activation, 0.2)
    else:
        xr = x.detach().to(device).requires_grad_(True)
        y = instance_norm_act(xr, activation, 0.2, 0.0, impl=impl)
        (dx,) = torch.autograd.grad(y, xr, dy.to(device))
        y, dx = y.detach().cpu(), dx.cpu()
    zero = torch.zeros_like(x[:, :1])
    assert torch.equal(y[:, :1], zero), f"{impl}: y of the constant plane is {y[:, :1].flatten()[:3].tolist()}"
    assert torch.equal(dx[:, :1], zero), f"{impl}: dx of the constant plane is {dx[:, :1].flatten()[:3].tolist()}"
    if size == (1, 1):  # a one-value plane gives 0 whatever its value
        assert torch.equal(y, torch.zeros_like(x)) and torch.equal(dx, torch.zeros_like(x))
        return
    x64 = x[:, 1:].double().requires_grad_(True)
    y64 = _act((x64 - x64.mean(dim=(2, 3), keepdim=True)) / x64.var(dim=(2, 3), correction=0, keepdim=True).sqrt(),
               activation, 0.2)
    (dx64,) = torch.autograd.grad(y64, x64, dy[:, 1:].double())
    for actual, expected in ((y[:, 1:], y64.detach()), (dx[:, 1:], dx64)):
        bound = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or 2 * _rel_err(expected.to(dtype), expected)
        assert _rel_err(actual, expected) <= bound, f"{impl}: the random plane's error {_rel_err(actual, expected):.3g}"


TIE_SHAPES = {"blocks": (1, 2, 50, 50), "channels": (1, 40, 7, 9)}  # (planes merged from blocks; channels_last rows)


def check_ties(shape, dtype: torch.dtype, channels_last: bool, impl: str, device: str = "cpu"):
    """Small integers whose plane means are integers too, so many pixels sit exactly at their plane's mean: xhat is 0
    there, where leaky_relu's gradient is the slope. A mean an ulp off (merged from blocks or from channels_last
    rows) passed dy unscaled at those pixels, 0.5-0.8 of dx off."""
    g = torch.Generator().manual_seed(0)
    xd = torch.randint(-3, 4, shape, generator=g).double()
    total = xd.sum(dim=(2, 3))
    xd[:, :, 0, 0] -= total - (total / (shape[2] * shape[3])).round() * (shape[2] * shape[3])
    dyd = torch.randn(shape, generator=g).to(dtype).double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    _, dx = result_of(impl, xd.to(dtype).contiguous(memory_format=layout), dyd.to(dtype), "leaky_relu", 0.2, device)
    centred = xd - xd.mean(dim=(2, 3), keepdim=True)  # (exact: integers)
    rstd = (centred.square().mean(dim=(2, 3), keepdim=True) + 1e-5).rsqrt()
    xhat = centred * rstd
    gate = torch.where(xhat > 0, dyd, 0.2 * dyd)
    expected = rstd * (gate - gate.mean(dim=(2, 3), keepdim=True) - xhat * (gate * xhat).mean(dim=(2, 3), keepdim=True))
    assert (centred == 0).sum() > 100
    error = (dx.double() - expected).abs().max() / (rstd.max() * dyd.abs().max())
    assert error <= 4 * torch.finfo(dtype).eps, f"{impl}: dx off by {error:.2e} of rstd * |dy|"


def check_huge_bfloat16(impl: str, device: str = "cpu"):
    """bfloat16 values whose squares overflow float32 (where the CPU kernel sums bfloat16 in one pass): they gave
    y = 0."""
    values = torch.tensor([1e19, -1e19, 3e19, -3e19])
    y, _ = result_of(impl, values.bfloat16().view(1, 1, 2, 2), torch.ones(1, 1, 2, 2, dtype=torch.bfloat16), "none",
                     0.0, device)
    torch.testing.assert_close(y.float().flatten(), values / values.square().mean().sqrt(), rtol=2 ** -7, atol=0)
