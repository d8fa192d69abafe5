"""VGG19 features for pix2pixHD's perceptual loss, and where its weights come from.

``Vgg19`` holds torchvision's ``vgg19().features`` layers 0..29 under the same
keys (``features.<i>.weight``), so torchvision's standard weight file
``vgg19-dcbb9e9d.pth`` loads without torchvision installed. The weights are
looked for, in order, at the path given, at ``$FASTP2PHD_VGG19_WEIGHTS``, and in
torch's hub cache (``torch.hub.get_dir()/checkpoints``); when none is there they
are downloaded into the hub cache (as torchvision would) unless ``download=False``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointReadError, Pix2PixHDError
from ..files import load_torch

VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILENAME = "vgg19-dcbb9e9d.pth"
VGG19_WEIGHTS_ENV = "FASTP2PHD_VGG19_WEIGHTS"

# torchvision's VGG19 configuration: channels of each 3x3 conv, "M" for a max pool.
_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
# Outputs after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (feature indices 1, 6, 11, 20, 29).
_SLICE_ENDS = (2, 7, 12, 21, 30)


class VGGWeightsNotFound(Pix2PixHDError, FileNotFoundError):
    """No VGG19 weight file was found and none could be downloaded."""


def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILENAME


def find_vgg19_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The first VGG19 weight file among ``path``, ``$FASTP2PHD_VGG19_WEIGHTS`` and the hub cache."""
    for candidate, origin in ((path, "the path given"), (os.environ.get(VGG19_WEIGHTS_ENV), f"${VGG19_WEIGHTS_ENV}")):
        if candidate:
            if not os.path.isfile(candidate):
                raise VGGWeightsNotFound(f"VGG19 weights from {origin} ({candidate}) do not exist; fix the path or unset it")
            return Path(candidate)
    cached = hub_weights_path()
    return cached if cached.is_file() else None


class _MaxPoolKeepingItsInput(torch.autograd.Function):
    """F.max_pool2d, whose backward finds the maxima again from the input instead of keeping their int64 indices.

    The input is kept by the layers around it anyway (VGG's ReLU keeps it), so the indices (8 bytes an output
    element, 480 MiB over VGG's pools at 2048x1024) are what the pool alone held; finding them again costs one more
    pass over the input. Values and gradients are F.max_pool2d's bit for bit (the same kernels), ties and NaN
    included; backward is differentiable (double backward), and forward AD and torch.func's transforms work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel_size, stride, padding, dilation, ceil_mode):
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *ctx.pool = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def _indices(ctx, x):
        with torch.no_grad():
            return F.max_pool2d(x, *ctx.pool, return_indices=True)[1]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        indices = _MaxPoolKeepingItsInput._indices(ctx, x)
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, _pair(kernel_size), _pair(stride),
                                                             _pair(padding), _pair(dilation), ceil_mode, indices)
        return dx, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_tangent, *_):
        (x,) = ctx.saved_tensors
        indices = _MaxPoolKeepingItsInput._indices(ctx, x)
        return x_tangent.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)


def _pair(value) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)


class IndexFreeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same values and gradients) that keeps no int64 indices for backward
    (``_MaxPoolKeepingItsInput``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compiled, the native pool: what backward keeps is the partitioner's choice there (and Dynamo does not
        # trace a Function with a custom jvp).
        if self.return_indices or torch.compiler.is_compiling() or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaxPoolKeepingItsInput.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                             self.ceil_mode)


class Vgg19(nn.Module):
    """Frozen VGG19 trunk returning relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1.

    Like pix2pixHD, images in [-1, 1] are fed as they are (no ImageNet normalisation).
    ``weights``: a path to the weight file; None looks it up as the module docstring says.
    ``pretrained=False`` builds random weights (for tests).
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, pretrained: bool = True, download: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _CONFIG:
            if item == "M":
                layers.append(IndexFreeMaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(True)]
                channels = item
        self.features = nn.Sequential(*layers)
        assert len(self.features) == _SLICE_ENDS[-1]
        if pretrained:
            self.load_weights(weights, download=download)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights: str | os.PathLike | None = None, *, download: bool = True) -> None:
        path = find_vgg19_weights(weights)
        if path is not None:
            state_dict = load_torch(path, "VGG19 weight file")
        elif download:
            try:
                state_dict = torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise VGGWeightsNotFound(_missing_message(f"downloading {VGG19_URL} failed: {exc}")) from exc
        else:
            raise VGGWeightsNotFound(_missing_message("downloading is off"))
        try:
            self.load_torchvision_state_dict(state_dict)
        except CheckpointReadError as exc:
            raise CheckpointReadError(f"the VGG19 weight file {path or VGG19_URL} is not usable: {exc}") from None

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a torchvision VGG19 state_dict (``features.*`` keys, or a bare ``features`` one)."""
        if not isinstance(state_dict, dict):
            raise CheckpointReadError(f"it holds a {type(state_dict).__name__}, not torchvision's VGG19 state_dict")
        if not any(k.startswith("features.") for k in state_dict):
            state_dict = {f"features.{k}": v for k, v in state_dict.items()}
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        bad = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if missing or bad:
            raise CheckpointReadError(f"it is not torchvision's VGG19 state_dict (missing {missing[:3]}, shapes "
                                      f"differ {bad[:3]}); use vgg19-dcbb9e9d.pth")
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)

    def slices(self) -> list[nn.Sequential]:
        """The five pieces of the trunk: each takes the previous one's output and ends at relu{k}_1."""
        return [self.features[start:end] for start, end in zip((0,) + _SLICE_ENDS[:-1], _SLICE_ENDS)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for vgg_slice in self.slices():
            x = vgg_slice(x)
            outputs.append(x)
        return outputs


def _missing_message(reason: str) -> str:
    return (
        f"VGG19 weights for the perceptual loss were not found ({reason}): put torchvision's {VGG19_FILENAME} "
        f"at {hub_weights_path()}, or pass its path (--vgg_weights, vgg_weights=..., or ${VGG19_WEIGHTS_ENV}), "
        "or train without the VGG loss (--no_vgg_loss)"
    )
