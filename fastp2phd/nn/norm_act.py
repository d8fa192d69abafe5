"""InstanceNormAct2d: InstanceNorm2d (no affine) and its activation as one module."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import instance_norm_act
from ..ops.instance_norm_act import check_activation


class InstanceNormAct2d(nn.Module):
    """``act(InstanceNorm2d(num_features, affine=False)(x))`` through ``ops.instance_norm_act``.

    Holds no parameters or buffers, so it replaces an InstanceNorm2d in any
    state_dict without changing a key. Accepts (N, C, H, W) and unbatched (C, H, W).
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        negative_slope: float = 0.2,
        eps: float = 1e-5,
        impl: str = "auto",
    ):
        super().__init__()
        check_activation(activation, negative_slope)
        if num_features <= 0:
            raise ValueError(f"InstanceNormAct2d: num_features must be positive, got {num_features}")
        self.num_features = num_features
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.eps = eps
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.num_features:
            raise ValueError(
                f"InstanceNormAct2d: expected input of shape (N, {self.num_features}, H, W) or "
                f"({self.num_features}, H, W), got {tuple(x.shape)}; check the preceding layer's channel count"
            )
        if x.dim() == 3:
            return instance_norm_act(x[None], self.activation, self.negative_slope, self.eps, impl=self.impl)[0]
        return instance_norm_act(x, self.activation, self.negative_slope, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        act = self.activation
        if act == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return f"{self.num_features}, activation={act}, eps={self.eps}"
