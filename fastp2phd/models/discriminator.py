"""pix2pixHD discriminators: PatchGAN ``NLayerDiscriminator`` and ``MultiscaleDiscriminator``.

With ``getIntermFeat`` every layer is its own ``nn.Sequential`` (``model0``,
``model1``... or ``scale{i}_layer{j}``) and forward returns every layer's
output for feature matching; without it the layers form one Sequential and
forward returns only the prediction. Keys match the original code.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import OfficialCheckpointMixin
from .layers import NORMS, check_choice, check_input, check_sizes, norm_act

_INPUT_FLAGS = (
    "pix2pixHD flags --label_nc, --no_instance, --feat_num and --output_nc: the discriminator sees the "
    "generator's input channels plus the output_nc image channels"
)
_FLAGS = {
    "input_nc": _INPUT_FLAGS,
    "ndf": "pix2pixHD flag --ndf",
    "n_layers": "pix2pixHD flag --n_layers_D",
    "norm": "pix2pixHD flag --norm",
    "getIntermFeat": "pix2pixHD flag --no_ganFeat_loss turns intermediate features off",
    "num_D": "pix2pixHD flag --num_D",
}


def _discriminator_layers(
    input_nc: int, ndf: int, n_layers: int, norm: str, use_sigmoid: bool, fused: bool, impl: str
) -> list[list[nn.Module]]:
    """The layer groups of one PatchGAN: 4x4 convs, LeakyReLU(0.2), norm from the second group on."""
    kw, padw = 4, math.ceil((4 - 1.0) / 2)

    def na(channels: int) -> list[nn.Module]:
        return norm_act(channels, norm, "leaky_relu", fused=fused, impl=impl, negative_slope=0.2)

    groups: list[list[nn.Module]] = [[nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]]
    nf = ndf
    for _ in range(1, n_layers):
        nf_prev, nf = nf, min(nf * 2, 512)
        groups.append([nn.Conv2d(nf_prev, nf, kw, stride=2, padding=padw), *na(nf)])
    nf_prev, nf = nf, min(nf * 2, 512)
    groups.append([nn.Conv2d(nf_prev, nf, kw, stride=1, padding=padw), *na(nf)])
    # The sigmoid shares the last group (it has no parameters, so no key moves); the
    # original made it a separate group that its feature forward never reached.
    groups.append([nn.Conv2d(nf, 1, kw, stride=1, padding=padw)] + ([nn.Sigmoid()] if use_sigmoid else []))
    return groups


def _check_options(owner: str, input_nc: int, ndf: int, n_layers: int, norm: str) -> None:
    check_sizes(owner, input_nc=input_nc, ndf=ndf, n_layers=n_layers)
    check_choice(owner, "norm", norm, NORMS)


def _options_from_layers(first_conv: tuple[int, ...], n_groups: int, intermediate: bool, has_batch_norm: bool) -> dict[str, Any]:
    return {
        "input_nc": first_conv[1],
        "ndf": first_conv[0],
        "n_layers": n_groups - 2,
        "norm": "batch" if has_batch_norm else "instance",
        "getIntermFeat": intermediate,
    }


class NLayerDiscriminator(OfficialCheckpointMixin, nn.Module):
    """One PatchGAN discriminator of pix2pixHD (defaults: ``--ndf 64 --n_layers_D 3``, features on)."""

    FLAGS = _FLAGS

    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        use_sigmoid: bool = False,
        getIntermFeat: bool = True,
        *,
        fused: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        _check_options("NLayerDiscriminator", input_nc, ndf, n_layers, norm)
        self.options = dict(input_nc=input_nc, ndf=ndf, n_layers=n_layers, norm=norm, getIntermFeat=getIntermFeat)
        self.getIntermFeat = getIntermFeat
        self.n_layers = n_layers
        groups = _discriminator_layers(input_nc, ndf, n_layers, norm, use_sigmoid, fused, impl)
        if getIntermFeat:
            for n, group in enumerate(groups):
                setattr(self, f"model{n}", nn.Sequential(*group))
        else:
            self.model = nn.Sequential(*[layer for group in groups for layer in group])

    def layer_groups(self) -> list[nn.Module]:
        if self.getIntermFeat:
            return [getattr(self, f"model{n}") for n in range(self.n_layers + 2)]
        return [self.model]

    def forward(self, input: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Every layer group's output with getIntermFeat (the last is the prediction), else the prediction."""
        check_input(self, input, self.options["input_nc"], flag_hint=_INPUT_FLAGS)
        if not self.getIntermFeat:
            return self.model(input)
        return _run_groups(self.layer_groups(), input)

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        batch = any(k.endswith("running_mean") for k in state_dict)
        if "model0.0.weight" in state_dict:
            groups = {m.group(1) for m in map(re.compile(r"model(\d+)\.").match, state_dict) if m}
            return _options_from_layers(tuple(state_dict["model0.0.weight"].shape), len(groups), True, batch)
        convs = [k for k in state_dict if re.match(r"model\.\d+\.weight$", k) and state_dict[k].dim() == 4]
        return _options_from_layers(tuple(state_dict["model.0.weight"].shape), len(convs), False, batch)


