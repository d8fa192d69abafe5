"""InstanceNormAct2d: InstanceNorm2d (no affine) and its activation as one module."""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..ops import instance_norm_act
from ..ops._dispatch import check_impl_name
from ..ops.instance_norm_act import FAST_PATHS, check_activation


def instance_norm_act_module(
    x: torch.Tensor, num_features: int, activation: str, negative_slope: float, eps: float, impl: str
) -> torch.Tensor:
    """What ``InstanceNormAct2d.forward`` computes. One function that torch.fx records as a single call
    (``torch.fx.wrap`` below), so symbolic tracing a model with fused modules works."""
    if x.dim() not in (3, 4):
        raise InvalidArgumentError(
            f"InstanceNormAct2d: expected input of shape (N, {num_features}, H, W) or "
            f"({num_features}, H, W), got {tuple(x.shape)}"
        )
    if x.shape[-3] != num_features:  # as InstanceNorm2d(affine=False): the count is not used, so warn only
        warnings.warn(
            f"InstanceNormAct2d: input has {x.shape[-3]} channels but num_features is {num_features}; "
            "the result is still correct (there are no per-channel parameters), but check the preceding layer",
            stacklevel=3,
        )
    if x.shape[-1] * x.shape[-2] == 1:  # (the op gives 0; the module it replaces refuses)
        raise InvalidArgumentError(f"InstanceNormAct2d: expected more than 1 spatial element, as nn.InstanceNorm2d "
                                   f"does (a one-pixel plane normalises to nothing), got input size {tuple(x.shape)}")
    if x.dim() == 3:
        return instance_norm_act(x[None], activation, negative_slope, eps, impl=impl)[0]
    return instance_norm_act(x, activation, negative_slope, eps, impl=impl)


torch.fx.wrap("instance_norm_act_module")


class InstanceNormAct2d(nn.Module):
    """``act(InstanceNorm2d(num_features, affine=False)(x))`` through ``ops.instance_norm_act``.

    Holds no parameters or buffers, so it replaces an InstanceNorm2d in any
    state_dict without changing a key. Accepts (N, C, H, W) and unbatched (C, H, W).
    Under ``torch.jit.script`` it runs PyTorch's own instance norm and activation,
    so a scripted model needs nothing of fastp2phd to load and run.
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
            raise InvalidArgumentError(f"InstanceNormAct2d: num_features must be positive, got {num_features}")
        if not (math.isfinite(eps) and eps >= 0):
            raise InvalidArgumentError(f"InstanceNormAct2d: eps must be a finite number, 0 or more, got {eps}")
        check_impl_name("InstanceNormAct2d", impl, FAST_PATHS)
        self.num_features = num_features
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.eps = float(eps)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            y = F.instance_norm(x[None], eps=self.eps)[0] if x.dim() == 3 else F.instance_norm(x, eps=self.eps)
            if self.activation == "relu":
                return F.relu(y)
            if self.activation == "leaky_relu":
                return F.leaky_relu(y, self.negative_slope)
            return y
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return instance_norm_act_module(x, self.num_features, self.activation, self.negative_slope, self.eps, self.impl)

    def extra_repr(self) -> str:
        act = self.activation
        if act == "leaky_relu":
            act += f", negative_slope={self.negative_slope}"
        return f"{self.num_features}, activation={act}, eps={self.eps}"
