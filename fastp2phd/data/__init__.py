"""Datasets for pix2pixHD: the Cityscapes-style folder dataset, pix2pixHD's transforms,
label palettes, and an embedded synthetic street-scene dataset (no download needed).

``create_dataset(spec)`` picks the dataset of a ``DataSpec`` from ``spec.dataroot``: the
string ``'synthetic'`` gives a :class:`SyntheticDataset`, anything else an :class:`AlignedDataset`.
"""
from __future__ import annotations

import math

from ..specs import DataSpec
from .folder import AlignedDataset, DatasetError, DatasetNotFoundError
from .labels import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, colorize_labels, label_palette
from .synthetic import DEFAULT_SIZE, SyntheticDataset, cityscapes_like_instances, make_synthetic, render_scene
from .transforms import get_params, transform

__all__ = [
    "AlignedDataset",
    "CITYSCAPES_CLASSES",
    "DatasetError",
    "DatasetNotFoundError",
    "SyntheticDataset",
    "THING_CLASSES",
    "cityscapes_like_instances",
    "class_of_instance",
    "colorize_labels",
    "create_dataset",
    "get_params",
    "label_palette",
    "make_synthetic",
    "render_scene",
    "synthetic_size",
    "transform",
]

SYNTHETIC_LENGTHS = {"train": 64, "test": 16}


def synthetic_size(spec: DataSpec) -> tuple[int, int]:
    """(H, W) of synthetic scenes: (fineSize // 2, fineSize) when both are multiples of
    ``spec.size_base`` and H >= 32, else (128, 256)."""
    height, width = spec.fineSize // 2, spec.fineSize
    if height >= 32 and height % spec.size_base == 0 and width % spec.size_base == 0:
        return height, width
    return DEFAULT_SIZE


def create_dataset(spec: DataSpec, length: int | None = None):
    """``SyntheticDataset`` when ``spec.dataroot == 'synthetic'``, else ``AlignedDataset(spec)``
    (``length`` is then ignored).

    Synthetic: ``length`` scenes, else ``spec.synthetic_size`` when set, else 64 for phase
    'train' and 16 otherwise, at most ``spec.max_dataset_size``; size from
    :func:`synthetic_size`. Scenes, crops and flips follow ``spec.seed``.
    """
    if str(spec.dataroot) == "synthetic":
        if length is None:
            length = spec.synthetic_size
        if length is None:
            length = SYNTHETIC_LENGTHS.get(spec.phase, 16)
        if not math.isinf(spec.max_dataset_size):
            length = min(int(length), int(spec.max_dataset_size))
        return SyntheticDataset(spec, length, size=synthetic_size(spec))
    return AlignedDataset(spec)
