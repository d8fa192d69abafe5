"""pix2pixHD generators: G1 ``GlobalGenerator`` and G2 ``LocalEnhancer``.

Layer order, and therefore every state_dict key, follows the original code, so
official ``latest_net_G.pth`` files load strictly. Networks are built fused by
default (InstanceNormAct2d + Identity where the original has InstanceNorm2d +
ReLU); ``fused=False`` builds the plain modules.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .checkpoint import OfficialCheckpointMixin, count_blocks, indexed_weights
from .layers import NORMS, PADDINGS, check_choice, check_input, check_sizes, norm_act, padded_conv, run_stages

_INPUT_FLAGS = (
    "pix2pixHD flags --label_nc (--input_nc when --label_nc 0), --no_instance and --feat_num: "
    "input channels = label_nc, +1 for the boundary map unless --no_instance, +feat_num with --instance_feat/--label_feat"
)


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, norm, act, (dropout), pad, conv3x3, norm](x)."""

    def __init__(
        self,
        dim: int,
        padding_type: str = "reflect",
        norm: str = "instance",
        activation: str = "relu",
        use_dropout: bool = False,
        *,
        fused: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        check_choice("ResnetBlock", "padding_type", padding_type, PADDINGS)
        check_choice("ResnetBlock", "norm", norm, NORMS)
        layers = padded_conv(dim, dim, 3, padding_type) + norm_act(dim, norm, activation, fused=fused, impl=impl)
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += padded_conv(dim, dim, 3, padding_type) + norm_act(dim, norm, "none", fused=fused, impl=impl)
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def global_generator_layers(
    input_nc: int,
    output_nc: int,
    ngf: int,
    n_downsampling: int,
    n_blocks: int,
    norm: str,
    padding_type: str,
    fused: bool,
    impl: str,
) -> tuple[list[nn.Module], list[tuple[int, int, bool]]]:
    """G1's layers: 7x7 conv, stride-2 downsampling, residual blocks, transposed-conv upsampling, 7x7 conv, tanh;
    and its stages (start, end, recompute) for activation checkpointing.

    Every stage is recomputed under checkpointing except the residual blocks: at G1's lowest
    resolution their activations are small (1024 x 64 x 32 at 1024x512) and their 1024-channel
    convolutions are most of G's compute. Elsewhere a stage's activations are large and its
    convolutions cheap. With no residual blocks this is also the feature Encoder's network.
    """

    def na(channels: int) -> list[nn.Module]:
        return norm_act(channels, norm, "relu", fused=fused, impl=impl)

    layers: list[nn.Module] = []
    stages: list[tuple[int, int, bool]] = []

    def stage(modules: list[nn.Module], recompute: bool = True) -> None:
        stages.append((len(layers), len(layers) + len(modules), recompute))
        layers.extend(modules)

    stage([nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7), *na(ngf)])
    for i in range(n_downsampling):
        mult = 2**i
        stage([nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1), *na(ngf * mult * 2)])
    mult = 2**n_downsampling
    for _ in range(n_blocks):
        stage([ResnetBlock(ngf * mult, padding_type, norm, fused=fused, impl=impl)], recompute=False)
    for i in range(n_downsampling):
        mult = 2 ** (n_downsampling - i)
        stage([nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
               *na(ngf * mult // 2)])
    stage([nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()])
    return layers, stages


def options_from_global_layers(state_dict: Mapping[str, Any], prefix: str = "model") -> dict[str, Any]:
    """input_nc, ngf, n_downsampling, n_blocks, norm of a G1 stored under ``prefix``."""
    weights = indexed_weights(state_dict, prefix)
    first = weights[1]
    # Down- and upsampling are 3x3 (transposed) convs between c and 2c channels, as many of each.
    resampling = [s for i, s in weights.items() if i > 1 and len(s) == 4 and s[2] == 3 and s[0] == 2 * s[1]]
    return {
        "input_nc": first[1],
        "ngf": first[0],
        "n_downsampling": len(resampling) // 2,
        "n_blocks": count_blocks(state_dict, prefix),
        "norm": "batch" if f"{prefix}.2.running_mean" in state_dict else "instance",
    }


def _padding_from_state_dict(state_dict: Mapping[str, Any]) -> str | None:
    """'zero' when residual blocks have no padding layers; reflect and replicate look alike."""
    if any(".conv_block.0.weight" in k for k in state_dict):
        return "zero"
    return None


class GlobalGenerator(OfficialCheckpointMixin, nn.Module):
    """G1 of pix2pixHD: label map (+ boundary map, + features) -> image in [-1, 1].

    Parameters follow the original ``GlobalGenerator`` with pix2pixHD's effective
    defaults (``--n_downsample_global 4``, instance norm, reflection padding).
    Height and width must be multiples of 2^n_downsampling. ``checkpoint=True`` recomputes every
    stage but the residual blocks in backward instead of keeping its activations
    (``--checkpoint_activations``; the same outputs and gradients).
    """

    FLAGS = {
        "input_nc": _INPUT_FLAGS,
        "output_nc": "pix2pixHD flag --output_nc",
        "ngf": "pix2pixHD flag --ngf",
        "n_downsampling": "pix2pixHD flag --n_downsample_global",
        "n_blocks": "pix2pixHD flag --n_blocks_global",
        "norm": "pix2pixHD flag --norm",
        "padding_type": "constructor option padding_type",
    }

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        n_downsampling: int = 4,
        n_blocks: int = 9,
        norm: str = "instance",
        padding_type: str = "reflect",
        *,
        fused: bool = True,
        impl: str = "auto",
        checkpoint: bool = False,
    ):
        super().__init__()
        check_sizes("GlobalGenerator", ("n_downsampling", "n_blocks"), input_nc=input_nc, output_nc=output_nc,
                    ngf=ngf, n_downsampling=n_downsampling, n_blocks=n_blocks)
        check_choice("GlobalGenerator", "norm", norm, NORMS)
        check_choice("GlobalGenerator", "padding_type", padding_type, PADDINGS)
        self.options = dict(input_nc=input_nc, output_nc=output_nc, ngf=ngf, n_downsampling=n_downsampling,
                            n_blocks=n_blocks, norm=norm, padding_type=padding_type)
        layers, self.stages = global_generator_layers(input_nc, output_nc, ngf, n_downsampling, n_blocks, norm,
                                                      padding_type, fused, impl)
        self.model = nn.Sequential(*layers)
        self.checkpoint = checkpoint

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript (which the original G1 takes): the layers alone
            return self.model(input)
        check_input(self, input, self.options["input_nc"], 2 ** self.options["n_downsampling"], _INPUT_FLAGS)
        return run_stages(self.model, input, self.stages, self.checkpoint)

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        options = options_from_global_layers(state_dict)
        weights = indexed_weights(state_dict, "model")
        options["output_nc"] = weights[max(weights)][0]
        options["padding_type"] = _padding_from_state_dict(state_dict)
        return options

    def checkpoint_hint(self, state_dict: Mapping[str, Any]) -> str:
        if any(k.startswith("model1_") for k in state_dict):
            return " It holds a local enhancer (keys model1_*): build a LocalEnhancer (pix2pixHD flag --netG local)."
        return super().checkpoint_hint(state_dict)


class LocalEnhancer(OfficialCheckpointMixin, nn.Module):
    """G2 of pix2pixHD: G1 at 1/2^n_local_enhancers resolution wrapped in local enhancer front/back ends.

    G1 (``self.model``) has ngf * 2^n_local_enhancers filters and loses its final
    7x7 conv and tanh; each enhancer n sums its front end's output with the
    coarser output before its back end. Inputs are downsampled by
    AvgPool2d(3, stride 2, padding 1, count_include_pad=False).
    Height and width must be multiples of 2^(n_downsample_global + n_local_enhancers).
    ``checkpoint=True`` recomputes every stage but G1's residual blocks in backward instead of
    keeping its activations (``--checkpoint_activations``; the same outputs and gradients).
    """

    FLAGS = {
        **GlobalGenerator.FLAGS,
        "n_downsample_global": "pix2pixHD flag --n_downsample_global",
        "n_blocks_global": "pix2pixHD flag --n_blocks_global",
        "n_local_enhancers": "pix2pixHD flag --n_local_enhancers",
        "n_blocks_local": "pix2pixHD flag --n_blocks_local",
    }

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 32,
        n_downsample_global: int = 4,
        n_blocks_global: int = 9,
        n_local_enhancers: int = 1,
        n_blocks_local: int = 3,
        norm: str = "instance",
        padding_type: str = "reflect",
        *,
        fused: bool = True,
        impl: str = "auto",
        checkpoint: bool = False,
    ):
        super().__init__()
        check_sizes("LocalEnhancer", ("n_downsample_global", "n_blocks_global", "n_blocks_local"),
                    input_nc=input_nc, output_nc=output_nc, ngf=ngf, n_downsample_global=n_downsample_global,
                    n_blocks_global=n_blocks_global, n_local_enhancers=n_local_enhancers,
                    n_blocks_local=n_blocks_local)
        check_choice("LocalEnhancer", "norm", norm, NORMS)
        check_choice("LocalEnhancer", "padding_type", padding_type, PADDINGS)
        self.options = dict(input_nc=input_nc, output_nc=output_nc, ngf=ngf, n_downsample_global=n_downsample_global,
                            n_blocks_global=n_blocks_global, n_local_enhancers=n_local_enhancers,
                            n_blocks_local=n_blocks_local, norm=norm, padding_type=padding_type)
        self.n_local_enhancers = n_local_enhancers

        # G1 always uses reflection padding in its residual blocks, as in the original.
        ngf_global = ngf * 2**n_local_enhancers
        global_layers, global_stages = global_generator_layers(input_nc, output_nc, ngf_global, n_downsample_global,
                                                               n_blocks_global, norm, "reflect", fused, impl)
        self.model = nn.Sequential(*global_layers[:-3])  # without the final pad, conv, tanh
        self.checkpoint = checkpoint
        self.stages = {"model": global_stages[:-1]}

        def na(channels: int) -> list[nn.Module]:
            return norm_act(channels, norm, "relu", fused=fused, impl=impl)

        for n in range(1, n_local_enhancers + 1):
            width = ngf * 2 ** (n_local_enhancers - n)
            stem = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, width, 7), *na(width)]
            front = stem + [nn.Conv2d(width, width * 2, 3, stride=2, padding=1), *na(width * 2)]
            back: list[nn.Module] = [ResnetBlock(width * 2, padding_type, norm, fused=fused, impl=impl)
                                     for _ in range(n_blocks_local)]
            back += [nn.ConvTranspose2d(width * 2, width, 3, stride=2, padding=1, output_padding=1), *na(width)]
            if n == n_local_enhancers:
                back += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
            setattr(self, f"model{n}_1", nn.Sequential(*front))
            setattr(self, f"model{n}_2", nn.Sequential(*back))
            # Under checkpointing every stage of an enhancer is recomputed: all run at high resolution.
            self.stages[f"model{n}_1"] = [(0, len(stem), True), (len(stem), len(front), True)]
            self.stages[f"model{n}_2"] = [(i, i + 1, True) for i in range(n_blocks_local)] + [(n_blocks_local, len(back), True)]
        self.downsample = nn.AvgPool2d(3, stride=2, padding=[1, 1], count_include_pad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** (self.options["n_downsample_global"] + self.n_local_enhancers)
        check_input(self, input, self.options["input_nc"], multiple, _INPUT_FLAGS)
        pyramid = [input]
        for _ in range(self.n_local_enhancers):
            pyramid.append(self.downsample(pyramid[-1]))
        output = self._run("model", pyramid[-1])
        for n in range(1, self.n_local_enhancers + 1):
            output = self._run(f"model{n}_2", self._run(f"model{n}_1", pyramid[self.n_local_enhancers - n]) + output)
        return output

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return run_stages(getattr(self, name), x, self.stages[name], self.checkpoint)

    def load_global_generator(self, state_dict: Mapping[str, Any]) -> None:
        """Start coarse-to-fine training from a trained G1: load a GlobalGenerator
        state_dict into ``self.model``, leaving the enhancer layers as they are.

        The G1 must have been built with ngf * 2^n_local_enhancers filters and the
        same downsampling and block counts; its final 7x7 conv is not used.
        """
        own = self.model.state_dict()
        g1 = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        final_conv = str(len(self.model) + 1)  # G1's final pad, conv, tanh follow self.model's layers
        extra = [k for k in g1 if k not in own and k.split(".")[0] != final_conv]
        missing = [k for k in own if k not in g1]
        bad_shape = [k for k in own if k in g1 and tuple(g1[k].shape) != tuple(own[k].shape)]
        if extra or missing or bad_shape:
            ngf_global = self.options["ngf"] * 2**self.n_local_enhancers
            raise InvalidArgumentError(
                f"LocalEnhancer.load_global_generator: the state_dict is not a GlobalGenerator with "
                f"input_nc={self.options['input_nc']}, ngf={ngf_global}, n_downsampling="
                f"{self.options['n_downsample_global']}, n_blocks={self.options['n_blocks_global']} "
                f"(missing: {missing[:3]}, unexpected: {extra[:3]}, shapes differ: {bad_shape[:3]}); "
                f"train G1 with --ngf {ngf_global} and the same --n_downsample_global and --n_blocks_global"
            )
        self.model.load_state_dict({k: g1[k] for k in own}, strict=True)

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        g1 = options_from_global_layers(state_dict)
        n_local = len({k.split(".")[0] for k in state_dict if k.startswith("model") and k.split(".")[0].endswith("_1")})
        last_back = indexed_weights(state_dict, f"model{n_local}_2")
        return {
            "input_nc": indexed_weights(state_dict, "model1_1")[1][1],
            "output_nc": last_back[max(last_back)][0],
            "ngf": g1["ngf"] // 2**n_local,
            "n_downsample_global": g1["n_downsampling"],
            "n_blocks_global": g1["n_blocks"],
            "n_local_enhancers": n_local,
            "n_blocks_local": count_blocks(state_dict, "model1_2"),
            "norm": g1["norm"],
            "padding_type": _padding_from_state_dict({k: v for k, v in state_dict.items() if k.startswith("model1_")}),
        }

    def checkpoint_hint(self, state_dict: Mapping[str, Any]) -> str:
        if not any(k.startswith("model1_") for k in state_dict):
            return (" It holds a global generator (no model1_* keys): build a GlobalGenerator (pix2pixHD flag "
                    "--netG global), or start coarse-to-fine training with LocalEnhancer.load_global_generator.")
        return super().checkpoint_hint(state_dict)


# Layers that compute each output pixel from the same pixel of their input.
_PIXELWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Identity, nn.Dropout)
_PADS = (nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ZeroPad2d)


