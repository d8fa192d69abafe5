"""Cityscapes label ids, colour palettes and instance-id helpers.

Cityscapes conventions used throughout :mod:`fastp2phd.data`:

* label maps hold *labelIds* 0..34 (``CITYSCAPES_CLASSES`` below), one id per pixel;
* instance maps hold ``class * 1000 + k`` on pixels of countable objects ("things",
  ``THING_CLASSES``; k counts the objects of that class in the image from 0) and the
  plain class id everywhere else, so :func:`class_of_instance` recovers the label map.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
import torch

from ..errors import InvalidArgumentError

__all__ = [
    "CITYSCAPES_CLASSES",
    "THING_CLASSES",
    "class_of_instance",
    "colorize_labels",
    "label_palette",
]

# labelId -> (name, colour); the index in the list is the labelId.
CITYSCAPES_CLASSES: List[Tuple[str, Tuple[int, int, int]]] = [
    ("unlabeled", (0, 0, 0)),
    ("ego vehicle", (0, 0, 0)),
    ("rectification border", (0, 0, 0)),
    ("out of roi", (0, 0, 0)),
    ("static", (0, 0, 0)),
    ("dynamic", (111, 74, 0)),
    ("ground", (81, 0, 81)),
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("parking", (250, 170, 160)),
    ("rail track", (230, 150, 140)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("guard rail", (180, 165, 180)),
    ("bridge", (150, 100, 100)),
    ("tunnel", (150, 120, 90)),
    ("pole", (153, 153, 153)),
    ("polegroup", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("caravan", (0, 0, 90)),
    ("trailer", (0, 0, 110)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
    ("license plate", (0, 0, 142)),
]

# Classes whose objects carry their own instance ids (class * 1000 + k).
THING_CLASSES = frozenset({24, 25, 26, 27, 28, 29, 30, 31, 32, 33})

_CITYSCAPES_PALETTE = np.array([colour for _, colour in CITYSCAPES_CLASSES], dtype=np.uint8)
_CITYSCAPES_PALETTE.setflags(write=False)


def _bit_interleaved_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of the index, three at a time, fill r, g, b
    from their most significant bit down. Colours are distinct for n <= 2**24."""
    index = np.arange(n, dtype=np.int64)
    rgb = np.zeros((n, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (index >> (3 * shift + channel)) & 1
            rgb[:, channel] |= bit << (7 - shift)
    return rgb.astype(np.uint8)


def label_palette(label_nc: int) -> np.ndarray:
    """(label_nc, 3) uint8 colours: Cityscapes' official colours when label_nc == 35,
    else the PASCAL VOC bit-interleaved colour map (deterministic, distinct up to 2**24)."""
    label_nc = int(label_nc)
    if label_nc < 0:
        raise InvalidArgumentError(f"label_palette: label_nc must be >= 0, got {label_nc}")
    if label_nc == len(CITYSCAPES_CLASSES):
        return _CITYSCAPES_PALETTE.copy()
    return _bit_interleaved_palette(label_nc)


def _to_numpy(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)


def colorize_labels(labels, label_nc: int) -> np.ndarray:
    """(H, W, 3) uint8 picture of an (H, W) integer label map (numpy array or tensor;
    a leading dimension of size 1 is dropped), using :func:`label_palette`."""
    ids = _to_numpy(labels)
    if ids.ndim == 3 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 2:
        raise InvalidArgumentError(f"colorize_labels: expected an (H, W) label map, got shape {tuple(ids.shape)}")
    if ids.dtype.kind not in "iub":
        if ids.dtype.kind == "f" and np.all(np.mod(ids, 1) == 0):
            ids = ids.astype(np.int64)
        else:
            raise InvalidArgumentError(f"colorize_labels: label ids must be integers, got dtype {ids.dtype}")
    palette = label_palette(label_nc)
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= len(palette):
            bad = low if low < 0 else high
            raise InvalidArgumentError(f"colorize_labels: label id {bad} is outside 0..{len(palette) - 1} (label_nc={label_nc})")
    return palette[ids]


IdArray = Union[np.ndarray, torch.Tensor, int]


def class_of_instance(ids: IdArray) -> IdArray:
    """Semantic class of Cityscapes instance ids: ``id`` below 1000, ``id // 1000`` from 1000 on.

    Works on numpy arrays, torch tensors (same device and dtype back) and Python ints.
    """
    if isinstance(ids, torch.Tensor):
        return torch.where(ids < 1000, ids, torch.div(ids, 1000, rounding_mode="floor"))
    if isinstance(ids, (int, np.integer)):
        return ids if ids < 1000 else ids // 1000
    ids = np.asarray(ids)
    return np.where(ids < 1000, ids, ids // 1000).astype(ids.dtype, copy=False)
