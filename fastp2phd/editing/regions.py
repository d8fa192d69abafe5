"""A scene's objects, and what fills a removed one: the stuff class around it (``EditSession.remove_object``)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..data import THING_CLASSES
from ..errors import InvalidArgumentError
from ..features import class_of
from .styles import grow_box

__all__ = ["mask_box", "surrounding_stuff", "thing_objects"]


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the pixels ``mask`` holds, or None when it holds none."""
    ys = torch.nonzero(mask.any(dim=1))
    xs = torch.nonzero(mask.any(dim=0))
    if ys.numel() == 0:
        return None
    return int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def thing_objects(inst: torch.Tensor) -> Iterator[tuple[int, np.ndarray]]:
    """(instance id, mask cropped to its box) of every thing instance of the (H, W) instance map ``inst``."""
    for value in torch.unique(inst).tolist():
        if class_of(int(value)) in THING_CLASSES:
            y0, y1, x0, x1 = mask_box(inst == value)
            yield int(value), (inst[y0:y1, x0:x1] == value).cpu().numpy()


def surrounding_stuff(label: torch.Tensor, mask: torch.Tensor, box, label_nc: int) -> int:
    """The most common stuff class (road, building, ...) of ``label`` in a ring of pixels around ``mask`` (whose
    bounding box is ``box``), the ring widened until it holds stuff."""
    is_stuff = torch.ones(label_nc, dtype=torch.bool, device=label.device)
    is_stuff[[c for c in THING_CLASSES if c < label_nc]] = False
    for reach in (2, 4, 8, 16, 32, 64, None):
        ring = _ring(label, mask, box, reach)
        ring = ring[is_stuff[ring]]
        if ring.numel():
            return int(torch.bincount(ring, minlength=label_nc).argmax())
    raise InvalidArgumentError("the scene holds no stuff class (road, building, ...) to fill the object with")


def _ring(label: torch.Tensor, mask: torch.Tensor, box, reach: int | None) -> torch.Tensor:
    """The labels of the pixels within ``reach`` (Chebyshev distance) of ``mask`` and not in it; None: of all
    the pixels not in it (every pixel is within max(H, W) of any other).

    Only those pixels can be that near, so the work is done on the mask's box grown by ``reach``, and the
    square max-pool that grows the mask is two 1-D ones (the same maxima): its cost follows the object's
    size and the reach, not the scene's."""
    if reach is None:
        return label[~mask]
    y0, y1, x0, x1 = grow_box(box, reach, *label.shape)
    window = mask[y0:y1, x0:x1]
    grown = torch.nn.functional.max_pool2d(window.float()[None, None], (2 * reach + 1, 1), 1, (reach, 0))
    grown = torch.nn.functional.max_pool2d(grown, (1, 2 * reach + 1), 1, (0, reach))[0, 0] > 0
    return label[y0:y1, x0:x1][grown & ~window]