def local_radius(generator: nn.Module) -> int | None:
    """How far an output pixel of ``generator`` sees: the radius r in input pixels such that each output pixel
    depends only on the input within r of it (so a crop's output is exact farther than r inside its edges, when
    the crop's corner lies on the generator's downsampling grid). None where some output depends on the whole
    image, or where this cannot tell: instance norm (every pix2pixHD generator by default), batch norm without
    running statistics, a generator in training mode, a LocalEnhancer, or a layer it does not know. An
    eval-mode GlobalGenerator with batch norm or none is local: the demo model's radius is 20."""
    if type(generator) is not GlobalGenerator or generator.training:
        return None
    walked = _walk(generator.model, (0.0, 1.0, (0, 0)))
    return None if walked is None or walked[1] != 1.0 or walked[2] != (0, 0) else math.ceil(walked[0])


def _walk(module: nn.Module, state):
    """The state after ``module``: (radius so far in input pixels, input pixels per pixel here, padding waiting
    for the next convolution at the top and left), or None."""
    radius, scale, (pad_top, pad_left) = state
    if isinstance(module, nn.Sequential):
        for layer in module:
            state = _walk(layer, state)
            if state is None:
                return None
        return state
    if type(module) is ResnetBlock:  # x + conv_block(x): the block's reach, at the scale it keeps
        walked = _walk(module.conv_block, state)
        return walked if walked is not None and walked[1:] == (scale, (0, 0)) else None
    if isinstance(module, _PADS):  # shifts where the next convolution's window starts
        left, _, top, _ = module.padding
        return radius, scale, (pad_top + top, pad_left + left)
    if (isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.padding_mode != "circular"
            and not isinstance(module.padding, str)):
        (kh, kw), (dh, dw), (sh, sw), (ph, pw) = module.kernel_size, module.dilation, module.stride, module.padding
        if sh != sw:
            return None
        # Output j reads input j * stride + t * dilation - padding for t < kernel (a transposed convolution: output
        # j * stride + t * dilation - padding from input j), so it sees max(padding, extent - padding) around.
        reach = max(max(p, d * (k - 1) - p) for k, d, p in ((kh, dh, pad_top + ph), (kw, dw, pad_left + pw)))
        if isinstance(module, nn.ConvTranspose2d):
            return (radius + reach * scale / sh, scale / sh, (0, 0)) if (pad_top, pad_left) == (0, 0) else None
        return radius + reach * scale, scale * sh, (0, 0)
    if isinstance(module, nn.BatchNorm2d):  # a per-channel affine map in eval mode, from running statistics
        return state if module.running_mean is not None and not module.training else None
    if isinstance(module, _PIXELWISE) and not module.training:
        return state
    return None
