"""pix2pixHD's losses: adversarial (LSGAN or vanilla), discriminator feature matching, VGG perceptual."""
from __future__ import annotations

import os
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..ops._common import tangents_may_flow
from .layers import checkpointed
from .vgg import Vgg19

DiscriminatorOutput = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]]


class GANLoss(nn.Module):
    """Adversarial loss summed over the discriminators of a MultiscaleDiscriminator.

    ``use_lsgan=True``: mean squared error to the target label (pix2pixHD's default).
    ``use_lsgan=False`` (``--no_lsgan``): binary cross entropy. The discriminators
    here output logits (``use_sigmoid=False``), so BCE is computed from logits,
    which equals the original BCE(sigmoid(x)) without its overflow; pass
    ``from_logits=False`` for a discriminator built with ``use_sigmoid=True``.
    ``input`` is a discriminator's output: a list per scale whose last entry is
    the prediction, or a single prediction list/tensor.
    """

    def __init__(self, use_lsgan: bool = True, target_real_label: float = 1.0,
                 target_fake_label: float = 0.0, from_logits: bool = True):
        super().__init__()
        self.use_lsgan = use_lsgan
        self.real_label = float(target_real_label)
        self.fake_label = float(target_fake_label)
        self.from_logits = from_logits

    def _one(self, pred: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        target = self.real_label if target_is_real else self.fake_label
        # In float32 at least, under autocast too, as CUDA's autocast runs mse_loss and BCE.
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
        if self.use_lsgan:
            return (pred - target).pow(2).mean()
        target_tensor = torch.full_like(pred, target)
        if self.from_logits:
            return F.binary_cross_entropy_with_logits(pred, target_tensor)
        return F.binary_cross_entropy(pred, target_tensor)

    def forward(self, input: DiscriminatorOutput, target_is_real: bool) -> torch.Tensor:
        if isinstance(input, torch.Tensor):
            return self._one(input, target_is_real)
        if isinstance(input[0], (list, tuple)):
            return sum(self._one(scale[-1], target_is_real) for scale in input)
        return self._one(input[-1], target_is_real)


# A difference wider than its inputs (float32, of bf16 features under autocast) is taken this many elements at a
# time: at VGG's first layer at 2048x1024 a whole one is 512 MiB, four times the signs kept for backward.
WIDENED_CHUNK_ELEMENTS = 1 << 24


class _SignSavingL1(torch.autograd.Function):
    """mean |x - y| that keeps only sign(x - y), one byte per element, for backward.

    ``F.l1_loss`` keeps the whole difference (or both inputs) until backward; the gradient needs only its sign.
    Value and gradient are bit for bit ``F.l1_loss``'s, except where the difference is wider than both inputs and
    larger than ``WIDENED_CHUNK_ELEMENTS``: it is then taken and summed a few channels at a time (the sum in
    float64), which rounds the value differently, as closely; the gradient stays bit for bit.
    """

    @staticmethod
    def forward(ctx, x, y, dtype):
        ctx.numel, ctx.dtypes = x.numel(), (x.dtype, y.dtype)
        widened = dtype.itemsize > max(x.dtype.itemsize, y.dtype.itemsize)
        chunks = _chunks(x, WIDENED_CHUNK_ELEMENTS) if widened else []
        if len(chunks) < 2:
            # One full-size temporary: the difference in ``dtype`` (x converted, y promoted inside the kernel).
            diff = x.to(dtype, copy=True).sub_(y)
            ctx.save_for_backward(_sign(diff))
            return diff.abs_().mean()
        sign = torch.empty_like(x, dtype=torch.int8)
        total = x.new_zeros((), dtype=torch.float64)
        for start, length in chunks:
            total += _abs_sum_and_sign(x.narrow(1, start, length), y.narrow(1, start, length), dtype,
                                       sign.narrow(1, start, length))
        ctx.save_for_backward(sign)
        return (total / ctx.numel).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        # PyTorch's gradient is (grad / numel) * sign(diff), then cast to the input's dtype. Multiplying
        # by -1, 0 or 1 is exact, so scaling the int8 sign by the scale in the input's dtype gives the same
        # values in one full-size tensor.
        (sign,) = ctx.saved_tensors
        scale = grad / ctx.numel
        grads = [_scaled(sign, scale.to(dtype) if sign_of_input > 0 else -scale.to(dtype)) if needed else None
                 for needed, dtype, sign_of_input in zip(ctx.needs_input_grad, ctx.dtypes, (1, -1))]
        return grads[0], grads[1], None


def _scaled(sign: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 ``sign`` times the 0-dim ``scale``, in the scale's dtype. A GPU multiplies the int8 directly, in one
    kernel; the CPU's mixed-dtype multiply is not vectorised (1.7x the time of converting first, then scaling in
    place, at 1x64x512x1024), so there it converts first."""
    if sign.device.type == "cpu":
        return sign.to(scale.dtype).mul_(scale)
    return sign * scale


def _sign(diff: torch.Tensor) -> torch.Tensor:
    """torch.sign as int8, without a full-size float: the two comparisons' bytes read as int8 (True is 1), no
    copies. A NaN difference gets 0, as torch.sign gives (so F.l1_loss's gradient is 0 there too). Compiled, the
    comparisons are converted instead: Inductor fuses them into one kernel either way, and before torch 2.13 it
    cannot lower a bool tensor viewed as int8."""
    if torch.compiler.is_compiling():
        return diff.gt(0).to(torch.int8) - diff.lt(0).to(torch.int8)
    sign = diff.gt(0).view(torch.int8)
    return sign.sub_(diff.lt(0).view(torch.int8))


def _abs_sum_and_sign(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, sign: torch.Tensor) -> torch.Tensor:
    """sum |x - y| in ``dtype``, writing sign(x - y) into ``sign``; the difference is freed on return."""
    diff = x.to(dtype, copy=True).sub_(y)
    sign.copy_(_sign(diff))
    return diff.abs_().sum()


def _chunks(x: torch.Tensor, elements: int) -> list[tuple[int, int]]:
    """(start, length) along dim 1 (channels) of about ``elements`` each; none for fewer than 2 dims."""
    if x.dim() < 2:
        return []
    per_channel = max(1, x.numel() // x.shape[1])
    step = max(1, elements // per_channel)
    return [(start, min(step, x.shape[1] - start)) for start in range(0, x.shape[1], step)]


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.l1_loss(x, y)`` (mean reduction, same values and gradients), saving 1 byte per element for
    backward instead of a full-precision difference. Under autocast it runs in float32 at least, as CUDA's
    autocast runs ``l1_loss`` (float64 stays float64). Under forward AD or a torch.func transform it is
    ``F.l1_loss`` itself."""
    if x.shape != y.shape:
        raise InvalidArgumentError(f"l1_loss: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    dtype = torch.promote_types(x.dtype, y.dtype)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.promote_types(dtype, torch.float32)
    if tangents_may_flow():
        # Forward AD and torch.func's transforms: _SignSavingL1 has no jvp (one would stop Dynamo tracing it).
        return F.l1_loss(x.to(dtype), y.to(dtype))
    return _SignSavingL1.apply(x, y, dtype)


def feature_matching_loss(
    pred_fake: Sequence[Sequence[torch.Tensor]],
    pred_real: Sequence[Sequence[torch.Tensor]],
    lambda_feat: float = 10.0,
) -> torch.Tensor:
    """pix2pixHD's discriminator feature-matching loss.

    L1 between the fake and (detached) real intermediate features of every
    discriminator, over all layers but the prediction, each weighted
    ``lambda_feat * 4 / (n_layers_D + 1) / num_D``. Inputs are MultiscaleDiscriminator
    outputs with intermediate features (n_layers_D + 2 entries per scale).
    """
    num_D = len(pred_fake)
    if num_D == 0 or len(pred_real) != num_D:
        raise InvalidArgumentError(f"feature_matching_loss: got {num_D} fake and {len(pred_real)} real discriminator outputs")
    if len(pred_fake[0]) < 2:
        raise InvalidArgumentError(
            "feature_matching_loss: the discriminator returned no intermediate features; build it with "
            "getIntermFeat=True (or train with --no_ganFeat_loss)"
        )
    feat_weight = 4.0 / (len(pred_fake[0]) - 1)  # 4 / (n_layers_D + 1)
    loss = pred_fake[0][0].new_zeros(())
    for fake, real in zip(pred_fake, pred_real):
        for f, r in zip(fake[:-1], real[:-1]):
            loss = loss + l1_loss(f, r.detach()) * (feat_weight / num_D * lambda_feat)
    return loss


RECOMPUTED_SLICES = 3


class VGGLoss(nn.Module):
    """Perceptual L1 loss on VGG19 relu1_1..relu5_1 weighted 1/32, 1/16, 1/8, 1/4, 1.

    As in pix2pixHD, multiply by ``lambda_feat`` outside. ``vgg_weights``: the path to
    torchvision's VGG19 weights (see ``fastp2phd.models.vgg`` for where they are
    looked up); ``vgg`` lets a caller pass an already built ``Vgg19``.

    The two images go through VGG one slice at a time, each slice's loss taken before
    the next, so the target's features are freed as soon as they are used, and
    ``l1_loss`` keeps only signs for backward: the same loss and gradient as comparing
    the five feature maps of each image, in far less memory. ``checkpoint=True`` also
    recomputes each slice on ``x`` in backward instead of keeping its activations.
    """

    weights = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)

    def __init__(self, vgg_weights: str | os.PathLike | None = None, *, download: bool = True, vgg: Vgg19 | None = None,
                 checkpoint: bool = False):
        super().__init__()
        self.vgg = vgg if vgg is not None else Vgg19(vgg_weights, download=download)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        recompute = self.checkpoint and torch.is_grad_enabled()
        for k, (weight, vgg_slice) in enumerate(zip(self.weights, self.vgg.slices())):
            x = checkpointed(vgg_slice, x) if recompute and k < RECOMPUTED_SLICES else vgg_slice(x)
            with torch.no_grad():
                y = vgg_slice(y)
            loss = loss + weight * l1_loss(x, y)
        return loss
