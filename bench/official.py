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


def index_add_instance_mean(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The straightforward vectorised formulation: unique ids, index_add sums and counts, gather."""
    n, c, h, w = feat.shape
    ids, segment = torch.unique(inst.reshape(n, h * w), return_inverse=True)
    index = (segment + torch.arange(n, device=feat.device)[:, None] * ids.numel()).reshape(-1)  # (n*h*w,)
    pixels = feat.permute(0, 2, 3, 1).reshape(-1, c)
    sums = torch.zeros(n * ids.numel(), c, device=feat.device, dtype=feat.dtype).index_add(0, index, pixels)
    counts = torch.zeros(n * ids.numel(), device=feat.device, dtype=feat.dtype).index_add(
        0, index, torch.ones_like(index, dtype=feat.dtype))
    means = sums / counts.clamp_min(1)[:, None]
    return means[index].reshape(n, h, w, c).permute(0, 3, 1, 2)


def official_instance_features(feat_map: torch.Tensor, inst: torch.Tensor, label_nc: int = 35) -> dict:
    """The original encode_features: per instance, nonzero() then the middle pixel's features
    and the area relative to H*W/32, appended row by row to a per-class array."""
    import numpy as np

    feat_num = feat_map.shape[1]
    h, w = inst.shape[2], inst.shape[3]
    features = {label: np.zeros((0, feat_num + 1)) for label in range(label_nc)}
    for b in range(inst.shape[0]):
        for i in np.unique(inst[b:b + 1].cpu().numpy().astype(int)):
            label = i if i < 1000 else i // 1000
            idx = (inst[b:b + 1] == int(i)).nonzero()
            num = idx.shape[0]
            idx = idx[num // 2, :]
            val = np.zeros((1, feat_num + 1))
            for k in range(feat_num):
                val[0, k] = feat_map[b + idx[0], idx[1] + k, idx[2], idx[3]].item()
            val[0, feat_num] = float(num) / (h * w // 32)
            features[label] = np.append(features[label], val, axis=0)
    return features
