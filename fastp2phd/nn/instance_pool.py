"""InstanceMeanPool: instance-wise average pooling as a module."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import instance_mean


class InstanceMeanPool(nn.Module):
    """Every pixel of each instance gets the mean feature of that instance (``ops.instance_mean``).

    ``forward(feat, inst)``: feat (N, C, H, W), inst (N, 1, H, W) instance ids.
    """

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        return instance_mean(feat, inst, impl=self.impl)
