"""Layout fuzz: the fast paths on the strided views users pass every day.

Every input is a window into a larger buffer filled with a sentinel (NaN for
floats, the id type's largest value for ids), with a margin of sentinel before
and after. After an op ran, forward and backward, the sentinel outside the
window and the window's own values must be untouched, so a kernel that writes
through an input's strides, or outside them, fails here even where the
interpreter would survive it; a kernel that reads outside its input picks up
the sentinel and fails the value check. Results are compared with the
reference on contiguous copies, and the output must have the layout the op
promises (``memory_format_of`` of the input) and never alias an input.

The drivers (``check_instance_norm_act``, ``check_instance_mean``,
``check_boundary_map``) take the impl and device, so the C++ paths (main
suite), the Triton kernels (interpreter suite) and the CUDA paths
(``tests/ops/<op>/test_cuda.py``) run the same sweep.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from support import grad_err, rel_err

from fastp2phd import ops
from fastp2phd.ops._common import memory_format_of
from fastp2phd.ops.boundary_map import OUTPUT_DTYPES

CL = torch.channels_last


# Each kind: (shape of the buffer's tensor for a view of shape (n, c, h, w), whether that tensor is
# channels_last, and how the view is taken from it).
VIEW_KINDS = {
    "contiguous": (lambda n, c, h, w: (n, c, h, w), False, lambda t: t),
    "channels_last": (lambda n, c, h, w: (n, c, h, w), True, lambda t: t),
    "channel split": (lambda n, c, h, w: (n, c + 3, h, w), False, lambda t: t[:, 2:2 + t.shape[1] - 3]),
    "channels_last channel split": (lambda n, c, h, w: (n, c + 3, h, w), True, lambda t: t[:, 1:t.shape[1] - 2]),
    "batch step": (lambda n, c, h, w: (2 * n + 1, c, h, w), False, lambda t: t[1::2]),
    "width step": (lambda n, c, h, w: (n, c, h, 2 * w), False, lambda t: t[..., 1::2]),
    "height step and crop": (lambda n, c, h, w: (n, c, 2 * h + 3, w + 2), False,
                             lambda t: t[:, :, 3::2, 1:t.shape[3] - 1]),
    "crop": (lambda n, c, h, w: (n, c, h + 3, w + 4), False, lambda t: t[:, :, 1:t.shape[2] - 2, 2:t.shape[3] - 2]),
    "channels_last crop": (lambda n, c, h, w: (n, c, h + 2, w + 3), True,
                           lambda t: t[:, :, 1:t.shape[2] - 1, 1:t.shape[3] - 2]),
    "transposed back": (lambda n, c, h, w: (n, c, w, h), False, lambda t: t.transpose(2, 3)),
    "flip": (lambda n, c, h, w: (n, c, h, w), False, lambda t: t.flip(3)),  # a copy: PyTorch has no negative strides
    "expanded batch": (lambda n, c, h, w: (1, c, h, w), False, None),  # handled in guarded_view
}

MARGIN = 7  # sentinel elements before and after the buffer's tensor


def sentinel_of(dtype: torch.dtype):
    if dtype.is_floating_point:
        return float("nan")
    return torch.iinfo(dtype).max


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN."""
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


@dataclass
class Guarded:
    """A view (``tensor``) into ``flat``, a sentinel-filled buffer; ``check`` says whether anything moved."""

    flat: torch.Tensor
    tensor: torch.Tensor
    window: torch.Tensor  # the part of flat the view reads (the view itself, or what a copy was taken from)
    window_before: torch.Tensor
    sentinel: float | int

    def check(self, name: str) -> None:
        inside = torch.zeros(self.flat.numel(), dtype=torch.bool, device=self.flat.device)
        positions = torch.arange(self.flat.numel(), device=self.flat.device)
        offset = self.window.storage_offset() - self.flat.storage_offset()
        inside[torch.as_strided(positions, self.window.shape, self.window.stride(), offset).reshape(-1)] = True
        outside = self.flat[~inside]
        fill = torch.full_like(outside, self.sentinel)
        assert same(outside, fill), f"{name}: a kernel wrote outside its view (the sentinel around it changed)"
        assert same(self.window, self.window_before), f"{name}: a kernel wrote into its input"


def guarded_view(kind: str, values: torch.Tensor) -> Guarded:
    """``values`` (N, C, H, W) placed as a ``kind`` view into a sentinel-filled buffer.

    For "expanded batch" the view is values[:1] expanded to N items.
    """
    n, c, h, w = values.shape
    big_shape, channels_last, take = VIEW_KINDS[kind]
    shape = big_shape(n, c, h, w)
    sentinel = sentinel_of(values.dtype)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    flat = torch.full((numel + 2 * MARGIN,), sentinel, dtype=values.dtype, device=values.device)
    if channels_last:  # strides of an (n, c, h, w) channels_last tensor over flat[MARGIN:]
        big = torch.as_strided(flat, shape, (shape[1] * shape[2] * shape[3], 1, shape[1] * shape[3], shape[1]), MARGIN)
    else:
        big = flat[MARGIN:MARGIN + numel].view(shape)
    if kind == "expanded batch":
        big.copy_(values[:1])
        view = big.expand(n, c, h, w)
        window = big
    elif kind == "flip":
        big.copy_(values.flip(3))
        view = take(big)
        window = big
    else:
        view = take(big)
        assert view.shape == values.shape, (kind, view.shape, values.shape)
        view.copy_(values)
        window = view
    return Guarded(flat, view, window, window.clone(), sentinel)


