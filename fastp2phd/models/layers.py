"""Building blocks shared by the networks: normalisation + activation, padding.

Each helper returns the same number of ``nn.Sequential`` slots as the original
pix2pixHD code, so parameter keys line up with official checkpoints whether a
network is built fused (InstanceNormAct2d, Identity) or plain (InstanceNorm2d, ReLU).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import InvalidArgumentError
from ..nn import InstanceNormAct2d
from ..ops._common import forward_ad_active, functorch_transform

NORMS = ("instance", "batch")
PADDINGS = ("reflect", "replicate", "zero")


def check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgumentError(f"{owner}: {name} must be one of {choices}, got {value!r}")


def check_sizes(owner: str, non_negative: tuple[str, ...] = (), **sizes: int) -> None:
    """Every size must be a positive integer, except those named in ``non_negative``, which may be 0."""
    for name, value in sizes.items():
        minimum = 0 if name in non_negative else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "non-negative" if minimum == 0 else "positive"
            raise InvalidArgumentError(f"{owner}: {name} must be a {kind} integer, got {value!r}")


def init_weights(module: nn.Module) -> None:
    """pix2pixHD's initialisation of one module (``net.apply(init_weights)``, as the original's ``weights_init``):
    convolution weights from N(0, 0.02), BatchNorm2d weights from N(1, 0.02) and its biases 0. Convolution biases
    keep PyTorch's default, as in the original; the instance norms have no parameters."""
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def activation_layer(activation: str, negative_slope: float = 0.2) -> nn.Module:
    if activation == "relu":
        return nn.ReLU(True)
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope, True)
    raise InvalidArgumentError(f"unknown activation {activation!r}")


def norm_act(
    num_features: int,
    norm: str,
    activation: str,
    *,
    fused: bool,
    impl: str,
    negative_slope: float = 0.2,
) -> list[nn.Module]:
    """[norm, activation] (two slots), or [norm] when activation is "none"."""
    if norm == "instance" and fused:
        layers: list[nn.Module] = [InstanceNormAct2d(num_features, activation, negative_slope, impl=impl)]
        return layers + ([nn.Identity()] if activation != "none" else [])
    if norm == "instance":
        layers = [nn.InstanceNorm2d(num_features, affine=False)]
    elif norm == "batch":
        layers = [nn.BatchNorm2d(num_features)]
    else:
        raise InvalidArgumentError(f"norm must be one of {NORMS}, got {norm!r}")
    return layers + ([activation_layer(activation, negative_slope)] if activation != "none" else [])


def padded_conv(
    in_channels: int, out_channels: int, kernel_size: int, padding_type: str
) -> list[nn.Module]:
    """A stride-1 'same' convolution: [pad, conv] for reflect/replicate, [conv] for zero padding."""
    amount = kernel_size // 2
    if padding_type == "zero":
        return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=amount)]
    pad = nn.ReflectionPad2d(amount) if padding_type == "reflect" else nn.ReplicationPad2d(amount)
    return [pad, nn.Conv2d(in_channels, out_channels, kernel_size)]


def check_input(network: nn.Module, x, channels: int, multiple: int = 1, flag_hint: str = "") -> None:
    """One clear sentence for a wrong rank, device, channel count, or a size the network cannot round-trip."""
    owner = type(network).__name__
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgumentError(f"{owner}: expected an (N, C, H, W) tensor, got {shape}")
    weight = next(network.parameters(), None)
    if weight is not None and weight.device != x.device:
        raise InvalidArgumentError(
            f"{owner}: the input is on {x.device} but the network is on {weight.device}; move one with .to(device)"
        )
    if x.shape[1] != channels:
        raise InvalidArgumentError(
            f"{owner}: expected {channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
            + (f"; {flag_hint}" if flag_hint else "")
        )
    if multiple > 1 and (x.shape[2] % multiple or x.shape[3] % multiple):
        raise InvalidArgumentError(
            f"{owner}: height and width must be multiples of {multiple} (2^downsamplings), got "
            f"{x.shape[2]}x{x.shape[3]}; resize or crop the input to a multiple of {multiple}"
        )


# ----------------------------------------------------------------------------- activation checkpointing

def checkpointed(fn, *args):
    """``fn(*args)``, keeping only ``args`` for backward and recomputing the rest there (non-reentrant
    ``torch.utils.checkpoint``, which restores the RNG and autocast state: the same values). Under a torch.func
    transform, which refuses the saved-tensor hooks checkpointing is built on, and under forward AD, which
    checkpointing before torch 2.13 cannot carry, ``fn(*args)`` keeping everything."""
    if functorch_transform() is not None or forward_ad_active():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def run_stages(layers: nn.Sequential, x: torch.Tensor, stages: list[tuple[int, int, bool]], checkpoint: bool):
    """``layers(x)``; with ``checkpoint`` (and autograd recording), every (start, end, recompute) stage
    marked ``recompute`` keeps only its input for backward and recomputes its activations there."""
    if not (checkpoint and torch.is_grad_enabled()):
        return layers(x)
    for start, end, recompute in stages:
        stage = layers[start:end]
        x = checkpointed(stage, x) if recompute else stage(x)
    return x
