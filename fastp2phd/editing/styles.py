"""Styles of an edited scene's instances: a class's styles are its feature cluster centres, and a
style preview renders one instance in every style of its class on a crop of the scene around it;
and the outlines of the instances, which the page draws over the image."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .. import ops
from ..errors import InvalidArgumentError
from ..visualize import tensor_to_image
from .scene_input import feature_channel

__all__ = ["class_styles", "grow_box", "outlines", "preview_boxes", "preview_images", "styled_crops"]


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


def preview_images(model, input: torch.Tensor, inst: torch.Tensor, inst_id: int, box, styles: torch.Tensor,
                   margin: int) -> list[np.ndarray]:
    """Instance ``inst_id`` (its bounding box ``box``) with ``margin`` pixels around it, in each of ``styles``:
    one batch through the generator on a crop of ``input`` (``preview_boxes``, ``styled_crops``)."""
    view, crop = preview_boxes(box, margin, model.spec.size_multiple, *inst.shape)
    cy0, cy1, cx0, cx1 = crop
    batch = styled_crops(input, crop, feature_channel(model.spec), inst[cy0:cy1, cx0:cx1] == inst_id, styles)
    with torch.inference_mode(), model.precision_scope(batch.device):
        images = model.netG(batch).float()
    vy0, vy1, vx0, vx1 = view
    return [tensor_to_image(img[:, vy0 - cy0:vy1 - cy0, vx0 - cx0:vx1 - cx0]) for img in images]


def outlines(inst: torch.Tensor, box) -> np.ndarray:
    """(h, w, 4) uint8 over ``box`` of the (H, W) instance map: opaque where the boundary map marks an instance
    edge, transparent elsewhere (a pixel's edge depends on its neighbours: the map is computed a pixel beyond)."""
    y0, y1, x0, x1 = box
    gy0, gy1, gx0, gx1 = grow_box(box, 1, *inst.shape)
    edges = ops.boundary_map(inst[None, None, gy0:gy1, gx0:gx1])[0, 0, y0 - gy0:y1 - gy0, x0 - gx0:x1 - gx0]
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    rgba[edges.cpu().numpy() > 0] = (255, 255, 255, 255)
    return rgba
