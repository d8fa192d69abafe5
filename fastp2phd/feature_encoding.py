"""Encoding the training set for pix2pixHD's instance features (section 3.4): one feature
vector and relative area per instance (:func:`instance_features`), grouped by semantic class
(:func:`class_features`, :class:`FeatureCollector`). The rest of the pipeline is in
``fastp2phd.features``; everything runs in torch on the input tensors' device.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .data.labels import class_of_instance
from .errors import InvalidArgumentError

__all__ = ["AREA_BLOCKS", "FeatureCollector", "as_id_map", "class_features", "class_of", "instance_features"]

#: The relative area of an instance is ``num_pixels / (H * W // AREA_BLOCKS)``.
AREA_BLOCKS = 32


def class_of(instance_id: int) -> int:
    """Semantic class of an instance id (``data.labels.class_of_instance`` for one Python int)."""
    return int(class_of_instance(int(instance_id)))


def as_id_map(inst: torch.Tensor, name: str = "inst") -> torch.Tensor:
    """Validate an (N, 1, H, W) instance map and return it as int64 of shape (N, H, W).

    Floating maps (the original loads instance maps as float tensors) are accepted when
    every value is integral.
    """
    if not isinstance(inst, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inst).__name__}.")
    if inst.dim() != 4 or inst.shape[1] != 1:
        raise InvalidArgumentError(f"{name} must have shape (N, 1, H, W), got {tuple(inst.shape)}.")
    if inst.dtype == torch.bool or inst.is_complex():
        raise TypeError(f"{name} must hold integer instance ids, got dtype {inst.dtype}.")
    if inst.is_floating_point():
        if not bool(torch.all(inst == torch.round(inst))):
            raise InvalidArgumentError(f"{name} is floating point but holds non-integral instance ids.")
    return inst[:, 0].to(torch.int64)


def instance_features(feat_map: torch.Tensor, inst: torch.Tensor) -> list[dict[int, tuple[torch.Tensor, float]]]:
    """One feature vector and relative area per instance of every batch item.

    Args:
        feat_map: (N, F, H, W) encoder output, normally already averaged per instance.
        inst: (N, 1, H, W) integer instance ids (integral floating values are accepted).

    Returns:
        A list with one dict per batch item, ``{instance_id: (feature, relative_area)}``
        in increasing id order, where ``feature`` is a CPU tensor of shape (F,) and dtype
        ``feat_map.dtype`` holding ``feat_map`` at the instance's middle pixel -- position
        ``num // 2`` in the row-major list of the instance's pixels of that item's H x W
        plane -- and ``relative_area = num / (H * W // 32)`` (the denominator is clamped to
        at least 1 for planes smaller than 32 pixels). Batch items are kept apart.

    The computation is vectorised (a stable sort of the flattened ids and a gather) and
    runs on the tensors' device; only the final dict is built in Python.
    """
    if not isinstance(feat_map, torch.Tensor) or feat_map.dim() != 4:
        raise InvalidArgumentError(f"feat_map must be a (N, F, H, W) tensor, got {getattr(feat_map, 'shape', type(feat_map))}.")
    ids_map = as_id_map(inst)
    n, f, h, w = feat_map.shape
    if ids_map.shape != (n, h, w):
        raise InvalidArgumentError(f"inst shape {tuple(inst.shape)} does not match feat_map shape {tuple(feat_map.shape)} "
                         "(expected (N, 1, H, W) with the same N, H, W).")
    if ids_map.device != feat_map.device:
        raise InvalidArgumentError(f"feat_map is on {feat_map.device} but inst is on {inst.device}.")
    denominator = max(h * w // AREA_BLOCKS, 1)
    feat_flat = feat_map.detach().reshape(n, f, h * w)
    result = []
    for b in range(n):
        ids = ids_map[b].reshape(-1)
        sorted_ids, order = torch.sort(ids, stable=True)  # row-major order kept within an id
        uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        middle = order[starts + torch.div(counts, 2, rounding_mode="floor")]
        feats = feat_flat[b][:, middle].t().cpu()  # (U, F)
        uniq_list = uniq.tolist()
        counts_list = counts.tolist()
        result.append({
            int(i): (feats[j].clone(), counts_list[j] / denominator) for j, i in enumerate(uniq_list)
        })
    return result


def class_features(per_item: list[Mapping[int, tuple[torch.Tensor, float]]]) -> dict[int, torch.Tensor]:
    """Group per-instance features by semantic class.

    Args:
        per_item: the output of :func:`instance_features` (or several concatenated).

    Returns:
        ``{class_id: Tensor (n, F + 1)}`` with keys in increasing order, each row being
        ``[feature..., relative_area]``; rows follow the items' order, then increasing
        instance id. The dtype is the features' dtype promoted to at least float32.
    """
    rows: dict[int, list[torch.Tensor]] = {}
    for item in per_item:
        for instance_id in sorted(item):
            feature, area = item[instance_id]
            feature = torch.as_tensor(feature).detach().cpu().reshape(-1)
            dtype = torch.promote_types(feature.dtype, torch.float32)
            row = torch.cat([feature.to(dtype), torch.tensor([float(area)], dtype=dtype)])
            rows.setdefault(class_of(instance_id), []).append(row)
    out = {}
    for cls in sorted(rows):
        widths = {r.shape[0] for r in rows[cls]}
        if len(widths) != 1:
            raise InvalidArgumentError(f"class {cls} has features of different lengths {sorted(w - 1 for w in widths)}.")
        dtype = rows[cls][0].dtype
        for r in rows[cls][1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        out[cls] = torch.stack([r.to(dtype) for r in rows[cls]])
    return out


class FeatureCollector:
    """Accumulate per-class instance features over a dataset.

    Example::

        collector = FeatureCollector()
        for label, inst, image in loader:
            collector.add(encoder(image, inst), inst)
        features = collector.result()          # {class: (n, F + 1)}
        centers = cluster_features(features)   # {class: (k, F)}
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[torch.Tensor]] = {}
        self.num_items = 0  #: batch items added so far

    def add(self, feat_map: torch.Tensor, inst: torch.Tensor) -> None:
        """Add one batch: ``feat_map`` (N, F, H, W) and ``inst`` (N, 1, H, W)."""
        per_item = instance_features(feat_map, inst)
        for cls, rows in class_features(per_item).items():
            self._parts.setdefault(cls, []).append(rows)
        self.num_items += len(per_item)

    def result(self) -> dict[int, torch.Tensor]:
        """``{class_id: Tensor (n, F + 1)}`` over everything added, keys in increasing order."""
        out = {}
        for cls in sorted(self._parts):
            parts = self._parts[cls]
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            out[cls] = torch.cat([p.to(dtype) for p in parts])
        return out
