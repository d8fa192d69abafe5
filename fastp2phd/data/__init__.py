"""Datasets for pix2pixHD: the Cityscapes-style folder dataset, pix2pixHD's transforms,
label palettes, and an embedded synthetic street-scene dataset (no download needed).

``create_dataset(opt)`` picks the dataset from ``opt.dataroot``: the string
``'synthetic'`` gives a :class:`SyntheticDataset`, anything else an :class:`AlignedDataset`.
"""
from __future__ import annotations

import math

from .folder import AlignedDataset, DatasetError, DatasetNotFoundError
from .labels import CITYSCAPES_CLASSES, THING_CLASSES, class_of_instance, colorize_labels, label_palette
from .synthetic import DEFAULT_SIZE, SyntheticDataset, cityscapes_like_instances, make_synthetic, render_scene
from .transforms import get_params, size_base, transform

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


def synthetic_size(opt):
    """(H, W) of synthetic scenes for ``opt``: (fineSize // 2, fineSize) when both are
    multiples of the generator's size base (see ``transforms.size_base``) and H >= 32,
    else (128, 256)."""
    fine = int(getattr(opt, "fineSize", 0) or 0)
    base = size_base(opt)
    height, width = fine // 2, fine
    if height >= 32 and height % base == 0 and width % base == 0:
        return height, width
    return DEFAULT_SIZE


def create_dataset(opt, length=None):
    """``SyntheticDataset`` when ``opt.dataroot == 'synthetic'``, else
    ``AlignedDataset(opt, rng_seed=opt.seed)`` (``length`` is then ignored).

    Synthetic: ``length`` scenes, else ``opt.synthetic_size`` when set, else 64 for phase
    'train' and 16 otherwise, at most ``opt.max_dataset_size``; size from
    :func:`synthetic_size`. The seed (scenes, crops, flips) is ``opt.seed`` when set, else 0.
    """
    seed = int(getattr(opt, "seed", 0) or 0)
    if str(opt.dataroot) == "synthetic":
        if length is None:
            length = getattr(opt, "synthetic_size", None)
        if length is None:
            length = SYNTHETIC_LENGTHS.get(opt.phase, 16)
        limit = getattr(opt, "max_dataset_size", math.inf)
        if limit is not None and not math.isinf(limit):
            length = min(int(length), int(limit))
        return SyntheticDataset(opt, length, seed=seed, size=synthetic_size(opt))
    return AlignedDataset(opt, rng_seed=seed)