def _run_groups(groups: list[nn.Module], input: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    x = input
    for group in groups:
        x = group(x)
        outputs.append(x)
    return outputs


class MultiscaleDiscriminator(OfficialCheckpointMixin, nn.Module):
    """num_D PatchGANs on the input and its AvgPool2d(3, 2, 1, count_include_pad=False) pyramid.

    ``forward`` returns one list per scale, full resolution first; the full-resolution
    input goes to ``scale{num_D-1}`` (or ``layer{num_D-1}``) as in the original, so
    official checkpoints give the same outputs. Defaults: ``--num_D 2``, features on.
    """

    FLAGS = _FLAGS

    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm: str = "instance",
        use_sigmoid: bool = False,
        num_D: int = 2,
        getIntermFeat: bool = True,
        *,
        fused: bool = True,
        impl: str = "auto",
    ):
        super().__init__()
        _check_options("MultiscaleDiscriminator", input_nc, ndf, n_layers, norm)
        check_sizes("MultiscaleDiscriminator", num_D=num_D)
        self.options = dict(input_nc=input_nc, ndf=ndf, n_layers=n_layers, norm=norm,
                            getIntermFeat=getIntermFeat, num_D=num_D)
        self.num_D = num_D
        self.n_layers = n_layers
        self.getIntermFeat = getIntermFeat
        for i in range(num_D):
            net = NLayerDiscriminator(input_nc, ndf, n_layers, norm, use_sigmoid, getIntermFeat, fused=fused, impl=impl)
            if getIntermFeat:
                for j in range(n_layers + 2):
                    setattr(self, f"scale{i}_layer{j}", getattr(net, f"model{j}"))
            else:
                setattr(self, f"layer{i}", net.model)
        self.downsample = nn.AvgPool2d(3, stride=2, padding=[1, 1], count_include_pad=False)

    def scale_groups(self, i: int) -> list[nn.Module]:
        """The layer groups of discriminator ``i`` (scale{i}_layer* or layer{i})."""
        if self.getIntermFeat:
            return [getattr(self, f"scale{i}_layer{j}") for j in range(self.n_layers + 2)]
        return [getattr(self, f"layer{i}")]

    def forward(self, input: torch.Tensor) -> list[list[torch.Tensor]]:
        check_input(self, input, self.options["input_nc"], flag_hint=_INPUT_FLAGS)
        results = []
        x = input
        for i in range(self.num_D):
            results.append(_run_groups(self.scale_groups(self.num_D - 1 - i), x))
            if i != self.num_D - 1:
                x = self.downsample(x)
        return results

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        batch = any(k.endswith("running_mean") for k in state_dict)
        if "scale0_layer0.0.weight" in state_dict:
            pairs = {m.groups() for m in map(re.compile(r"scale(\d+)_layer(\d+)\.").match, state_dict) if m}
            num_D = len({s for s, _ in pairs})
            groups = len({l for s, l in pairs if s == "0"})
            options = _options_from_layers(tuple(state_dict["scale0_layer0.0.weight"].shape), groups, True, batch)
        else:
            num_D = len({m.group(1) for m in map(re.compile(r"layer(\d+)\.").match, state_dict) if m})
            convs = [k for k in state_dict if re.match(r"layer0\.\d+\.weight$", k) and state_dict[k].dim() == 4]
            options = _options_from_layers(tuple(state_dict["layer0.0.weight"].shape), len(convs), False, batch)
        options["num_D"] = num_D
        return options
