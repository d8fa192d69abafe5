"""Styles of an edited scene's instances: a class's styles are its feature cluster centres, and a
style preview renders one instance in every style of its class on a crop of the scene around it."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InvalidArgumentError

__all__ = ["class_styles", "grow_box", "preview_boxes", "styled_crops"]


def class_styles(clusters: Mapping[int, Any] | None, label: int) -> torch.Tensor:
    """The (k, F) float32 styles (cluster centres) of class ``label``; refused when it has none."""
    styles = (clusters or {}).get(label)
    if styles is None or len(styles) == 0:
        raise InvalidArgumentError(f"class {label} has no styles (no clusters were found for it)")
    return torch.as_tensor(np.asarray(styles) if not isinstance(styles, torch.Tensor) else styles).float()


def preview_boxes(box, margin: int, multiple: int, height: int,
                  width: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(view, crop) for previewing the instance in ``box``: the view is the box with ``margin``
    pixels around it; the crop, what goes through the generator, is the view with as much
    context again on every side, its sides whole multiples of ``multiple``, inside the scene."""
    view = grow_box(box, margin, height, width)
    context = max(2 * margin, box[1] - box[0], box[3] - box[2])
    crop = _align(grow_box(view, context, height, width), multiple, height, width)
    return view, crop


def styled_crops(input: torch.Tensor, crop, channel: int, where: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
    """(k, C, h, w): the ``crop`` of ``input`` (1, C, H, W) once per style, the pixels ``where``
    (a mask over the crop) holding that style from feature channel ``channel`` on."""
    cy0, cy1, cx0, cx1 = crop
    batch = input[:, :, cy0:cy1, cx0:cx1].repeat(styles.shape[0], 1, 1, 1)
    for k in range(styles.shape[0]):
        batch[k, channel:, where] = styles[k].to(input.device)[:, None]
    return batch


def grow_box(box, by: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) grown by ``by`` pixels on every side, inside the scene."""
    y0, y1, x0, x1 = box
    return max(0, y0 - by), min(height, y1 + by), max(0, x0 - by), min(width, x1 + by)


def _align(box, multiple: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The box grown to sides that are multiples of ``multiple``, shifted to stay inside the scene
    (whose sides are multiples already)."""
    def side(lo, hi, limit):
        size = min(limit, -(-(hi - lo) // multiple) * multiple)
        lo = min(lo - (size - (hi - lo)) // 2, limit - size)
        return max(0, lo), max(0, lo) + size

    y0, y1 = side(box[0], box[1], height)
    x0, x1 = side(box[2], box[3], width)
    return y0, y1, x0, x1
