"""pix2pixHD's feature ``Encoder``: image -> feat_num channels, averaged per instance."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..ops import instance_mean
from .checkpoint import OfficialCheckpointMixin, indexed_weights
from .generator import global_generator_layers, options_from_global_layers
from .layers import NORMS, check_choice, check_input, check_sizes, run_stages


class Encoder(OfficialCheckpointMixin, nn.Module):
    """Encoder-decoder (7x7 conv, stride-2 convs, transposed convs, 7x7 conv, tanh)
    followed by instance-wise average pooling through ``ops.instance_mean``.

    ``forward(image, inst)``: image (N, input_nc, H, W), inst (N, 1, H, W) ids;
    returns (N, output_nc, H, W) where every instance holds its mean feature.
    Defaults are pix2pixHD's effective ones (``--nef 16 --n_downsample_E 4``). ``checkpoint=True``
    recomputes its activations in backward instead of keeping them (``--checkpoint_activations``).
    """

    FLAGS = {
        "input_nc": "pix2pixHD flag --output_nc (the encoder reads the real image)",
        "output_nc": "pix2pixHD flag --feat_num",
        "ngf": "pix2pixHD flag --nef",
        "n_downsampling": "pix2pixHD flag --n_downsample_E",
        "norm": "pix2pixHD flag --norm",
    }

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 16,
        n_downsampling: int = 4,
        norm: str = "instance",
        *,
        fused: bool = True,
        impl: str = "auto",
        checkpoint: bool = False,
    ):
        super().__init__()
        check_sizes("Encoder", ("n_downsampling",), input_nc=input_nc, output_nc=output_nc, ngf=ngf,
                    n_downsampling=n_downsampling)
        check_choice("Encoder", "norm", norm, NORMS)
        self.options = dict(input_nc=input_nc, output_nc=output_nc, ngf=ngf, n_downsampling=n_downsampling, norm=norm)
        self.output_nc = output_nc
        self.impl = impl

        layers, self.stages = global_generator_layers(input_nc, output_nc, ngf, n_downsampling, 0, norm, "reflect",
                                                      fused, impl)
        self.model = nn.Sequential(*layers)
        self.checkpoint = checkpoint

    def forward(self, input: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        check_input(self, input, self.options["input_nc"], 2 ** self.options["n_downsampling"])
        return instance_mean(run_stages(self.model, input, self.stages, self.checkpoint), inst, impl=self.impl)

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        options = options_from_global_layers(state_dict)
        del options["n_blocks"]
        weights = indexed_weights(state_dict, "model")
        options["output_nc"] = weights[max(weights)][0]
        return options