def random_shape(rng: random.Random) -> tuple[int, int, int, int]:
    """Mostly tiny shapes (1-pixel rows and columns, C = 1, odd sizes; batches of 2 or more, where batch
    strides matter, three times in four), now and then one big enough that the Triton kernels split a
    plane into several chunks."""
    n = rng.choice([1, 2, 2, 3])
    if rng.random() < 0.15:
        return n, rng.randint(1, 3), rng.randint(40, 56), rng.randint(45, 60)
    return n, rng.randint(1, 6), rng.randint(1, 9), rng.randint(1, 9)


# Relative tolerance per dtype: a few output roundings.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _assert_fresh_output(out: torch.Tensor, like: torch.Tensor, *inputs: Guarded) -> None:
    assert out.shape == like.shape
    expected_format = memory_format_of(like)
    assert out.is_contiguous(memory_format=expected_format), (
        f"output strides {out.stride()} are not {expected_format} for input strides {like.stride()}")
    for g in inputs:
        start = g.flat.data_ptr()
        end = start + g.flat.numel() * g.flat.element_size()
        assert not start <= out.data_ptr() < end, "the output aliases an input buffer"


def check_instance_norm_act(impl: str, device, rng: random.Random, x_kind: str, dtypes) -> str:
    """One fuzz case: forward and dx of a random instance_norm_act on an ``x_kind`` view, dy a random view."""
    shape = random_shape(rng)
    dtype = rng.choice(dtypes)
    activation = rng.choice(ops.ACTIVATIONS)
    slope = rng.choice([0.2, 0.0, -0.5])
    dy_kind = rng.choice(list(VIEW_KINDS))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    case = f"{x_kind} x, {dy_kind} dy, {shape}, {dtype}, {activation}({slope})"
    gx = guarded_view(x_kind, (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).to(device))
    gdy = guarded_view(dy_kind, torch.randn(shape, generator=g).to(dtype).to(device))
    x = gx.tensor.requires_grad_(True)
    y = ops.instance_norm_act(x, activation, slope, impl=impl)
    (dx,) = torch.autograd.grad(y, x, gdy.tensor)
    gx.check(case)
    gdy.check(case)
    _assert_fresh_output(y, x, gx, gdy)
    assert dx.shape == x.shape

    x64 = x.detach().double().contiguous().requires_grad_(True)
    expected = ops.instance_norm_act(x64, activation, slope, impl="reference")
    (expected_dx,) = torch.autograd.grad(expected, x64, gdy.tensor.double().contiguous())
    assert rel_err(y, expected) <= TOLERANCE[dtype], case
    assert grad_err(dx, expected_dx, x64, gdy.tensor.double()) <= TOLERANCE[dtype], case
    return case


def _random_ids(rng: random.Random, g: torch.Generator, shape, id_dtype) -> torch.Tensor:
    n, _, h, w = shape
    count = rng.choice([1, 2, 3, 7, 40])
    ids = torch.randint(0, count, (n, 1, h, w), generator=g)
    if id_dtype in (torch.int32, torch.int64, torch.float32, torch.float64) and rng.random() < 0.5:
        ids = ids * 1000 + 26000  # Cityscapes-style sparse ids
    return ids.to(id_dtype)


ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32)


def check_instance_mean(impl: str, device, rng: random.Random, feat_kind: str, dtypes) -> str:
    """One fuzz case: forward and gradient of instance_mean, feat an ``feat_kind`` view, inst and dy random views."""
    shape = random_shape(rng)
    dtype = rng.choice(dtypes)
    id_dtype = rng.choice(ID_DTYPES)
    inst_kind = rng.choice(list(VIEW_KINDS))
    dy_kind = rng.choice(list(VIEW_KINDS))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    case = f"{feat_kind} feat, {inst_kind} inst, {dy_kind} dy, {shape}, {dtype}, {id_dtype} ids"
    gf = guarded_view(feat_kind, torch.randn(shape, generator=g).to(dtype).to(device))
    gi = guarded_view(inst_kind, _random_ids(rng, g, shape, id_dtype).to(device))
    gdy = guarded_view(dy_kind, torch.randn(shape, generator=g).to(dtype).to(device))
    feat = gf.tensor.requires_grad_(True)
    out = ops.instance_mean(feat, gi.tensor, impl=impl)
    (dfeat,) = torch.autograd.grad(out, feat, gdy.tensor)
    for guarded in (gf, gi, gdy):
        guarded.check(case)
    _assert_fresh_output(out, feat, gf, gi, gdy)

    inst = gi.tensor.contiguous()
    expected = ops.instance_mean(feat.detach().double().contiguous(), inst, impl="reference")
    expected_grad = ops.instance_mean(gdy.tensor.double().contiguous(), inst, impl="reference")
    assert rel_err(out, expected) <= TOLERANCE[dtype], case
    assert rel_err(dfeat, expected_grad) <= TOLERANCE[dtype], case
    return case


def check_boundary_map(impl: str, device, rng: random.Random, inst_kind: str) -> str:
    """One fuzz case: boundary_map of an ``inst_kind`` view, random id and output dtypes."""
    n, _, h, w = random_shape(rng)
    id_dtype = rng.choice(ID_DTYPES)
    out_dtype = rng.choice(OUTPUT_DTYPES)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    case = f"{inst_kind} inst, {(n, 1, h, w)}, {id_dtype} ids, {out_dtype} out"
    gi = guarded_view(inst_kind, _random_ids(rng, g, (n, 1, h, w), id_dtype).to(device))
    out = ops.boundary_map(gi.tensor, dtype=out_dtype, impl=impl)
    gi.check(case)
    _assert_fresh_output(out, gi.tensor, gi)
    assert out.dtype == out_dtype
    assert torch.equal(out, ops.boundary_map(gi.tensor.contiguous(), dtype=out_dtype, impl="reference")), case
    return case
