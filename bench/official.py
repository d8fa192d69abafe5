"""pix2pixHD's original formulations of the ops, written from the paper and its code's
described behaviour, as baselines for the benchmarks (never used by the library)."""
from __future__ import annotations

import torch


def official_edges(inst: torch.Tensor) -> torch.Tensor:
    """The original get_edges: four masked passes over a byte tensor, then a float copy."""
    edge = torch.zeros(inst.shape, dtype=torch.bool, device=inst.device)
    edge[:, :, :, 1:] = edge[:, :, :, 1:] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
    edge[:, :, :, :-1] = edge[:, :, :, :-1] | (inst[:, :, :, 1:] != inst[:, :, :, :-1])
    edge[:, :, 1:, :] = edge[:, :, 1:, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
    edge[:, :, :-1, :] = edge[:, :, :-1, :] | (inst[:, :, 1:, :] != inst[:, :, :-1, :])
    return edge.float()


def official_instance_pool(outputs: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The original Encoder pooling: a Python loop over ids x batch items x channels,
    each step finding the instance's pixels with nonzero() (a host sync on CUDA)."""
    pooled = outputs.clone()
    for value in torch.unique(inst).tolist():
        for b in range(outputs.shape[0]):
            where = (inst[b:b + 1] == value).nonzero()  # (k, 4) indices into the (1, 1, H, W) slice
            for c in range(outputs.shape[1]):
                index = (where[:, 0] + b, where[:, 1] + c, where[:, 2], where[:, 3])
                values = outputs[index]
                pooled[index] = values.mean().expand_as(values)
    return pooled
